"""Read a MEDS dataset lazily with polars.

A MEDS root (DESIGN.md §3) holds `data/**/*.parquet` (one row per measurement: `subject_id`, `time`,
`code`, `numeric_value`, optional `text_value`, extra columns allowed) and `metadata/` with
`codes.parquet`, `dataset.json` and `subject_splits.parquet`. Column names and split names come from
the `meds` package so we follow the standard rather than restate it.

This module only reads. `ehrlong.data.validate` checks a root thoroughly and explains what is wrong;
reading still checks what it must to read faithfully (issue 8): every shard's parquet footer (a file that
is not parquet or was cut short), its required columns and their types, each an error naming the file,
the column and the fix, before polars is asked for a single value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

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


REQUIRED_COLUMNS = (SUBJECT_ID, TIME, CODE)


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


# On-disk types read into the MEDS type by a cast that keeps every value (float64 -> float32 rounds, as
# MEDS prescribes float32; a value beyond float32's range then shows up as non-finite).
READABLE_TYPES: dict[str, Callable[[pa.DataType], bool]] = {
    SUBJECT_ID: pa.types.is_integer,
    TIME: lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t),
    CODE: _is_string,
    NUMERIC_VALUE: lambda t: pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t),
    TEXT_VALUE: lambda t: _is_string(t) or pa.types.is_null(t),
    SPLIT: _is_string,
}

TYPE_FIXES = {
    SUBJECT_ID: "write integer subject ids (int64)",
    TIME: "parse times to timestamp[us] in the ETL (null only for static events)",
    CODE: "write codes as strings",
    NUMERIC_VALUE: "write numeric values as float32 (null where there is none), words in text_value",
    TEXT_VALUE: "write text values as strings",
    SPLIT: "write split names as strings (train, tuning, held_out)",
}


def read_footer(path: str | Path) -> pq.FileMetaData:
    """A parquet file's footer (schema, row count), or a DataError naming the file: one that is not
    parquet, or was cut short by an interrupted copy, has no readable footer."""
    try:
        return pq.read_metadata(path)
    except (pa.ArrowException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{path} is not a readable parquet file ({first}). It may be truncated by an interrupted copy "
            "or download, or not be parquet at all; copy it again or re-run the ETL that wrote it."
        ) from None


def read_parquet_schema(path: str | Path) -> pa.Schema:
    """The arrow schema of a parquet file; DataError naming the file when it cannot be read."""
    return read_footer(path).schema.to_arrow_schema()


def check_columns(path: str | Path, schema: pa.Schema, required: tuple[str, ...], what: str) -> None:
    """DataError for a missing required column or a column of a type ehrlong cannot read as MEDS."""
    present = ", ".join(schema.names)
    for col in required:
        if col not in schema.names:
            raise DataError(
                f"{path}: required column {col!r} is missing (columns present: {present}). {what} needs "
                f"{', '.join(required)}; rename or add the column in the ETL (python -m ehrlong.data "
                "validate data=ROOT checks a whole dataset)."
            )
    for col in schema.names:
        readable = READABLE_TYPES.get(col)
        if readable is not None and not readable(schema.field(col).type):
            raise DataError(
                f"{path}: column {col!r} has type {schema.field(col).type}, which cannot be read as its MEDS "
                f"type; {TYPE_FIXES[col]}."
            )


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
        others = sorted(p for p in data_dir.rglob("*") if p.is_file())
        found = f" It holds {len(others)} other files (e.g. {others[0]})." if others else " It is empty."
        raise DataError(
            f"{data_dir} holds no .parquet files.{found} MEDS events live in data/**/*.parquet "
            f"(e.g. data/train/0.parquet); check the path or re-run the ETL that should have written them."
        )
    return files


def has_text_value(root: str | Path) -> bool:
    """Whether the shards carry a `text_value` column (the first shard decides; validate checks all)."""
    return TEXT_VALUE in read_parquet_schema(data_files(root)[0]).names


def scan_shard(path: str | Path, with_text: bool = True) -> pl.LazyFrame:
    """One shard's core columns in EVENT_SCHEMA, in file order; absent optional columns come back null.

    The footer is read here, eagerly: an unreadable file, a missing required column or an unreadable
    column type is a DataError naming the file now, not a polars error when the frame is collected."""
    schema = read_parquet_schema(path)
    check_columns(path, schema, REQUIRED_COLUMNS, "A MEDS data shard")
    lf = pl.scan_parquet(path)
    names = schema.names
    cols = [pl.col(c) for c in (SUBJECT_ID, TIME, CODE) if c in names]
    optional = (NUMERIC_VALUE, TEXT_VALUE) if with_text else (NUMERIC_VALUE,)
    cols += [pl.col(c) if c in names else pl.lit(None).alias(c) for c in optional]
    return lf.select(cols).cast({c: EVENT_SCHEMA[c] for c in (*CORE_COLUMNS, *optional[1:])})


def out_of_order() -> pl.Expr:
    """Per row: True where the row breaks MEDS order after the row before it.

    MEDS order (meds.DataSchema docs): a subject's rows are contiguous within a shard and sorted by time;
    we also want static (null-time) rows first, as the MEDS ETLs write them. A row is out of order when
    it goes back in time within its subject, or starts a subject that appeared earlier in the shard.
    """
    sid, t = pl.col(SUBJECT_ID), pl.col(TIME)
    same_subject = sid == sid.shift(1)
    time_goes_back = (t < t.shift(1)) | (t.is_null() & t.shift(1).is_not_null())
    subject_returns = (sid != sid.shift(1)) & ~sid.is_first_distinct()
    return ((same_subject & time_goes_back) | subject_returns).fill_null(False)


def _sort(events: pl.LazyFrame) -> pl.LazyFrame:
    return events.sort([SUBJECT_ID, TIME], nulls_last=False, maintain_order=True)


def _in_meds_order(shards: list[pl.LazyFrame]) -> list[pl.LazyFrame]:
    """The shards, each sorted only if it is out of order; one global sort if subjects span shards."""
    checks = pl.collect_all(
        [
            s.select(out_of_order().any().alias("unsorted"), pl.col(SUBJECT_ID).unique().implode())
            for s in shards
        ]
    )
    ids = pl.concat([c[SUBJECT_ID][0] for c in checks])
    # A subject in two shards breaks MEDS (validate warns); only a global sort makes its events contiguous.
    if ids.is_duplicated().any():
        return [_sort(pl.concat(shards, how="vertical"))]
    return [_sort(s) if c["unsorted"][0] else s for s, c in zip(shards, checks, strict=True)]


def scan_events(root: str | Path, with_text: bool = True, sort: bool = True) -> pl.LazyFrame:
    """All events as a LazyFrame with the core columns (and `text_value`, null when absent), in EVENT_SCHEMA.

    With `sort=True` (the default) every consumer gets MEDS order even when the files are not in it:
    each subject's events are contiguous, static (null-time) events first, then by time; events that
    share a timestamp keep their file order. Subjects come in shard path order and, within a shard, in
    file order (by subject_id for a shard that had to be sorted, and throughout when a subject spans
    shards, which MEDS forbids). MEDS ETLs write shards in this order, so this costs one read of
    subject_id and time, and a sort only where a shard needs it (sorting 10M events is several times
    slower than reading them). `python -m ehrlong.data validate` says which shards were out of order.
    `sort=False` returns the shards as they are on disk, in path order.
    """
    files = data_files(root)
    shards = [scan_shard(path, with_text) for path in files]
    if not sum(read_footer(p).num_rows for p in files):
        raise DataError(
            f"the {len(files)} shard(s) under {Path(root) / meds.data_subdirectory} hold no events. Check the "
            "path, or re-run the ETL that should have written them."
        )
    if sort:
        shards = _in_meds_order(shards)
    return pl.concat(shards, how="vertical")


def hash_splits(
    subject_ids: np.ndarray, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), salt: int = 0
) -> np.ndarray:
    """Deterministic split per subject from a hash of its id (stable across runs, machines, versions).

    Uses the splitmix64 finaliser rather than polars' hash, whose values may change between releases.
    Returns an array of split names aligned with `subject_ids`.
    """
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = subject_ids.astype(np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)
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
        check_columns(path, read_parquet_schema(path), (SUBJECT_ID, SPLIT), "A MEDS split file")
        try:
            splits = pl.read_parquet(path, columns=[SUBJECT_ID, SPLIT]).cast(
                {SUBJECT_ID: pl.Int64, SPLIT: pl.String}
            )
        except (pl.exceptions.ComputeError, OSError) as e:  # a footer that reads, pages that do not
            raise DataError(
                f"{path} could not be read ({str(e).splitlines()[0]}). The file may be corrupt; write it "
                "again, or delete it to split subjects 80/10/10 by a hash of their id."
            ) from None
        return splits.unique(SUBJECT_ID, keep="first", maintain_order=True)
    ids = (
        scan_events(root, with_text=False, sort=False)
        .select(pl.col(SUBJECT_ID).unique())
        .collect()[SUBJECT_ID]
        .to_numpy()
    )
    ids = np.sort(ids)
    return pl.DataFrame(
        {SUBJECT_ID: ids, SPLIT: hash_splits(ids)}, schema={SUBJECT_ID: pl.Int64, SPLIT: pl.String}
    )


def read_dataset_metadata(root: str | Path) -> dict:
    """`metadata/dataset.json` as a dict ({} when absent)."""
    path = Path(root) / meds.dataset_metadata_filepath
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON ({e}). Fix or delete it; it is optional in MEDS."
        ) from None


def dataset_name(root: str | Path) -> str:
    """A short name for tags and summaries: dataset.json's dataset_name, else the folder name."""
    return read_dataset_metadata(root).get("dataset_name") or Path(root).resolve().name
