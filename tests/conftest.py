"""Shared fixtures: a tiny, valid MEDS dataset written into tmp_path.

- `tiny_events`: a fresh DataFrame of 96 events for 10 subjects (ids 101-110) in MEDS dtypes, sorted by
  subject and time. Each subject has a static GENDER row (null time), MEDS_BIRTH, and 1-3 visits of four
  events: ADMISSION, DX//<n>, LAB//GLUCOSE (numeric) and LAB//BP (text only). Subject 101 + i has
  i % 3 + 1 visits, so subjects have 6, 10 or 14 events.
- `make_meds(events=None, splits=None, name="meds") -> Path`: writes a MEDS root under tmp_path/name and
  returns it: one shard per split at data/<split>/0.parquet (events of subjects not in `splits` go to
  data/unassigned/0.parquet), metadata/subject_splits.parquet, metadata/codes.parquet (every code) and
  metadata/dataset.json. `splits` is a DataFrame of subject_id, split; the default puts the first 80% of
  the sorted ids in train, the next 10% in tuning and the rest in held_out.
- `meds_root`: `make_meds()` with the defaults: 96 events, 10 subjects, split 8 / 1 / 1.

Tests that need broken data build on these and overwrite a shard or metadata file.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest

TINY_N_SUBJECTS = 10
TINY_N_EVENTS = 96
TINY_FIRST_ID = 101
TINY_SPLIT_SIZES = {"train": 8, "tuning": 1, "held_out": 1}

EVENT_DTYPES = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
    "text_value": pl.String,
}


def _subject_events(i: int) -> list[dict]:
    sid = TINY_FIRST_ID + i
    birth = dt.datetime(1950 + i, 1 + i, 1)
    rows = [
        {"subject_id": sid, "time": None, "code": "GENDER//F" if i % 2 else "GENDER//M"},
        {"subject_id": sid, "time": birth, "code": meds.birth_code},
    ]
    for visit in range(i % 3 + 1):
        t = dt.datetime(2010 + visit, 1 + i, 1 + visit, 8)
        rows += [
            {"subject_id": sid, "time": t, "code": "ADMISSION"},
            {"subject_id": sid, "time": t, "code": f"DX//{(i + visit) % 4}"},
            {
                "subject_id": sid,
                "time": t + dt.timedelta(hours=2),
                "code": "LAB//GLUCOSE",
                "numeric_value": 90.0 + i,
            },
            {
                "subject_id": sid,
                "time": t + dt.timedelta(hours=3),
                "code": "LAB//BP",
                "text_value": f"12{i}/80",
            },
        ]
    return rows


def build_tiny_events() -> pl.DataFrame:
    rows = [row for i in range(TINY_N_SUBJECTS) for row in _subject_events(i)]
    return pl.DataFrame(rows, schema=EVENT_DTYPES)


def default_splits(events: pl.DataFrame) -> pl.DataFrame:
    ids = events["subject_id"].unique().sort()
    n_train, n_tuning = round(0.8 * len(ids)), round(0.1 * len(ids))
    names = ["train"] * n_train + ["tuning"] * n_tuning + ["held_out"] * (len(ids) - n_train - n_tuning)
    return pl.DataFrame({"subject_id": ids, "split": names})


def write_meds(root: Path, events: pl.DataFrame, splits: pl.DataFrame) -> Path:
    """Write `events` and `splits` as a MEDS root in the exact `meds` schema types; returns root."""
    assigned = events.join(splits, on="subject_id", how="left").with_columns(
        pl.col("split").fill_null("unassigned")
    )
    for (split,), shard in assigned.group_by("split", maintain_order=True):
        path = root / "data" / split / "0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(meds.DataSchema.align(shard.drop("split").to_arrow()), path)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(meds.SubjectSplitSchema.align(splits.to_arrow()), root / meds.subject_splits_filepath)
    codes = events.select(pl.col("code").unique().sort()).with_columns(
        pl.concat_str(pl.lit("the code "), pl.col("code")).alias("description"),
        pl.lit([], dtype=pl.List(pl.String)).alias("parent_codes"),
    )
    pq.write_table(meds.CodeMetadataSchema.align(codes.to_arrow()), root / meds.code_metadata_filepath)
    (root / meds.dataset_metadata_filepath).write_text(
        json.dumps({"dataset_name": "tiny", "meds_version": "0.4.1"})
    )
    return root


@pytest.fixture
def tiny_events() -> pl.DataFrame:
    return build_tiny_events()


@pytest.fixture
def make_meds(tmp_path: Path) -> Callable[..., Path]:
    def make(
        events: pl.DataFrame | None = None, splits: pl.DataFrame | None = None, name: str = "meds"
    ) -> Path:
        events = build_tiny_events() if events is None else events
        splits = default_splits(events) if splits is None else splits
        return write_meds(tmp_path / name, events, splits)

    return make


@pytest.fixture
def meds_root(make_meds: Callable[..., Path]) -> Path:
    return make_meds()
