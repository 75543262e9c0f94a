"""Read a MEDS dataset lazily with polars.

A MEDS root (DESIGN.md §3) holds `data/**/*.parquet` (one row per measurement: `subject_id`, `time`,
`code`, `numeric_value`, optional `text_value`, extra columns allowed) and `metadata/` with
`codes.parquet`, `dataset.json` and `subject_splits.parquet`. Column names and split names come from
the `meds` package so we follow the standard rather than restate it.

This module only reads. `ehrlong.data.validate` checks a root thoroughly and explains what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import meds
import numpy as np
import polars as pl

from ehrlong.errors import DataError

SUBJECT_ID = "subject_id"
TIME = "time"
CODE = "code"
NUMERIC_VALUE = "numeric_value"
TEXT_VALUE = "text_value"
SPLIT = "split"
CORE_COLUMNS = (SUBJECT_ID, TIME, CODE, NUMERIC_VALUE)

SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)  # train / tuning / held_out

# The dtypes ehrlong reads events as. MEDS says float32 for numeric_value and large_string for text.
EVENT_SCHEMA = {
    SUBJECT_ID: pl.Int64,
    TIME: pl.Datetime("us"),
    CODE: pl.String,
    NUMERIC_VALUE: pl.Float32,
    TEXT_VALUE: pl.String,
}


def data_files(root: str | Path) -> list[Path]:
    """All event shards under `root/data`, sorted; a clear error when there are none."""
    root = Path(root)
    data_dir = root / meds.data_subdirectory
    if not root.is_dir():
        raise DataError(f"MEDS root {root} does not exist. Pass data=DIR pointing at a MEDS dataset folder.")
    if not data_dir.is_dir():
        raise DataError(
            f"{root} has no {meds.data_subdirectory}/ folder. A MEDS root holds its events in "
            f"{data_dir}/**/*.parquet; pass the folder that contains data/ and metadata/."
        )
    files = sorted(data_dir.rglob("*.parquet"))
    if not files:
        raise DataError(
            f"{data_dir} holds no .parquet files. MEDS events live in data/**/*.parquet "
            f"(e.g. data/train/0.parquet); check the path or re-run the ETL that should have written them."
        )
    return files


def has_text_value(root: str | Path) -> bool:
    """Whether the shards carry a `text_value` column (the first shard decides; validate checks all)."""
    return TEXT_VALUE in pl.read_parquet_schema(data_files(root)[0])


def scan_events(root: str | Path, with_text: bool = True) -> pl.LazyFrame:
    """All events as a LazyFrame with the core columns (and `text_value`, null when absent), in EVENT_SCHEMA.

    Shards are concatenated in path order; MEDS keeps each subject in one shard, sorted by time.
    """
    frames = []
    for path in data_files(root):
        lf = pl.scan_parquet(path)
        names = lf.collect_schema().names()
        cols = [pl.col(c) for c in CORE_COLUMNS if c in names]
        if NUMERIC_VALUE not in names:
            cols.append(pl.lit(None, dtype=pl.Float32).alias(NUMERIC_VALUE))
        if with_text:
            cols.append(pl.col(TEXT_VALUE) if TEXT_VALUE in names else pl.lit(None, dtype=pl.String).alias(TEXT_VALUE))
        frames.append(lf.select(cols).cast({k: v for k, v in EVENT_SCHEMA.items() if with_text or k != TEXT_VALUE}))
    return pl.concat(frames, how="vertical")


def hash_splits(subject_ids: np.ndarray, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), salt: int = 0) -> np.ndarray:
    """Deterministic split per subject from a hash of its id (stable across runs, machines, versions).

    Uses the splitmix64 finaliser rather than polars' hash, whose values may change between releases.
    Returns an array of split names aligned with `subject_ids`.
    """
    x = subject_ids.astype(np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    edges = np.cumsum(fractions)[:-1]
    return np.asarray(SPLITS)[np.searchsorted(edges, u, side="right")]


def read_splits(root: str | Path) -> pl.DataFrame:
    """`subject_id, split` for every subject with events.

    From `metadata/subject_splits.parquet` when present; otherwise a hash-based 80/10/10 split, so a
    dataset without a split file still splits by subject. Subjects with events but missing from the
    split file are an error (ehrlong never drops them silently); validate reports them in detail.
    """
    root = Path(root)
    path = root / meds.subject_splits_filepath
    if path.is_file():
        splits = pl.read_parquet(path, columns=[SUBJECT_ID, SPLIT]).cast({SUBJECT_ID: pl.Int64, SPLIT: pl.String})
        return splits.unique(SUBJECT_ID, keep="first", maintain_order=True)
    ids = scan_events(root, with_text=False).select(pl.col(SUBJECT_ID).unique()).collect()[SUBJECT_ID].to_numpy()
    ids = np.sort(ids)
    return pl.DataFrame({SUBJECT_ID: ids, SPLIT: hash_splits(ids)}, schema={SUBJECT_ID: pl.Int64, SPLIT: pl.String})


def read_dataset_metadata(root: str | Path) -> dict:
    """`metadata/dataset.json` as a dict ({} when absent)."""
    path = Path(root) / meds.dataset_metadata_filepath
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}). Fix or delete it; it is optional in MEDS.") from None


def dataset_name(root: str | Path) -> str:
    """A short name for tags and summaries: dataset.json's dataset_name, else the folder name."""
    return read_dataset_metadata(root).get("dataset_name") or Path(root).resolve().name
