"""Windows of the token store -> token-budget micro-batches -> `EventBatch`.

A *window* is a slice [start, end) of one subject's tokens, at most L long. Training covers each
subject's timeline with consecutive windows aligned to its end (the last window always holds the most
recent L tokens, the part a prediction at the end of the record would see). Windows are packed into
micro-batches whose padded size B x T_max stays within a token budget; packing windows of similar
length together keeps padding small (the issue asks <= 10% on the synthetic cohort).

The plan is a pure function of (store, L, budget, seed, epoch, rank, world size), so `resume` can skip
exactly the micro-batches already consumed: position = global_step * micro_batches_per_step.

Distributed training (issue 8) shards by subject: each rank owns a fixed, disjoint set of train subjects
(balanced by token count) and plans its epochs over its own windows only, so no subject is seen twice
per epoch and a rank reads only its own subjects' slices of the memory-mapped store. Ranks must take
the same number of micro-batches per step, so every rank's epoch is cut to the shortest rank's length
(the few micro-batches cut are different ones each epoch, since every epoch is reshuffled). With one
rank nothing is cut and the plan is the single-process plan.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ehrlong.errors import DataError
from ehrlong.tokenizer import US_PER_DAY


@dataclass
class EventBatch:
    """DESIGN.md §3: tokens [B, T] int, times [B, T] float (days since the subject's first event),
    mask [B, T] bool (False on padding, always at the right end of a row)."""

    tokens: torch.Tensor
    times: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor | None = None
    # Next-token targets in the whole optimizer step this micro-batch belongs to: the loss is normalised
    # by it, so every target weighs the same however the step's windows are spread over micro-batches.
    step_targets: int = 0
    # Position of each row's first token within its subject's timeline (for perplexity by position).
    offsets: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> EventBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return EventBatch(
            move(self.tokens),
            move(self.times),
            move(self.mask),
            move(self.labels),
            self.step_targets,
            move(self.offsets),
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]


def subject_windows(offsets: np.ndarray, subjects: np.ndarray, length: int) -> np.ndarray:
    """[n_windows, 3] int64 rows (subject index, start, end) covering each subject end-aligned in chunks of `length`.

    `offsets` are the store's per-subject token offsets; start/end are absolute positions in the flat arrays.
    """
    starts, ends = offsets[subjects], offsets[subjects + 1]
    n_tokens = ends - starts
    per_subject = np.maximum(
        1, -(-n_tokens // length)
    )  # ceil; a subject with 0 tokens still gets 0 windows below
    per_subject[n_tokens == 0] = 0
    subj = np.repeat(subjects, per_subject)
    # k-th window from the end of its subject: [end - (k+1)L, end - kL), clipped at the subject start.
    first = np.repeat(np.cumsum(per_subject) - per_subject, per_subject)
    k = np.arange(len(subj)) - first
    end = np.repeat(ends, per_subject) - k * length
    start = np.maximum(end - length, np.repeat(starts, per_subject))
    return np.stack([subj, start, end], axis=1).astype(np.int64)


def pack(lengths: np.ndarray, budget: int, order: np.ndarray) -> list[np.ndarray]:
    """Greedy packing of windows (visited in `order`, longest first within each run) into micro-batches
    with len(batch) * max_length <= budget. Returns arrays of window indices."""
    batches: list[np.ndarray] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = int(lengths[i])
        if current and (len(current) + 1) * max(longest, n) > budget:
            batches.append(np.asarray(current))
            current, longest = [], 0
        current.append(int(i))
        longest = max(longest, n)
    if current:
        batches.append(np.asarray(current))
    return batches


def plan_epoch(windows: np.ndarray, budget: int, seed: int, epoch: int, pool: int = 256) -> list[np.ndarray]:
    """Shuffled, length-grouped micro-batches for one epoch (fairseq-style: shuffle, then sort by length
    inside pools of `pool` windows, pack, and shuffle the batches)."""
    rng = np.random.default_rng([seed, epoch])
    lengths = windows[:, 2] - windows[:, 1]
    perm = rng.permutation(len(windows))
    order = (
        np.concatenate(
            [
                perm[i : i + pool][np.argsort(-lengths[perm[i : i + pool]], kind="stable")]
                for i in range(0, len(perm), pool)
            ]
        )
        if len(perm)
        else perm
    )
    batches = pack(lengths, budget, order)
    return [batches[i] for i in rng.permutation(len(batches))]


def padding_waste(windows: np.ndarray, batches: list[np.ndarray]) -> float:
    """Share of padded positions among all positions of the planned micro-batches."""
    lengths = windows[:, 2] - windows[:, 1]
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return 1.0 - lengths.sum() / padded if padded else 0.0


def collate(
    tokens: np.ndarray,
    times_us: np.ndarray,
    offsets: np.ndarray,
    windows: np.ndarray,
    rows: np.ndarray,
    step_targets: int = 0,
) -> EventBatch:
    """Gather `windows[rows]` from the flat store arrays (times in microseconds) into a right-padded
    EventBatch."""
    sel = windows[rows]
    lengths = sel[:, 2] - sel[:, 1]
    B, T = len(sel), int(lengths.max())
    tok = np.zeros((B, T), dtype=np.int64)
    tim = np.zeros((B, T), dtype=np.float32)
    mask = np.arange(T)[None, :] < lengths[:, None]
    for r, (subj, start, end) in enumerate(sel):
        n = end - start
        tok[r, :n] = tokens[start:end]
        # Days since the subject's first token, so the model never sees absolute calendar time.
        tim[r, :n] = (times_us[start:end] - times_us[offsets[subj]]) / US_PER_DAY
    return EventBatch(
        tokens=torch.from_numpy(tok),
        times=torch.from_numpy(tim),
        mask=torch.from_numpy(mask),
        step_targets=step_targets,
        offsets=torch.from_numpy(sel[:, 1] - offsets[sel[:, 0]]),
    )


def shard_subjects(offsets: np.ndarray, subjects: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Split `subjects` (store indices) into `world_size` disjoint shards of about equal token count:
    longest subject first onto the lightest shard (LPT). Deterministic; each shard ascending."""
    if world_size == 1:
        return [subjects]
    n_tokens = offsets[subjects + 1] - offsets[subjects]
    load = np.zeros(world_size, dtype=np.int64)
    owner = np.empty(len(subjects), dtype=np.int64)
    for i in np.argsort(-n_tokens, kind="stable"):
        rank = int(np.argmin(load))  # ties go to the lowest rank
        owner[i] = rank
        load[rank] += n_tokens[i]
    return [np.sort(subjects[owner == r]) for r in range(world_size)]


class TrainBatches(torch.utils.data.IterableDataset):
    """Endless stream of training micro-batches, epoch after epoch, starting at micro-batch `start`.

    Each group of `per_step` consecutive micro-batches forms one optimizer step on this rank and carries
    the number of next-token targets of the whole step on all ranks (see EventBatch.step_targets).
    `shard(rank, world_size)` picks the rank's subjects; `ranks` lists the shards this process iterates
    (one in a distributed run; every shard, one step's group after the other, reproduces a multi-rank run
    in one process, which is how tests hold DDP to a single process).
    """

    def __init__(self, store, split: str, length: int, budget: int, per_step: int, seed: int, start: int = 0):
        super().__init__()
        self.tokens, self.times_us, self.offsets = store.tokens, store.times_us, store.offsets
        self.split, self.length = split, length
        self.subjects = store.split_indices(split)
        self.budget, self.per_step, self.seed, self.start = budget, per_step, seed, start
        self.shard(0, 1)

    def shard(self, rank: int, world_size: int) -> None:
        shards = shard_subjects(self.offsets, self.subjects, world_size)
        self.shard_windows = [subject_windows(self.offsets, s, self.length) for s in shards]
        empty = [r for r, w in enumerate(self.shard_windows) if len(w) == 0]
        if world_size == 1 and empty:
            raise DataError(
                f"the {self.split} split of the token store has no tokens to train on; check the dataset's "
                "metadata/subject_splits.parquet."
            )
        if empty:
            raise DataError(
                f"the {self.split} split has {len(self.subjects)} subject(s) with tokens for {world_size} "
                f"rank(s): rank(s) {empty} would get no subject. Every rank needs its own subjects; use at "
                f"most {world_size - len(empty)} devices x nodes, or more data."
            )
        self.world_size, self.ranks = world_size, (rank,)

    @property
    def windows(self) -> np.ndarray:
        """The windows this process trains on (all of them in a single-process run)."""
        return np.concatenate([self.shard_windows[r] for r in self.ranks])

    def micro_batches(self) -> Iterator[tuple[np.ndarray, ...]]:
        """Micro-batch after micro-batch, each as a tuple with every rank's (rank r's at index r)."""
        epoch = 0
        while True:
            plans = [plan_epoch(w, self.budget, self.seed, epoch) for w in self.shard_windows]
            # Ranks step together: each takes as many micro-batches per epoch as the shortest rank.
            yield from zip(*plans, strict=False)
            epoch += 1

    def __iter__(self) -> Iterator[EventBatch]:
        lengths = [w[:, 2] - w[:, 1] for w in self.shard_windows]
        # Every rank's plan is made here (cheap: no gathering) to know the whole step's targets.
        stream = self.micro_batches()
        for _ in range(self.start):  # resume: skip what earlier steps consumed
            next(stream)
        while True:
            group = [next(stream) for _ in range(self.per_step)]
            step_targets = int(
                sum(
                    np.maximum(lengths[r][batch[r]] - 1, 0).sum()
                    for batch in group
                    for r in range(len(batch))
                )
            )
            for r in self.ranks:
                for batch in group:
                    yield collate(
                        self.tokens,
                        self.times_us,
                        self.offsets,
                        self.shard_windows[r],
                        batch[r],
                        step_targets,
                    )


class EvalBatches(torch.utils.data.Dataset):
    """Every token of a split exactly once, in end-aligned windows of length L (validation).

    `shard(rank, world_size)` keeps every world_size-th window (longest first), so each rank gets a
    share of about equal size and at least one window: validation has no per-batch collective, but every
    rank must reach the epoch-end reduction (EHRLitModule.on_validation_epoch_end).
    """

    def __init__(self, store, split: str, length: int, budget: int):
        self.tokens, self.times_us, self.offsets = store.tokens, store.times_us, store.offsets
        self.split, self.budget = split, budget
        self.all_windows = subject_windows(self.offsets, store.split_indices(split), length)
        self.shard(0, 1)

    def shard(self, rank: int, world_size: int) -> None:
        if world_size == 1:
            self.windows = self.all_windows
        elif len(self.all_windows) < world_size:
            raise DataError(
                f"the {self.split} split has {len(self.all_windows)} validation window(s) for {world_size} "
                "rank(s); every rank needs at least one. Use fewer devices x nodes, or more tuning subjects."
            )
        else:
            lengths = self.all_windows[:, 2] - self.all_windows[:, 1]
            self.windows = self.all_windows[np.argsort(-lengths, kind="stable")[rank::world_size]]
        lengths = self.windows[:, 2] - self.windows[:, 1]
        self.batches = pack(lengths, self.budget, np.argsort(-lengths, kind="stable"))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> EventBatch:
        rows = self.batches[i]
        n = int(np.maximum(self.windows[rows, 2] - self.windows[rows, 1] - 1, 0).sum())
        return collate(self.tokens, self.times_us, self.offsets, self.windows, rows, step_targets=n)
