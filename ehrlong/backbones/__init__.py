"""Backbone registry: name -> builder. One backbone, one file (DESIGN.md §5, §7.2-7.3).

The contract every backbone keeps (DESIGN.md §3), checked for all registered backbones by
tests/test_backbone_contract.py:

    backbone = build_backbone(cfg, vocab_size)
    hidden = backbone(tokens=tokens, times=times, mask=mask)      # [B, T] -> [B, T, d_model]
    hidden = backbone(embeddings=x, times=times, mask=mask)       # [B, T, d_model] -> same
    backbone.d_model, backbone.embed (nn.Embedding, so the LM head can tie to it)

`mask` is True on real tokens; padding is at the right end of each row and never changes the outputs
at real positions. Outputs at position t depend only on positions <= t (causal). `times` are days since
the subject's first event (float); backbones that ignore time accept and ignore it.
Recurrent backbones also offer `init_state(batch)` / `step(token, time, state) -> (hidden, state)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ehrlong.errors import ConfigError

if TYPE_CHECKING:
    from ehrlong.config import TrainConfig


class Backbone(Protocol):
    d_model: int
    embed: nn.Embedding

    def __call__(
        self,
        tokens: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Size:
    d_model: int
    n_layers: int
    n_heads: int | None = None  # attention backbones only


# name -> "module:function" taking (cfg: TrainConfig, vocab_size: int) -> nn.Module.
# Imported lazily so a CPU-only install never imports an unused backbone's optional kernels.
BACKBONES: dict[str, str] = {
    "mamba": "ehrlong.backbones.mamba:build",
    "transformer": "ehrlong.backbones.transformer:build",
    "hmt": "ehrlong.backbones.hmt:build",
}


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}. Valid backbones: {', '.join(BACKBONES)} (set backbone=NAME)."
        )
    module, fn = BACKBONES[name].split(":")
    return getattr(importlib.import_module(module), fn)


def build_backbone(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """Build the backbone named by `cfg.backbone` at `cfg.size`, with `cfg.model` overrides applied."""
    return _builder(cfg.backbone)(cfg, vocab_size)


def is_right_padded(mask: torch.Tensor) -> bool:
    """True when every row of a [B, T] mask is True up to some point and False after it."""
    mask = mask.bool()
    return not bool((mask[:, 1:] & ~mask[:, :-1]).any())


def require_right_padding(mask: torch.Tensor | None, backbone: str) -> None:
    """The backbones rely on causality to keep right padding away from real outputs (no padding mask)."""
    if mask is not None and not is_right_padded(mask):
        raise ValueError(
            f"mask has a real token after padding: the {backbone} backbone needs right padding "
            "(mask True then False along each row); left padding and holes are not supported"
        )


def resolve_size(sizes: dict[str, Size], cfg: TrainConfig) -> Size:
    """The size table row for `cfg.size`, with explicit `model.d_model` / `model.n_layers` overrides."""
    if cfg.size not in sizes:
        raise ConfigError(
            f"unknown size {cfg.size!r} for backbone {cfg.backbone!r}. Valid sizes: {', '.join(sizes)}."
        )
    row = sizes[cfg.size]
    return Size(
        d_model=cfg.model.d_model or row.d_model,
        n_layers=cfg.model.n_layers or row.n_layers,
        n_heads=row.n_heads,
    )
