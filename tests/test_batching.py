"""Windows, token-budget packing, resumable training streams, and the loss normalisation they feed."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import numpy as np
import pytest
import torch

from ehrlong.data.batching import (
    EvalBatches,
    TrainBatches,
    collate,
    padding_waste,
    plan_epoch,
    subject_windows,
)
from ehrlong.errors import DataError


@dataclass
class FakeStore:
    """The slice of the TokenStore interface batching uses."""

    tokens: np.ndarray
    times_us: np.ndarray
    offsets: np.ndarray
    split_of: np.ndarray

    def split_indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split_of == split)


def fake_store(lengths: list[int], seed: int = 0) -> FakeStore:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(1, 100, offsets[-1]).astype(np.int32)
    days = np.concatenate([np.sort(rng.uniform(0, 1000, n)) + 18000 for n in lengths])
    times = (days * 86_400_000_000).astype(np.int64)
    split_of = np.array(["train" if i % 5 else "tuning" for i in range(len(lengths))])
    return FakeStore(tokens, times, offsets, split_of)


def test_windows_cover_every_token_once_end_aligned():
    store = fake_store([1, 5, 10, 23, 0, 7])
    subjects = np.arange(6)
    w = subject_windows(store.offsets, subjects, length=8)
    covered = np.zeros(store.offsets[-1], dtype=int)
    for subj, start, end in w:
        assert store.offsets[subj] <= start < end <= store.offsets[subj + 1]
        assert end - start <= 8
        covered[start:end] += 1
    assert (covered == 1).all()
    # The window holding a subject's last token is a full L (or the whole subject): most recent context.
    last = {int(s): (int(a), int(b)) for s, a, b in w if b == store.offsets[s + 1]}
    assert last[3] == (store.offsets[4] - 8, store.offsets[4])
    assert 4 not in {int(s) for s in w[:, 0]}  # no tokens, no window


def test_packing_respects_budget_and_wastes_little():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(8, 1, 400).astype(int) + 1, 4096).tolist()
    store = fake_store(lengths)
    w = subject_windows(store.offsets, np.arange(len(lengths)), 4096)
    batches = plan_epoch(w, budget=16384, seed=0, epoch=0)
    sizes = w[:, 2] - w[:, 1]
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(w)))  # every window exactly once
    assert all(len(b) * sizes[b].max() <= 16384 for b in batches)
    assert padding_waste(w, batches) <= 0.10


def test_plan_is_deterministic_and_epochs_differ():
    store = fake_store([50] * 40)
    w = subject_windows(store.offsets, np.arange(40), 16)
    a = plan_epoch(w, 64, seed=1, epoch=0)
    b = plan_epoch(w, 64, seed=1, epoch=0)
    c = plan_epoch(w, 64, seed=1, epoch=1)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=False))


def test_collate_pads_right_and_times_are_relative_to_first_event():
    store = fake_store([5, 3])
    w = subject_windows(store.offsets, np.arange(2), 8)
    batch = collate(store.tokens, store.times_us, store.offsets, w, np.array([0, 1]))
    assert batch.tokens.shape == (2, 5)
    assert batch.mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert (batch.tokens[1, 3:] == 0).all()
    days = (store.times_us[5:8] - store.times_us[5]) / 86_400_000_000
    np.testing.assert_allclose(batch.times[1, :3].numpy(), days, rtol=1e-6)
    assert batch.times[1, 2] > 1.0  # days, not microseconds or hours
    assert batch.times[0, 0] == 0


def test_resume_position_reproduces_the_stream():
    store = fake_store([37, 80, 12, 64, 5, 90, 33, 41, 70, 22, 15, 60])
    full = TrainBatches(store, "train", length=16, budget=48, per_step=2, seed=7)
    first = list(islice(iter(full), 30))
    resumed = TrainBatches(store, "train", length=16, budget=48, per_step=2, seed=7, start=10)
    again = list(islice(iter(resumed), 20))
    for x, y in zip(first[10:], again, strict=True):
        assert torch.equal(x.tokens, y.tokens) and x.step_targets == y.step_targets


def test_step_targets_count_the_whole_step():
    store = fake_store([37, 80, 12, 64, 5, 90, 33, 41, 70, 22, 15, 60])
    stream = iter(TrainBatches(store, "train", length=16, budget=48, per_step=3, seed=0))
    group = [next(stream) for _ in range(3)]
    targets = sum(int((b.mask.sum(1) - 1).clamp(min=0).sum()) for b in group)
    assert all(b.step_targets == targets for b in group)


def test_eval_batches_cover_the_split_once():
    store = fake_store([37, 80, 12, 64, 5, 90, 33, 41, 70, 22, 15, 60])
    ev = EvalBatches(store, "tuning", length=16, budget=48)
    n = sum(int(ev[i].mask.sum()) for i in range(len(ev)))
    tuning = store.split_indices("tuning")
    assert n == int(sum(store.offsets[s + 1] - store.offsets[s] for s in tuning))


# --- distributed: subject shards (issue 8) -----------------------------------------------------------------

LENGTHS = [37, 80, 12, 64, 5, 90, 33, 41, 70, 22, 15, 60, 44, 8, 51, 29, 77, 18, 36, 95, 3, 58]


def window_keys(ds: TrainBatches, rank: int, rows: np.ndarray) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in w) for w in ds.shard_windows[rank][rows]]


def test_ranks_own_disjoint_subjects_and_see_each_window_at_most_once_per_epoch():
    store = fake_store(LENGTHS)
    world = 3
    ranks = []
    for r in range(world):
        ds = TrainBatches(store, "train", length=16, budget=48, per_step=2, seed=7)
        ds.shard(r, world)
        ranks.append(ds)
    subjects = [set(ds.shard_windows[r][:, 0].tolist()) for r, ds in enumerate(ranks)]
    # Disjoint, and together every train subject with tokens: no subject is trained on by two ranks.
    assert all(not (subjects[a] & subjects[b]) for a in range(world) for b in range(a + 1, world))
    assert set().union(*subjects) == set(store.split_indices("train").tolist())
    # Balanced by tokens (LPT): no rank holds more than its share plus one subject.
    tokens = [
        int((ds.shard_windows[r][:, 2] - ds.shard_windows[r][:, 1]).sum()) for r, ds in enumerate(ranks)
    ]
    assert max(tokens) - min(tokens) <= max(LENGTHS)

    # One epoch: every rank's micro-batches come from the same per-epoch plan cut to the shortest rank.
    # Within it no window (hence no subject's tokens) appears twice, and all ranks step in lockstep.
    epoch = min(len(plan_epoch(ds.shard_windows[r], 48, 7, 0)) for r, ds in enumerate(ranks))
    seen: list[tuple[int, int, int]] = []
    for r, ds in enumerate(ranks):
        for batch in islice(ds.micro_batches(), epoch):
            seen += window_keys(ds, r, batch[r])
    assert len(seen) == len(set(seen))

    # Every rank's batches of a step carry the same step_targets: the targets of all ranks together.
    streams = [iter(ds) for ds in ranks]
    for _ in range(5):
        steps = [[next(s) for _ in range(2)] for s in streams]
        real = sum(int((b.mask.sum(1) - 1).clamp(min=0).sum()) for group in steps for b in group)
        assert {b.step_targets for group in steps for b in group} == {real}


def test_one_rank_is_the_single_process_plan_and_emulated_ranks_replay_a_ddp_step():
    store = fake_store(LENGTHS)
    single = TrainBatches(store, "train", length=16, budget=48, per_step=2, seed=3)
    windows = subject_windows(store.offsets, store.split_indices("train"), 16)
    expected = plan_epoch(windows, 48, 3, 0) + plan_epoch(windows, 48, 3, 1)
    got = list(islice(single.micro_batches(), len(expected)))
    assert all(np.array_equal(g[0], e) for g, e in zip(got, expected, strict=True))  # unchanged by sharding

    # A process iterating both shards yields, per step, rank 0's then rank 1's micro-batches.
    both = TrainBatches(store, "train", length=16, budget=48, per_step=1, seed=3, start=2)
    both.shard(0, 2)
    both.ranks = (0, 1)
    per_rank = []
    for r in range(2):
        ds = TrainBatches(store, "train", length=16, budget=48, per_step=1, seed=3, start=2)
        ds.shard(r, 2)
        per_rank.append(list(islice(iter(ds), 3)))
    replay = list(islice(iter(both), 6))
    for step in range(3):
        for r in range(2):
            a, b = replay[2 * step + r], per_rank[r][step]
            assert torch.equal(a.tokens, b.tokens) and a.step_targets == b.step_targets


def test_more_ranks_than_subjects_is_a_data_error():
    store = fake_store([10, 20, 30, 40, 50])  # subjects 1-4 train, 0 tuning
    ds = TrainBatches(store, "train", length=16, budget=48, per_step=1, seed=0)
    with pytest.raises(DataError, match=r"rank\(s\) \[4, 5\] would get no subject.*at most 4 devices"):
        ds.shard(0, 6)
    ev = EvalBatches(store, "tuning", length=16, budget=48)  # one tuning subject of 10 tokens: 1 window
    with pytest.raises(DataError, match="1 validation window.*2 rank"):
        ev.shard(0, 2)


def test_eval_shards_partition_the_split():
    store = fake_store(LENGTHS)
    full = EvalBatches(store, "tuning", length=16, budget=48)
    keys = lambda ev: sorted(tuple(int(v) for v in w) for w in ev.windows)  # noqa: E731
    parts = []
    for r in range(2):
        ev = EvalBatches(store, "tuning", length=16, budget=48)
        ev.shard(r, 2)
        assert len(ev) >= 1
        parts += keys(ev)
    assert sorted(parts) == keys(full) and len(parts) == len(set(parts))
