"""What the benchmark scores: anything that gives next-token logits at chosen positions.

    model.logits_at(tokens [B,T], times [B,T], mask [B,T], positions [B,P]) -> logits [B,P,V]

`as_logits_model` accepts such an object, a trained `EHRLitModule` (`RunModel`: the backbone runs over
the whole sequence but the LM head only at the P scored positions, so a 64k-token row never holds
[T, V] logits), or any plain callable `model(tokens, times, mask) -> [B,T,V]` (`FullLogits`). The
oracle and the position-blind baseline the tests hold every task to go through the same path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch


class LogitsModel(Protocol):
    def logits_at(
        self, tokens: torch.Tensor, times: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor: ...


def _gather(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, T, D], positions [B, P] -> [B, P, D]."""
    return x.gather(1, positions.to(x.device)[..., None].expand(-1, -1, x.shape[-1]))


class FullLogits:
    """A callable returning logits for every position, reduced to the scored ones."""

    def __init__(self, fn):
        self.fn = fn

    def logits_at(self, tokens, times, mask, positions):
        return _gather(self.fn(tokens, times, mask), positions)


class RunModel:
    """A trained EHRLitModule: hidden = backbone(tokens, times, mask); logits = head(hidden[positions])."""

    def __init__(self, module):
        self.module = module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def logits_at(self, tokens, times, mask, positions):
        dev = self.device
        hidden = self.module.backbone(tokens=tokens.to(dev), times=times.to(dev), mask=mask.to(dev))
        return self.module.head(_gather(hidden, positions)).float()


def as_logits_model(model) -> LogitsModel:
    if hasattr(model, "logits_at"):
        return model
    if hasattr(model, "backbone") and hasattr(model, "head"):
        return RunModel(model)
    if callable(model):
        return FullLogits(model)
    raise TypeError(
        f"cannot score {type(model).__name__}: give logits_at(...), an EHRLitModule or a callable"
    )


class Oracle:
    """A perfect reader of the samples it was given: for a row whose tokens are one of those samples', it
    puts a large logit on that sample's answers at its answer positions (what the context determines),
    zero elsewhere; unknown rows (likelihood's control rows, where the code is absent) get zeros."""

    def __init__(self, samples: Sequence, vocab_size: int, margin: float = 30.0):
        self.vocab_size, self.margin = vocab_size, margin
        self.by_row = {np.asarray(s.tokens, dtype=np.int64).tobytes(): s for s in samples}

    def __call__(self, tokens, times, mask):
        B, T = tokens.shape
        out = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            s = self.by_row.get(tokens[b].cpu().numpy().astype(np.int64).tobytes())
            if s is None:
                continue
            for p, answers in zip(s.answer_positions, s.answers, strict=True):
                out[b, int(p), torch.as_tensor(answers)] = self.margin
        return out


class Blind:
    """Position- and context-blind baseline: the same logits at every position of every row (seeded random
    or a given prior, e.g. the train unigram log-frequencies). Its arg max is one fixed token, so it
    scores at chance on any task whose answers are uniform over the candidates."""

    def __init__(self, vocab_size: int, seed: int = 0, prior: np.ndarray | None = None):
        if prior is None:
            prior = np.random.default_rng(seed).normal(size=vocab_size)
        self.prior = torch.as_tensor(np.asarray(prior, dtype=np.float32))

    def __call__(self, tokens, times, mask):
        B, T = tokens.shape
        return self.prior.expand(B, T, -1)
