"""Short probe fine-tune of a trained run for the retrieval tasks.

An EHR model has never seen a key-value needle, so it cannot be asked for one zero-shot: as RULER-style
probing of non-instruction models suggests (research/anchor_longcontext.md §5.4), the run's backbone and
LM head are fine-tuned for a few steps on probe samples at lengths up to its training context, with the
loss on the answer position(s) only; the benchmark then tests that model at every length, beyond the
training context too, which measures how retrieval learned at short lengths generalises to long ones.
The run itself is never modified: the fine-tune works on a copy, saved into the benchmark's folder.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ehrlong.benchmarks.haystack import Haystack
from ehrlong.benchmarks.models import RunModel
from ehrlong.benchmarks.scoring import batch_tensors
from ehrlong.benchmarks.tasks import Sample, Task


@dataclass
class Finetuned:
    module: torch.nn.Module
    losses: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)  # the task of each step
    seconds: float = 0.0


def answer_loss(model: RunModel, samples: Sequence[Sample]) -> torch.Tensor:
    """Mean over answer positions of -mean_{a in answers} log p(a): a soft target spread evenly over the
    answers of a position (one answer: plain cross-entropy)."""
    tokens, times, mask, _ = batch_tensors(samples, control=False)
    A = len(samples[0].answer_positions)
    positions = torch.as_tensor(np.stack([s.answer_positions for s in samples]))
    logp = torch.log_softmax(model.logits_at(tokens, times, mask, positions), dim=-1)  # [B, A, V]
    target = torch.zeros(logp.shape)
    for r, s in enumerate(samples):
        for i, answers in enumerate(s.answers):
            target[r, i, torch.as_tensor(answers)] = 1.0 / len(answers)
    return -(target.to(logp.device) * logp).sum(-1).sum() / (len(samples) * A)


def finetune_lengths(tasks: Sequence[Task], context_length: int) -> tuple[int, int]:
    """Lengths of fine-tune samples: uniform in [max(min task length, L/4), L], L = the run's context."""
    lo = max(max(t.min_length() for t in tasks), context_length // 4)
    return min(lo, context_length), context_length


def finetune(
    module: torch.nn.Module,
    tasks: Sequence[Task],
    hay: Haystack,
    context_length: int,
    steps: int,
    tokens_per_step: int = 32_768,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> Finetuned:
    """`steps` AdamW steps on a copy of `module`; step s trains task s mod len(tasks) on
    max(1, tokens_per_step // length) samples of one random length and uniform random depths."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0x5EED])
    model = copy.deepcopy(module).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    runner = RunModel(model)
    lo, hi = finetune_lengths(tasks, context_length)
    out = Finetuned(model)
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc="probe fine-tune", unit="step", disable=not progress):
        task = tasks[step % len(tasks)]
        length = int(rng.integers(lo, hi + 1))
        samples = [
            task.sample(hay, length, float(rng.uniform(0.0, 1.0)), rng, rng, index=i)
            for i in range(max(1, tokens_per_step // length))
        ]
        loss = answer_loss(runner, samples)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        out.losses.append(float(loss.detach()))
        out.lengths.append(length)
        out.tasks.append(task.name)
    out.seconds = time.perf_counter() - t0
    model.eval()
    return out
