"""EHRLitModule: the Lightning system for next-event prediction. The backbone is injected (DESIGN.md §7.5).

    hidden = backbone(tokens, times, mask)            # [B, T, D]
    loss   = CE(head(hidden[:, :-1]), tokens[:, 1:])  # over real (unpadded) targets only

Context Clues' code averaged the loss over padded positions too; here padding never enters the loss,
and each optimizer step weighs every real token equally however its tokens are spread over the
accumulated micro-batches (EventBatch.step_targets). Under DDP/FSDP the step's targets are those of
every rank, so the same holds across ranks (issue 8): a 2-rank step equals the 1-process step on the
same windows.
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
        self.tokens_seen = 0  # real tokens trained on by this process
        self.global_tokens_seen = 0  # ... by all ranks, as of the last optimizer step
        self._step_losses: list[torch.Tensor] = []  # this rank's loss sums of the step's micro-batches
        self._step_targets = 0

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
        self.tokens_seen += int(batch.mask.sum())
        self._step_losses.append(losses.detach().sum())
        self._step_targets = batch.step_targets
        # Lightning divides by accumulate_grad_batches and DDP/FSDP average gradients over ranks; multiply
        # both back so the step's loss is the sum over all ranks' real targets / the step's target count.
        accumulate, world = (
            (self.trainer.accumulate_grad_batches, self.trainer.world_size)
            if self._trainer is not None
            else (1, 1)
        )
        return losses.sum() * (accumulate * world) / max(1, batch.step_targets)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log the step's loss (mean over every real target of the step, all ranks) once per step.

        One small all-reduce per step; the loss of the step's last micro-batch alone would differ between
        a 2-rank run and a 1-process run on the same windows."""
        loss_sum = torch.stack(self._step_losses).double().sum() if self._step_losses else torch.zeros(())
        local = torch.stack(
            [
                loss_sum.to(self.device, torch.float64),
                torch.tensor(float(self.tokens_seen), dtype=torch.float64, device=self.device),
            ]
        )
        total = self.trainer.strategy.reduce(local, reduce_op="sum").cpu()
        self._step_losses.clear()
        self.global_tokens_seen = int(total[1])
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        self.log("train/loss", float(total[0]) / max(1, self._step_targets), prog_bar=True)
        self.log("train/tokens_per_s", self.global_tokens_seen / max(elapsed, 1e-9), prog_bar=True)

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
        if self._trainer is not None and self.trainer.world_size > 1:
            # Each rank validated its own windows (EvalBatches.shard): sum the buckets over ranks, so
            # every rank (and metrics.json, written by rank 0) holds the loss over the whole split.
            both = torch.stack([self._val_sums, self._val_counts]).to(self.device)
            both = self.trainer.strategy.reduce(both, reduce_op="sum").cpu()
            self._val_sums.copy_(both[0])
            self._val_counts.copy_(both[1])
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
