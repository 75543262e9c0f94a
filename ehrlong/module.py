"""EHRLitModule: the Lightning system for next-event prediction. The backbone is injected (DESIGN.md §7.5).

    hidden = backbone(tokens, times, mask)            # [B, T, D]
    loss   = CE(head(hidden[:, :-1]), tokens[:, 1:])  # over real (unpadded) targets only

Context Clues' code averaged the loss over padded positions too; here padding never enters the loss,
and each optimizer step weighs every real token equally however its tokens are spread over the
accumulated micro-batches (EventBatch.step_targets).
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ehrlong.config import OptimConfig
from ehrlong.data.batching import EventBatch

# Rows of logits alive at once. Small enough (V=8k: 32 MB) to be served from reused heap memory instead
# of fresh page-faulting mmaps; 8192 rows made a 16k-token tiny step ~20% slower on CPU.
LOSS_CHUNK = 1024


def position_buckets(context_length: int) -> list[int]:
    """Bucket edges 0, 64, 128, ..., context_length (powers of two) for loss by position in the window."""
    edges = [0]
    edge = 64
    while edge < context_length:
        edges.append(edge)
        edge *= 2
    return edges + [context_length]


def _ce_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE of `hidden @ weight.T` against `targets` ([N, D], [V, D], [N] -> [N]) without ever
    holding the full [N, V] logits: chunks of LOSS_CHUNK rows, each recomputed in backward when training."""
    if hidden.shape[0] <= LOSS_CHUNK:
        return _ce_chunk(hidden, weight, targets)
    grad = torch.is_grad_enabled()
    parts = [
        checkpoint(
            _ce_chunk, hidden[i : i + LOSS_CHUNK], weight, targets[i : i + LOSS_CHUNK], use_reentrant=False
        )
        if grad
        else _ce_chunk(hidden[i : i + LOSS_CHUNK], weight, targets[i : i + LOSS_CHUNK])
        for i in range(0, hidden.shape[0], LOSS_CHUNK)
    ]
    return torch.cat(parts)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices only; none on norms, biases, embeddings, or parameters flagged
    `_no_weight_decay` (Mamba's A_log and D, as in mamba_ssm)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        skip = p.ndim < 2 or id(p) in embeddings or getattr(p, "_no_weight_decay", False)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over `warmup` steps, then cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EHRLitModule(L.LightningModule):
    def __init__(
        self,
        backbone: nn.Module,
        vocab_size: int,
        optim: OptimConfig,
        max_steps: int,
        context_length: int,
        tie_embeddings: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = backbone.embed.weight
        self.optim_cfg = optim
        self.max_steps = max_steps
        self.edges = position_buckets(context_length)
        self._val_sums = torch.zeros(len(self.edges) - 1, dtype=torch.float64)
        self._val_counts = torch.zeros(len(self.edges) - 1, dtype=torch.float64)
        self._t0: float | None = None
        self.tokens_seen = 0

    # --- loss -----------------------------------------------------------------------------------------

    def token_losses(self, batch: EventBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-target CE for every real next-token target, and each target's position in its window."""
        hidden = self.backbone(tokens=batch.tokens, times=batch.times, mask=batch.mask)
        valid = batch.mask[:, 1:] & batch.mask[:, :-1]
        targets = batch.tokens[:, 1:][valid]
        losses = chunked_cross_entropy(hidden[:, :-1][valid], self.head.weight, targets)
        positions = torch.arange(1, batch.tokens.shape[1], device=batch.tokens.device).expand_as(valid)[valid]
        return losses, positions

    def training_step(self, batch: EventBatch, batch_idx: int) -> torch.Tensor:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        losses, _ = self.token_losses(batch)
        n_real = losses.numel()
        self.tokens_seen += int(batch.mask.sum())
        # Lightning divides by accumulate_grad_batches; multiply it back so the step's loss is the mean
        # over all of the step's real targets.
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        loss = losses.sum() * accumulate / max(1, batch.step_targets)
        mean = losses.detach().mean() if n_real else losses.detach().sum()
        elapsed = time.perf_counter() - self._t0
        self.log("train/loss", mean, prog_bar=True, batch_size=n_real)
        self.log("train/tokens_per_s", self.tokens_seen / max(elapsed, 1e-9), prog_bar=True, batch_size=1)
        return loss

    # --- validation: loss by position bucket over the whole tuning split --------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_sums.zero_()
        self._val_counts.zero_()

    def validation_step(self, batch: EventBatch, batch_idx: int) -> None:
        losses, positions = self.token_losses(batch)
        losses = losses.detach()
        bucket = torch.bucketize(
            positions, torch.tensor(self.edges[1:-1], device=positions.device), right=True
        )
        self._val_sums += torch.zeros_like(self._val_sums).index_add_(0, bucket.cpu(), losses.double().cpu())
        self._val_counts += torch.bincount(bucket.cpu(), minlength=len(self._val_counts)).double()

    def on_validation_epoch_end(self) -> None:
        total = self._val_counts.sum()
        if total == 0:
            return
        loss = float(self._val_sums.sum() / total)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/perplexity", math.exp(min(loss, 50.0)), sync_dist=True)
        for i, (lo, hi) in enumerate(zip(self.edges[:-1], self.edges[1:], strict=True)):
            if self._val_counts[i] > 0:
                bucket_loss = float(self._val_sums[i] / self._val_counts[i])
                self.log(f"val_by_position/loss_{lo}_{hi}", bucket_loss, sync_dist=True)
                self.log(
                    f"val_by_position/perplexity_{lo}_{hi}", math.exp(min(bucket_loss, 50.0)), sync_dist=True
                )

    def val_loss_by_position(self) -> dict[str, float]:
        out = {}
        for i, (lo, hi) in enumerate(zip(self.edges[:-1], self.edges[1:], strict=True)):
            if self._val_counts[i] > 0:
                out[f"{lo}-{hi}"] = float(self._val_sums[i] / self._val_counts[i])
        return out

    # --- optimisation -------------------------------------------------------------------------------------

    def configure_optimizers(self):
        o = self.optim_cfg
        opt = torch.optim.AdamW(param_groups(self, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, o.warmup_steps, self.max_steps, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
