"""Representations for labels: last-token hidden state at or before prediction_time, nothing later."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from ehrlong.backbones import build_backbone
from ehrlong.config import TrainConfig, parse
from ehrlong.data.store import TokenStore, build_store
from ehrlong.errors import DataError
from ehrlong.evaluation.representations import (
    LoadedRun,
    embed_windows,
    label_windows,
    representations,
)
from ehrlong.module import EHRLitModule

L = 16


@pytest.fixture
def store(meds_root, tmp_path) -> TokenStore:
    """The tiny MEDS fixture (10 subjects, 6-14 events each), tokenized with the cehr recipe."""
    return TokenStore.open(build_store(meds_root, "cehr", tmp_path / "store", progress=False).out)


def _run(store: TokenStore, backbone: str) -> LoadedRun:
    cfg = parse(
        TrainConfig, [f"backbone={backbone}", "model.d_model=16", "model.n_layers=1", f"context_length={L}"]
    )
    torch.manual_seed(0)
    vocab = store.tokenizer.vocab_size
    module = EHRLitModule(build_backbone(cfg, vocab), vocab, cfg.optim, 1, L).eval()
    return LoadedRun(Path("."), cfg, module, store.tokenizer, store.tokenizer.hash)


def _labels_mid_history(store: TokenStore) -> pl.DataFrame:
    """One label per subject, at the time of the token 2/3 into its history."""
    offsets, times = np.asarray(store.offsets), np.asarray(store.times_us)
    cut = offsets[:-1] + (offsets[1:] - offsets[:-1]) * 2 // 3
    return pl.DataFrame(
        {
            "subject_id": np.asarray(store.subject_ids),
            "prediction_time": times[cut].astype("datetime64[us]"),
            "boolean_value": np.arange(len(cut)) % 2 == 0,
        }
    ).with_columns(pl.col("prediction_time").cast(pl.Datetime("us")))


def _with_tokens(store: TokenStore, tokens: np.ndarray) -> TokenStore:
    arrays = {
        "tokens": tokens,
        "times_us": store.times_us,
        "offsets": store.offsets,
        "subject_ids": store.subject_ids,
        "splits": store.splits,
    }
    return TokenStore(store.root, arrays, store.meta)


@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
def test_no_event_after_prediction_time_changes_a_representation(store, backbone):
    run = _run(store, backbone)
    labels = _labels_mid_history(store)
    reps, win = representations(run, store, labels, progress=False)
    assert win.valid.all() and np.isfinite(reps).all()

    # Replace every token after each label's window end by another id: the representations do not move.
    later = np.zeros(len(store.tokens), dtype=bool)
    offsets = np.asarray(store.offsets)
    for (_, _, end), stop in zip(win.windows, offsets[1:], strict=True):
        later[end:stop] = True
    assert later.sum() > 10  # the test changes something
    changed = np.asarray(store.tokens).copy()
    changed[later] = (changed[later] % (store.tokenizer.vocab_size - 5)) + 4
    reps_changed, _ = representations(run, _with_tokens(store, changed), labels, progress=False)
    np.testing.assert_array_equal(reps_changed, reps)

    # The converse, so the check above is not vacuous: a change at or before prediction_time does move it.
    earlier = np.asarray(store.tokens).copy()
    last_in_window = win.windows[:, 2] - 1
    earlier[last_in_window] = (earlier[last_in_window] % (store.tokenizer.vocab_size - 5)) + 4
    reps_earlier, _ = representations(run, _with_tokens(store, earlier), labels, progress=False)
    assert not np.allclose(reps_earlier, reps)


def test_an_event_one_microsecond_after_prediction_time_stays_out():
    # At MIMIC-IV's shifted dates float64 days cannot tell some t from t + 1 us (their last bit is ~1.3 us);
    # find such a t, so that a cut made in days would let the later event in.
    day = 86_400_000_000
    t = (datetime(2180, 5, 17, 8, 30) - datetime(1970, 1, 1)) // timedelta(microseconds=1)
    while (t + 1) / day != t / day:
        t += 1
    arrays = {
        "tokens": np.array([5, 6, 7], dtype=np.int32),
        "times_us": np.array([t - day, t, t + 1], dtype=np.int64),
        "offsets": np.array([0, 3], dtype=np.int64),
        "subject_ids": np.array([42], dtype=np.int64),
        "splits": np.array([0], dtype=np.int8),
    }
    store = TokenStore(Path("in-memory"), arrays, {})
    labels = pl.DataFrame(
        {
            "subject_id": [42, 42, 42],
            "prediction_time": np.array([t - 1, t, t + 1]).astype("datetime64[us]"),
            "boolean_value": [True, False, True],
        }
    )
    win = label_windows(store, labels, length=10)
    assert win.windows[:, 1:].tolist() == [[0, 1], [0, 2], [0, 3]]
    assert store.window(42, np.datetime64(t, "us"), 10)[0].tolist() == [5, 6]


def test_window_is_the_last_L_tokens_at_or_before_prediction_time(store):
    labels = _labels_mid_history(store)
    win = label_windows(store, labels, length=3)
    for (subj, start, end), sid, when in zip(
        win.windows, labels["subject_id"], labels["prediction_time"], strict=True
    ):
        tokens, _ = store.window(sid, np.datetime64(when, "us"), 3)
        np.testing.assert_array_equal(np.asarray(store.tokens[start:end]), tokens)
        assert store.subject_ids[subj] == sid


@pytest.mark.parametrize("backbone", ["mamba", "transformer"])
def test_batching_does_not_change_representations(store, backbone):
    run = _run(store, backbone)
    win = label_windows(store, _labels_mid_history(store), L)
    one_by_one = embed_windows(run.module, store, win.windows, tokens_per_batch=1, progress=False)
    batched = embed_windows(run.module, store, win.windows, tokens_per_batch=10_000, progress=False)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5, rtol=1e-5)


def test_labels_without_history_are_counted_not_dropped(store):
    run = _run(store, "mamba")
    labels = _labels_mid_history(store)
    extra = pl.DataFrame(
        {
            "subject_id": [int(store.subject_ids[0]), 999_999],
            "prediction_time": [datetime(1900, 1, 1), datetime(2020, 1, 1)],  # before any event; unknown
            "boolean_value": [True, False],
        }
    ).with_columns(pl.col("prediction_time").cast(pl.Datetime("us")))
    reps, win = representations(run, store, pl.concat([labels, extra]), progress=False)
    assert len(reps) == len(labels) + 2
    assert (win.n_no_history, win.n_unknown_subject) == (1, 1)
    assert np.isnan(reps[-2:]).all() and np.isfinite(reps[:-2]).all()


def test_tokenizer_mismatch_is_an_error(store):
    run = _run(store, "mamba")
    run.tokenizer_hash = "0" * 64
    with pytest.raises(DataError, match="tokenizer"):
        representations(run, store, _labels_mid_history(store), progress=False)


def test_cached_representations_are_reused_only_for_the_same_weights_length_and_labels(
    store, tmp_path, monkeypatch
):
    import ehrlong.evaluation.representations as rep

    run = _run(store, "mamba")
    run.run_dir = tmp_path / "run"
    run.run_dir.mkdir()
    torch.save({"state_dict": run.module.state_dict()}, run.run_dir / "model.ckpt")
    labels, cache = _labels_mid_history(store), tmp_path / "cache"
    first, _ = representations(run, store, labels, progress=False, cache_dir=cache)
    calls = []
    embed = rep.embed_windows
    monkeypatch.setattr(rep, "embed_windows", lambda *a, **k: calls.append(1) or embed(*a, **k))
    again, _ = representations(run, store, labels, progress=False, cache_dir=cache)
    assert calls == [] and np.array_equal(first, again, equal_nan=True)
    representations(run, store, labels, progress=False, cache_dir=cache, length=L // 2)  # another window
    representations(run, store, labels.head(5), progress=False, cache_dir=cache)  # other labels
    assert len(calls) == 2
    torch.save({"state_dict": run.module.state_dict(), "step": 1}, run.run_dir / "model.ckpt")  # new weights
    representations(run, store, labels, progress=False, cache_dir=cache)
    assert len(calls) == 3
    assert not list(cache.glob("*partial*"))
