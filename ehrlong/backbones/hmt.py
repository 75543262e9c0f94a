"""Hierarchical Memory Transformer (He et al. 2024, arXiv:2405.06067) wrapped around `transformer` or `mamba`.

The input is cut into segments of L tokens (the last may be shorter); all rows of a batch share the
boundaries. For segment n, with H_n = embed(tokens of segment n) and BBM the wrapped backbone:

    S_n = BBM([T ‖ H_{n-1}[L-j, L) ‖ T])[-1]              summary query, j = L // 2, T a learned prompt
    P_n = softmax((S_n W_q)(M W_k)ᵀ / √d_h) · M           recall over the last N memories M (no value proj.)
    H   = BBM([P_n ‖ H_{n-1}[L-k, L) ‖ H_n ‖ P_n])        k sensory tokens of the previous segment
    outputs of segment n = H at the H_n positions;   M_n = H[-1], appended to the memory cache

Segment 0 has no previous segment and no memories: P_0 is a learned initial memory.

Deviation from the paper (causality). The paper summarizes the FIRST half of the CURRENT segment,
S_n = BBM([T ‖ H_n[0, L/2) ‖ T]) (§3, Eq. 1), and prepends the recalled P_n to the whole segment, so the
segment's first tokens see a summary of tokens after them: a leak for next-event prediction, and a break
of the backbone contract (output at t depends only on inputs <= t). Here S_n summarizes the last half of
the PREVIOUS segment, the most recent L/2 tokens the model has read; the paper's ablation (App. E, Fig. 9)
found the summary's span (half vs whole segment) to matter little. Everything else follows the paper and
its reference code (OswaldHe/HMT-pytorch; research/anchor_longcontext.md §1): one memory embedding per
segment, sensory memory re-embedded from token ids, raw memories as recall values, `randn * emb.std()`
initial memory. Unlike the reference, whose detach is a no-op (§1.2), truncated BPTT really truncates
(`hmt.bptt_segments`).

Memory. With gradients on, each segment runs under activation checkpointing with its token ids as
input, so between forward and backward only O(T) integers, the N cached memories and the [B, T, D]
output stay alive: training memory grows with the segment length, not the sequence length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ehrlong.backbones import BACKBONES, build_backbone, require_right_padding
from ehrlong.errors import ConfigError

if TYPE_CHECKING:
    from ehrlong.config import HMTConfig, TrainConfig


class HMTBackbone(nn.Module):
    """The wrapped backbone plus HMT's own parameters: summary prompt T, initial memory, W_q and W_k."""

    def __init__(self, inner: nn.Module, hcfg: HMTConfig):
        super().__init__()
        self.inner = inner
        self.d_model: int = inner.d_model
        self.segment_length = hcfg.segment_length  # L
        self.summary_length = hcfg.segment_length // 2  # j: the paper's half segment
        self.sensory = hcfg.sensory  # k
        self.memory_window = hcfg.memory_window  # N
        self.bptt_segments = hcfg.bptt_segments
        # Recompute each segment in backward, so training memory is bounded by one segment's activations
        # (the paper needs CPU offloading to unroll 15 segments instead, App. K). Tests switch it off.
        self.checkpoint_segments = True
        d, d_h = self.d_model, hcfg.recall_dim or self.d_model
        self.recall_dim = d_h
        # The paper's recall has query and key projections only: the values are the cached memories,
        # "to ensure similar distributions of output value and old memory tokens" (§3).
        self.recall_query = nn.Linear(d, d_h, bias=False)  # W_q
        self.recall_key = nn.Linear(d, d_h, bias=False)  # W_k
        # Soft prompts live among the token embeddings, so they start at the embedding scale
        # (reference MemoryCell: `randn * emb.std()`). 1-D, so AdamW does not decay them (param_groups).
        scale = inner.embed.weight.detach().std().item()
        self.summary_prompt = nn.Parameter(torch.randn(d) * scale)  # T
        self.initial_memory = nn.Parameter(torch.randn(d) * scale)  # P_0

    @property
    def embed(self) -> nn.Embedding:
        # The inner backbone's table: the LM head ties to it, and sensory tokens are re-embedded with it.
        return self.inner.embed

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        # Token ids [B, l] -> [B, l, D]; embeddings (the contract's `embeddings=` entry) pass through.
        return x if x.is_floating_point() else self.embed(x)

    def recall(self, summary: torch.Tensor, memories: list[torch.Tensor]) -> torch.Tensor:
        """Single-query cross-attention of `summary` [B, D] over the last N of `memories` ([B, D] each)."""
        m = torch.stack(memories[-self.memory_window :], dim=1)  # [B, m, D]
        q = self.recall_query(summary)  # [B, d_h]
        k = self.recall_key(m)  # [B, m, d_h]
        scores = (k @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(self.recall_dim)  # [B, m]
        weights = scores.float().softmax(dim=-1).to(m.dtype)
        return (weights.unsqueeze(1) @ m).squeeze(1)  # [B, D]

    def summarize(self, prev: torch.Tensor, prev_times: torch.Tensor) -> torch.Tensor:
        """S_n: the inner backbone's last state at the trailing T of [T ‖ last j of segment n-1 ‖ T]."""
        tail, tail_times = self._embed(prev[:, -self.summary_length :]), prev_times[:, -self.summary_length :]
        prompt = self.summary_prompt.to(tail.dtype).expand(tail.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([prompt, tail, prompt], dim=1)
        # Inserted slots take the time of their nearest real neighbour, so time-based positions stay ordered.
        times = torch.cat([tail_times[:, :1], tail_times, tail_times[:, -1:]], dim=1)
        return self.inner(embeddings=x, times=times)[:, -1]

    def _segment(
        self,
        seg: torch.Tensor,
        seg_times: torch.Tensor,
        prev: torch.Tensor | None,
        prev_times: torch.Tensor | None,
        memories: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment n -> (hidden [B, l, D], M_n [B, D]); inputs are ids [B, l] or embeddings [B, l, D]."""
        h = self._embed(seg)
        batch = h.shape[0]
        if prev is None or not memories:
            p = self.initial_memory.to(h.dtype).expand(batch, -1)
        else:
            p = self.recall(self.summarize(prev, prev_times), memories).to(h.dtype)
        if prev is not None and self.sensory > 0:
            # The reference keeps the previous segment's last k token *ids* and re-embeds them.
            sensory, sensory_times = self._embed(prev[:, -self.sensory :]), prev_times[:, -self.sensory :]
        else:
            sensory, sensory_times = h[:, :0], seg_times[:, :0]
        x = torch.cat([p.unsqueeze(1), sensory, h, p.unsqueeze(1)], dim=1)  # [B, 1 + k + l + 1, D]
        real_times = torch.cat([sensory_times, seg_times], dim=1)
        times = torch.cat([real_times[:, :1], real_times, seg_times[:, -1:]], dim=1)
        # mask=None: causality alone keeps padding away from real outputs (see forward), and the inner
        # sequence has real memory slots after a padded row's padding, which a padding mask cannot express.
        out = self.inner(embeddings=x, times=times)
        # clone: a view would keep the whole segment's output alive for as long as the memory is cached.
        return out[:, 1 + sensory.shape[1] : -1], out[:, -1].clone()

    def forward(
        self,
        tokens: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] or embeddings [B, T, D]; times [B, T] days; mask [B, T] right padded -> [B, T, D].

        Padding needs no handling: a row padded from position r on has real segments up to the one that
        holds r. Within that segment, real outputs see only earlier positions (the inner backbone is
        causal) plus P_n and sensory tokens, built from earlier segments, which are all real. Its padding
        reaches only its own trailing memory M_n, which only segments > n read: all padding for that row.
        """
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens [B, T] or embeddings [B, T, d_model]")
        x = tokens if embeddings is None else embeddings
        batch, length = x.shape[:2]
        require_right_padding(mask, "hmt")
        if times is None:
            times = torch.zeros(batch, length, device=x.device)

        outputs: list[torch.Tensor] = []
        memories: list[torch.Tensor] = []  # the last N memory embeddings, [B, D] each
        prev = prev_times = None
        for n, start in enumerate(range(0, length, self.segment_length)):
            if self.bptt_segments and n % self.bptt_segments == 0:
                # Truncated BPTT in windows of b = bptt_segments segments. The cache is the only recurrent
                # state (sensory and summary inputs are re-embedded ids, as in the reference), so a loss on
                # segment n reaches back through memories to segment b * (n // b), and through its window's
                # first sensory / summary inputs to the tokens of the segment before: <= b boundaries.
                memories = [m.detach() for m in memories]
            end = start + self.segment_length
            args = (x[:, start:end], times[:, start:end], prev, prev_times, memories)
            if self.checkpoint_segments and torch.is_grad_enabled():
                # Saved between segments: ids (or embedding slices), times, the N memories and the outputs;
                # each segment's activations are recomputed in its backward.
                out, memory = checkpoint(self._segment, *args, use_reentrant=False)
            else:
                out, memory = self._segment(*args)
            outputs.append(out)
            memories = [*memories, memory][-self.memory_window :]
            prev, prev_times = args[0], args[1]
        return torch.cat(outputs, dim=1)


def check_config(hcfg: HMTConfig) -> None:
    """Reject hmt.* values the wrapper cannot run with; each message names the key, the rule and a fix."""
    inner = [name for name in BACKBONES if name != "hmt"]
    if hcfg.backbone not in inner:
        raise ConfigError(
            f"hmt.backbone={hcfg.backbone!r} is not a backbone hmt can wrap. Valid: {', '.join(inner)} "
            "(set hmt.backbone=NAME)."
        )
    if hcfg.segment_length < 2:
        raise ConfigError(
            f"hmt.segment_length={hcfg.segment_length} must be >= 2 (the summary pass reads half a segment); "
            "the paper uses 256-1024."
        )
    if not 0 <= hcfg.sensory < hcfg.segment_length:
        raise ConfigError(
            f"hmt.sensory={hcfg.sensory} must be in [0, hmt.segment_length={hcfg.segment_length}) "
            "(tokens carried over from the previous segment); the paper uses 32."
        )
    if hcfg.memory_window < 1:
        raise ConfigError(
            f"hmt.memory_window={hcfg.memory_window} must be >= 1 (memories recall attends over); "
            "the paper uses 300."
        )
    if hcfg.recall_dim is not None and hcfg.recall_dim < 1:
        raise ConfigError(f"hmt.recall_dim={hcfg.recall_dim} must be >= 1, or null for d_model.")
    if hcfg.bptt_segments < 0:
        raise ConfigError(
            f"hmt.bptt_segments={hcfg.bptt_segments} must be >= 0 (0 = back-propagate through all "
            "segments); e.g. hmt.bptt_segments=8."
        )


def build(cfg: TrainConfig, vocab_size: int) -> HMTBackbone:
    """HMT around `hmt.backbone`, built at `cfg.size` for inner sequences of L + k + 2 positions."""
    hcfg = cfg.hmt
    check_config(hcfg)
    inner_cfg = dataclasses.replace(
        cfg, backbone=hcfg.backbone, context_length=hcfg.segment_length + hcfg.sensory + 2
    )
    return HMTBackbone(build_backbone(inner_cfg, vocab_size), hcfg)
