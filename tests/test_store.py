"""Token store: build (vectorised == loop reference), atomic writes, memory-mapped windows, cache, CLI."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ehrlong.data import benchmark
from ehrlong.data import store as store_module
from ehrlong.data.__main__ import main as data_main
from ehrlong.data.meds import EVENT_SCHEMA, SPLITS
from ehrlong.data.store import ARRAYS, TokenStore, build_store, ensure_store, shard_chunks, to_us
from ehrlong.errors import DataError
from ehrlong.tokenizer import EventTokenizer, TokenizerRecipe

T0 = datetime(2031, 3, 1, 9, 30)


def write_meds(root: Path, df: pl.DataFrame, split_of: dict[int, str]) -> Path:
    """A MEDS root with one shard per split, written in the order given (not sorted by subject)."""
    for split in SPLITS:
        ids = [s for s, name in split_of.items() if name == split]
        part = df.filter(pl.col("subject_id").is_in(ids))
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        part.write_parquet(root / "data" / split / "0.parquet")
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {"subject_id": list(split_of), "split": list(split_of.values())},
        schema={"subject_id": pl.Int64, "split": pl.String},
    ).write_parquet(root / "metadata" / "subject_splits.parquet")
    return root


def tricky_events(n_subjects: int = 40, seed: int = 0) -> tuple[pl.DataFrame, dict[int, str]]:
    """Statics, ties, text values, non-finite and -0.0 values, codes unseen in train, unsorted rows."""
    rng = np.random.default_rng(seed)
    rows = []
    split_of = {}
    for s in rng.permutation(np.arange(100, 100 + n_subjects)).tolist():
        split_of[s] = "train" if s % 10 < 7 else "tuning" if s % 10 < 9 else "held_out"
        subject = [(s, None, "GENDER//F" if s % 2 else "GENDER//M", None, None)]
        t = T0 + timedelta(days=float(rng.integers(0, 3000)))
        for _ in range(int(rng.integers(1, 60))):
            t += timedelta(minutes=int(rng.choice([0, 0, 0, 15, 60 * 30, 60 * 24 * 8, 60 * 24 * 400])))
            code = (
                f"LAB//{int(rng.integers(0, 6))}" if rng.random() < 0.7 else f"DX//{int(rng.integers(0, 25))}"
            )
            if split_of[s] != "train" and rng.random() < 0.1:
                code = f"NEVER_IN_TRAIN//{int(rng.integers(0, 3))}"
            value = float(rng.choice([rng.normal(), -0.0, 0.0, np.nan, np.inf])) if code < "LAB//3" else None
            text = (
                str(rng.choice(["Normal", "Abnormal", "127/48"]))
                if code in ("LAB//2", "LAB//4", "DX//3")
                else None
            )
            subject.append((s, t, code, value, text))
        if rng.random() < 0.3:  # shuffle some subjects' rows: the encoder must sort them
            subject = [subject[i] for i in rng.permutation(len(subject))]
        rows += subject
    rows.append((999, None, "GENDER//F", None, None))  # no timed event: excluded and reported
    split_of[999] = "train"
    return pl.DataFrame(rows, schema=EVENT_SCHEMA, orient="row"), split_of


RECIPE = TokenizerRecipe(name="test", min_code_count=3, min_text_count=2, n_bins=5, n_probe_tokens=4)


@pytest.fixture(scope="module")
def tricky_root(tmp_path_factory) -> Path:
    df, split_of = tricky_events()
    return write_meds(tmp_path_factory.mktemp("meds"), df, split_of)


@pytest.fixture(scope="module")
def store_dir(tricky_root, tmp_path_factory) -> Path:
    return build_store(tricky_root, RECIPE, tmp_path_factory.mktemp("stores") / "fast", progress=False).out


def test_loop_reference_builds_the_identical_store(tricky_root, store_dir, tmp_path):
    loop = build_store(tricky_root, RECIPE, tmp_path / "loop", implementation="loop", progress=False).out
    for name in ARRAYS:
        a, b = np.load(store_dir / f"{name}.npy"), np.load(loop / f"{name}.npy")
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    assert benchmark.store_differences(store_dir, loop) == []
    meta = json.loads((store_dir / "meta.json").read_text())
    report = meta["encode_report"]
    # The data really exercised every path the two implementations must agree on.
    assert not report["input_sorted"] and report["excluded_subjects"] == [999]
    assert report["n_static_events"] > 0 and report["n_text_tokens"] > 0 and report["n_nonfinite_numeric"] > 0
    assert report["unk"]["held_out"]["codes"] and report["n_gap_tokens"] > 0


def test_encoding_in_shard_chunks_gives_the_store_of_one_piece(tmp_path, monkeypatch):
    """build_store encodes groups of whole shards (store.CHUNK_EVENTS) to bound memory: the store must be
    the one a single encode gives, also when a subject spreads over two shards that are not neighbours."""
    df, split_of = tricky_events(seed=3)
    ids = sorted(split_of)
    spread = ids[0]  # half its events in shard 0, half in shard 2
    shard_of = {s: i % 4 for i, s in enumerate(ids)}
    root = write_meds(tmp_path / "meds", df, split_of)
    for f in (root / "data").rglob("*.parquet"):
        f.unlink()
    rows = df.with_row_index("row").with_columns(
        pl.col("subject_id").replace_strict(shard_of, return_dtype=pl.Int64).alias("shard")
    )
    rows = rows.with_columns(
        pl.when((pl.col("subject_id") == spread) & (pl.col("row") % 2 == 1))
        .then(2)
        .otherwise(pl.col("shard"))
        .alias("shard")
    )
    files = []
    for k in range(4):
        files.append(root / "data" / f"{k}.parquet")
        rows.filter(pl.col("shard") == k).drop("row", "shard").write_parquet(files[-1])
    assert rows.filter(pl.col("subject_id") == spread)["shard"].unique().sort().to_list() == [0, 2]

    assert shard_chunks(files, max_events=1) == [[files[0], files[2]], [files[1]], [files[3]]]
    assert shard_chunks(files, max_events=10**9) == [files]
    sizes = [pl.read_parquet(f).height for f in files]
    assert shard_chunks(files, max_events=sizes[0] + sizes[2] + sizes[1]) == [files[:3], [files[3]]]

    whole = build_store(root, RECIPE, tmp_path / "whole", progress=False)
    monkeypatch.setattr(store_module, "CHUNK_EVENTS", 1)  # one chunk per shard group: 3 encodes
    chunked = build_store(root, RECIPE, tmp_path / "chunked", progress=False)
    assert benchmark.store_differences(whole.out, chunked.out) == []
    a, b = whole.meta["encode_report"], chunked.meta["encode_report"]
    # input_sorted says whether any piece needed a re-sort, so it may differ; every count must not.
    assert a.pop("input_sorted") is False
    b.pop("input_sorted")
    assert a == b and a["unk"]["held_out"]["codes"] and a["excluded_subjects"] == [999]


def test_store_differences_notices_a_changed_token(store_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(store_dir, other)
    tokens = np.load(other / "tokens.npy")
    tokens[-1] += 1
    np.save(other / "tokens.npy", tokens)
    n = len(tokens)
    assert benchmark.store_differences(store_dir, other) == [f"tokens.npy (int32[{n}] vs int32[{n}])"]


def test_open_memory_maps_consistent_arrays(store_dir, tricky_root):
    store = TokenStore.open(store_dir)
    assert isinstance(store.tokens, np.memmap) and store.tokens.dtype == np.int32
    assert store.times_us.dtype == np.int64 and store.offsets[0] == 0 and store.offsets[-1] == store.n_tokens
    assert np.all(np.diff(store.subject_ids) > 0) and 999 not in store.subject_ids
    meta = store.meta
    assert meta["counts"]["tokens"] == store.n_tokens and meta["tokenizer"]["hash"] == store.tokenizer.hash
    _, split_of = tricky_events()
    for split in SPLITS:
        ids = store.subject_ids[store.split_indices(split)].tolist()
        assert ids == sorted(s for s, name in split_of.items() if name == split and s != 999)
    # Times never decrease within a subject.
    for i in range(store.n_subjects):
        assert np.all(np.diff(store.times_us[store.subject_slice(i)]) >= 0)


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc/self/status")
def test_dropping_resident_pages_frees_them_and_keeps_the_data(store_dir, tmp_path):
    """predict calls this after each batch so that a pass over a large cohort does not keep every page
    of the store it touched counted as this process's memory."""
    store = TokenStore.open(store_dir)
    n = 8 * 2**20  # 64 MiB of times: far above what the rest of the process touches meanwhile
    np.save(tmp_path / "times_us.npy", np.arange(n, dtype=np.int64))
    store.times_us = np.load(tmp_path / "times_us.npy", mmap_mode="r")
    before = _rss_file_kib()
    total = int(np.sum(store.times_us))  # touches every page
    touched = _rss_file_kib()
    store.drop_resident_pages()
    dropped = _rss_file_kib()
    assert touched - before > 48 * 1024 and touched - dropped > 48 * 1024, (before, touched, dropped)
    assert int(np.sum(store.times_us)) == total == n * (n - 1) // 2  # read back from the file, unchanged
    assert store.tokens[: store.n_tokens].tolist() == TokenStore.open(store_dir).tokens.tolist()


def test_tokenizer_is_fit_on_train_subjects_only(store_dir):
    store = TokenStore.open(store_dir)
    assert not any(c.startswith("NEVER_IN_TRAIN") for c in store.tokenizer.codes)
    unk = store.meta["encode_report"]["unk"]
    assert unk["train"]["unk"] == 0 and unk["held_out"]["unk"] + unk["tuning"]["unk"] > 0


def test_window_returns_the_last_tokens_at_or_before_the_cutoff(store_dir):
    store = TokenStore.open(store_dir)
    i = int(np.argmax(np.diff(store.offsets)))  # the longest subject
    sid, s = int(store.subject_ids[i]), store.subject_slice(i)
    all_tokens, all_times = np.asarray(store.tokens[s]), np.asarray(store.times_us[s])
    # Every event time, 1 us either side of each (exact: an event 1 us after the cut stays out), and
    # before the first / after the last.
    stamps = np.unique(all_times)
    cuts = np.unique(np.r_[stamps, stamps - 1, stamps + 1, all_times[0] - 10**9, all_times[-1] + 10**9])
    for cut in cuts.tolist():
        for length in (1, 3, 10, 10_000):
            tokens, times = store.window(sid, cut, length)
            keep = all_times <= cut
            assert tokens.tolist() == all_tokens[keep][-length:].tolist()
            assert times.tolist() == all_times[keep][-length:].tolist()
            assert len(times) == 0 or times.max() <= cut
    # A cut-off given as a datetime means the same instant as its microseconds.
    cut = int(all_times[len(all_times) // 2])
    as_datetime = datetime(1970, 1, 1) + timedelta(microseconds=cut)
    assert to_us(as_datetime) == cut == to_us(np.datetime64(as_datetime, "us"))
    with pytest.raises(TypeError, match="microseconds"):
        to_us(cut / 86_400_000_000)  # float days are refused, not guessed
    np.testing.assert_array_equal(store.window(sid, as_datetime, 5)[0], store.window(sid, cut, 5)[0])
    np.testing.assert_array_equal(
        store.window(sid, np.datetime64(as_datetime, "us"), 5)[0], store.window(sid, cut, 5)[0]
    )
    with pytest.raises(DataError, match="not in token store"):
        store.window(999, cut, 5)


def test_window_never_shows_a_gap_token_for_a_later_event(store_dir):
    store = TokenStore.open(store_dir)
    gaps = set(store.tokenizer.gap_ids.tolist())
    for i in range(store.n_subjects):
        s = store.subject_slice(i)
        for cut in np.unique(store.times_us[s])[:-1]:
            window, _ = store.window(int(store.subject_ids[i]), cut, 10_000)
            assert window[-1] not in gaps  # a gap token is stamped with the event it announces


def test_failed_write_leaves_nothing_and_keeps_an_existing_store(
    tricky_root, store_dir, tmp_path, monkeypatch
):
    def broken_save(self, path):
        Path(path).write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(EventTokenizer, "save", broken_save)
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        build_store(tricky_root, RECIPE, fresh, progress=False)
    assert not fresh.exists() and list(tmp_path.iterdir()) == []
    # Replacing an existing store: the old one survives a failed rebuild untouched.
    existing = tmp_path / "existing"
    shutil.copytree(store_dir, existing)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        build_store(tricky_root, RECIPE, existing, progress=False)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]


def test_refuses_to_overwrite_a_folder_that_is_not_a_store(tricky_root, tmp_path):
    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a token store"):
        build_store(tricky_root, RECIPE, mine, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_subjects_missing_from_the_split_file_are_an_error(tmp_path):
    df, split_of = tricky_events(n_subjects=6)
    root = write_meds(tmp_path / "meds", df, split_of)
    pl.DataFrame({"subject_id": list(split_of)[1:], "split": list(split_of.values())[1:]}).write_parquet(
        root / "metadata" / "subject_splits.parquet"
    )
    with pytest.raises(DataError, match=f"not in the split table: {list(split_of)[0]}"):
        build_store(root, RECIPE, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_ensure_store_builds_once_then_reuses(tricky_root, tmp_path, monkeypatch):
    monkeypatch.setenv("EHRLONG_CACHE", str(tmp_path / "cache"))
    first = ensure_store(tricky_root, "clmbr", progress=False)
    assert first.is_relative_to(tmp_path / "cache" / "stores") and (first / "meta.json").is_file()
    stamp = (first / "tokens.npy").stat().st_mtime_ns
    assert ensure_store(tricky_root, "clmbr", progress=False) == first
    assert (first / "tokens.npy").stat().st_mtime_ns == stamp
    store = TokenStore.open(first)
    assert store.meta["counts"]["gap_tokens"] == 0 and store.meta["tokenizer"]["recipe"]["name"] == "clmbr"
    assert ensure_store(tricky_root, "cehr", progress=False) != first


def test_tokenize_command_prints_a_summary(tricky_root, tmp_path, capsys):
    out = tmp_path / "store"
    assert data_main(["tokenize", f"data={tricky_root}", "tokenizer=cehr", f"out={out}"]) == 0
    text = capsys.readouterr().out
    assert "UNK held_out" in text and "NEVER_IN_TRAIN" in text and f"wrote {out}" in text
    assert "excluded" in text and "re-sorted" in text
    meta = json.loads((out / "meta.json").read_text())
    assert TokenStore.open(out).n_subjects == meta["counts"]["subjects"]


def test_benchmark_command_runs_both_variants_and_finds_them_identical(tricky_root, capsys):
    assert data_main(["benchmark", f"data={tricky_root}", "rounds=1"]) == 0
    text = capsys.readouterr().out
    assert "stores identical" in text and "speed-up" in text
