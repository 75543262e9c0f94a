"""MEDS validation (issue 2, item 3): one test per bad-input case, the summary, and the CLI."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_N_EVENTS, TINY_N_SUBJECTS, TINY_SPLIT_SIZES, default_splits

from ehrlong.data.meds import out_of_order, scan_events
from ehrlong.data.validate import Args, format_report, run, validate
from ehrlong.errors import ConfigError, DataError

TODAY = dt.date(2024, 6, 1)  # the tiny data end in 2012; a fixed day keeps the future check deterministic


def shard(root: Path, split: str = "train") -> Path:
    return root / "data" / split / "0.parquet"


def rewrite(path: Path, frame: pl.DataFrame) -> None:
    frame.write_parquet(path)


def error_of(root: Path) -> str:
    with pytest.raises(DataError) as e:
        validate(root, today=TODAY)
    return str(e.value)


def with_row(frame: pl.DataFrame, row: int, **values) -> pl.DataFrame:
    """`frame` with the given columns set at one row index."""
    idx = pl.int_range(pl.len()) == row
    return frame.with_columns(
        pl.when(idx).then(pl.lit(v, dtype=frame.schema[c])).otherwise(pl.col(c)).alias(c)
        for c, v in values.items()
    )


# ---------------------------------------------------------------------------------------------------
# A valid dataset
# ---------------------------------------------------------------------------------------------------


def test_valid_dataset_counts(meds_root, tiny_events):
    r = validate(meds_root, today=TODAY)
    assert (r.n_events, r.n_subjects, r.n_shards) == (TINY_N_EVENTS, TINY_N_SUBJECTS, 3)
    assert r.n_codes == tiny_events["code"].n_unique()
    assert r.n_static == TINY_N_SUBJECTS  # one GENDER row each
    assert r.n_numeric == tiny_events["numeric_value"].is_not_null().sum()
    assert r.n_text == tiny_events["text_value"].is_not_null().sum()
    assert r.split_subjects == TINY_SPLIT_SIZES
    assert sum(r.split_events.values()) == TINY_N_EVENTS
    assert r.split_events["tuning"] == tiny_events.filter(pl.col("subject_id") == 109).height
    q = r.events_per_subject
    assert (q["min"], q["median"], q["max"], q["mean"]) == (6, 10, 14, TINY_N_EVENTS / TINY_N_SUBJECTS)
    assert r.first_time == dt.datetime(1950, 1, 1) and r.last_time == tiny_events["time"].max()
    assert not r.was_unsorted and not r.warnings and not r.excluded
    assert r.name == "tiny"


def test_summary_fits_one_screen(meds_root):
    text = format_report(validate(meds_root, today=TODAY))
    assert len(text.splitlines()) <= 25
    assert "96" in text and "train" in text and "held_out" in text and text.endswith("OK: valid MEDS")


# ---------------------------------------------------------------------------------------------------
# Fatal: layout and files
# ---------------------------------------------------------------------------------------------------


def test_missing_data_folder(tmp_path):
    (tmp_path / "metadata").mkdir()
    msg = error_of(tmp_path)
    assert str(tmp_path) in msg and "data/ folder" in msg


def test_no_parquet_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "events.csv").write_text("subject_id,time,code\n")
    msg = error_of(tmp_path)
    assert "no .parquet files" in msg and "events.csv" in msg


def test_shards_without_events(meds_root, tiny_events):
    for split in ("train", "tuning", "held_out"):
        rewrite(shard(meds_root, split), tiny_events.clear())
    msg = error_of(meds_root)
    assert "3 shards" in msg and str(meds_root / "data") in msg and "hold no events" in msg


def test_file_that_is_not_parquet(meds_root):
    shard(meds_root, "tuning").write_text("subject_id,time,code\n1,2020-01-01,A\n")
    msg = error_of(meds_root)
    assert str(shard(meds_root, "tuning")) in msg and "not a readable parquet file" in msg


def test_truncated_parquet(meds_root):
    path = shard(meds_root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = error_of(meds_root)
    assert str(path) in msg and "truncated" in msg


# ---------------------------------------------------------------------------------------------------
# Fatal: columns and values
# ---------------------------------------------------------------------------------------------------


def test_missing_column(meds_root):
    path = shard(meds_root)
    rewrite(path, pl.read_parquet(path).drop("code"))
    msg = error_of(meds_root)
    assert str(path) in msg and "'code' is missing" in msg and "subject_id, time" in msg


def test_mistyped_column(meds_root):
    path = shard(meds_root, "held_out")
    rewrite(path, pl.read_parquet(path).with_columns(pl.col("time").dt.strftime("%Y-%m-%d")))
    msg = error_of(meds_root)
    assert str(path) in msg and "'time'" in msg and "type" in msg and "timestamp[us]" in msg


def test_castable_types_are_read_and_noted(meds_root):
    path = shard(meds_root)
    rewrite(path, pl.read_parquet(path).cast({"subject_id": pl.Int32, "numeric_value": pl.Float64}))
    r = validate(meds_root, today=TODAY)
    assert r.n_events == TINY_N_EVENTS
    assert any("'subject_id' is int32" in n and str(path) in n for n in r.notes)
    assert scan_events(meds_root).collect().schema["subject_id"] == pl.Int64


def test_null_subject_id(meds_root):
    path = shard(meds_root)
    rewrite(path, with_row(pl.read_parquet(path), 17, subject_id=None))
    msg = error_of(meds_root)
    assert str(path) in msg and "'subject_id' has 1 null value" in msg and "first at row 17:" in msg


def test_null_code(meds_root):
    path = shard(meds_root)
    frame = pl.read_parquet(path)
    rewrite(path, with_row(with_row(frame, 5, code=None), 9, code=None))
    msg = error_of(meds_root)
    subject = frame["subject_id"][5]
    assert str(path) in msg and "'code' has 2 null values" in msg
    assert f"first at row 5: subject {subject}" in msg


def test_non_finite_numeric_value(meds_root):
    path = shard(meds_root)
    frame = pl.read_parquet(path)
    rows = frame.with_row_index().filter(pl.col("numeric_value").is_not_null())["index"]
    rewrite(
        path,
        with_row(with_row(frame, rows[0], numeric_value=float("nan")), rows[1], numeric_value=float("inf")),
    )
    msg = error_of(meds_root)
    assert str(path) in msg and "'numeric_value' has 2 non-finite values" in msg
    assert (
        f"first at row {rows[0]}: subject {frame['subject_id'][rows[0]]}" in msg
        and "numeric_value nan" in msg
    )


def test_several_problems_are_all_named(meds_root):
    train, tuning = shard(meds_root), shard(meds_root, "tuning")
    rewrite(train, with_row(pl.read_parquet(train), 3, code=None))
    rewrite(tuning, with_row(pl.read_parquet(tuning), 4, subject_id=None))
    msg = error_of(meds_root)
    assert str(train) in msg and str(tuning) in msg


# ---------------------------------------------------------------------------------------------------
# Fatal: the split file
# ---------------------------------------------------------------------------------------------------


def test_split_file_naming_unknown_subjects(make_meds, tiny_events):
    splits = pl.concat([default_splits(tiny_events), pl.DataFrame({"subject_id": [999], "split": ["train"]})])
    root = make_meds(splits=splits)
    msg = error_of(root)
    assert (
        str(root / meds.subject_splits_filepath) in msg and "1 subject without events" in msg and "999" in msg
    )


def test_subject_in_two_splits(make_meds, tiny_events):
    splits = pl.concat(
        [default_splits(tiny_events), pl.DataFrame({"subject_id": [102], "split": ["held_out"]})]
    )
    root = make_meds(splits=splits)
    msg = error_of(root)
    assert str(root / meds.subject_splits_filepath) in msg
    assert "subject 102 in held_out and train" in msg


def test_subjects_missing_from_split_file(make_meds, tiny_events):
    splits = default_splits(tiny_events).filter(pl.col("subject_id") != 104)
    msg = error_of(make_meds(splits=splits))
    assert "1 subject with events but not in the split file" in msg and "104" in msg


def test_split_file_with_null_split(meds_root):
    path = meds_root / meds.subject_splits_filepath
    table = pq.read_table(path)
    names = table.column("split").to_pylist()
    names[2] = None
    pq.write_table(table.set_column(1, "split", pa.array(names, pa.string())), path)
    msg = error_of(meds_root)
    assert str(path) in msg and "'split' has 1 null value" in msg and "row 2" in msg


# ---------------------------------------------------------------------------------------------------
# Reported, not fatal
# ---------------------------------------------------------------------------------------------------


def test_future_events_are_warned_and_kept(make_meds, tiny_events):
    events = with_row(tiny_events, 20, time=dt.datetime(2090, 1, 1))
    subject = events["subject_id"][20]
    r = validate(make_meds(events=events.sort("subject_id", "time", nulls_last=False)), today=TODAY)
    assert r.n_events == TINY_N_EVENTS
    (warning,) = [w for w in r.warnings if "after 2024-06-01" in w]
    assert warning.startswith("1 event of 1 subject dated after") and f"subject {subject}" in warning


def test_date_shifted_data_get_a_note_not_a_warning(meds_root):
    r = validate(meds_root, today=dt.date(1900, 1, 1))
    assert not r.warnings
    assert any("look shifted" in n and f"{TINY_N_EVENTS - TINY_N_SUBJECTS} of" in n for n in r.notes)


def test_events_before_birth_are_warned_and_kept(make_meds, tiny_events):
    # Subject 101 was born 1950-01-01; a lab in 1949 precedes it.
    early = pl.DataFrame(
        {
            "subject_id": [101],
            "time": [dt.datetime(1949, 5, 1)],
            "code": ["LAB//GLUCOSE"],
            "numeric_value": [1.0],
        },
        schema={k: tiny_events.schema[k] for k in ("subject_id", "time", "code", "numeric_value")},
    )
    events = pl.concat([tiny_events, early], how="diagonal").sort("subject_id", "time", nulls_last=False)
    r = validate(make_meds(events=events), today=TODAY)
    assert r.n_events == TINY_N_EVENTS + 1
    (warning,) = [w for w in r.warnings if "before" in w]
    assert (
        warning.startswith("1 event of 1 subject dated before")
        and "subject 101" in warning
        and "1949-05-01" in warning
    )


def assert_read_in_meds_order(root: Path) -> None:
    """scan_events gives every event once, each subject contiguous, static rows first, then by time."""
    events = scan_events(root).collect()
    on_disk = scan_events(root, sort=False).collect()
    key = ["subject_id", "time", "code"]
    assert events.sort(key, nulls_last=False).equals(on_disk.sort(key, nulls_last=False))
    assert not events.select(out_of_order().any()).item()
    runs = events.select((pl.col("subject_id") != pl.col("subject_id").shift(1)).fill_null(True).sum()).item()
    assert runs == events["subject_id"].n_unique()
    firsts = events.filter(pl.col("subject_id") != pl.col("subject_id").shift(1).fill_null(-1))
    assert firsts["time"].is_null().all()  # every tiny subject has a static GENDER row, read first


def test_unsorted_shard_is_reported_and_read_sorted(meds_root):
    path = shard(meds_root)
    frame = pl.read_parquet(path)
    rewrite(path, frame.reverse())
    r = validate(meds_root, today=TODAY)
    assert r.was_unsorted and r.unsorted_shards == [str(path)]
    assert any(str(path) in n and "sorts events by subject and time on read" in n for n in r.notes)
    assert "1 shard out of order (sorted on read)" in format_report(r)
    assert_read_in_meds_order(meds_root)


def test_interleaved_subjects_count_as_unsorted(meds_root):
    path = shard(meds_root)
    frame = pl.read_parquet(path)
    rewrite(path, frame.sort("time", nulls_last=False, maintain_order=True))  # subjects interleave
    assert validate(meds_root, today=TODAY).unsorted_shards == [str(path)]
    assert_read_in_meds_order(meds_root)


def test_other_split_names_are_counted_as_excluded(make_meds, tiny_events):
    splits = default_splits(tiny_events).with_columns(
        pl.when(pl.col("subject_id") == 110)
        .then(pl.lit("external"))
        .otherwise(pl.col("split"))
        .alias("split")
    )
    r = validate(make_meds(splits=splits), today=TODAY)
    subject_110 = tiny_events.filter(pl.col("subject_id") == 110).height
    assert r.excluded == {"subjects in other splits": 1, "events of those subjects": subject_110}
    assert any("external" in w for w in r.warnings)


def test_subject_in_two_shards_is_warned(meds_root):
    train, tuning = shard(meds_root), shard(meds_root, "tuning")
    moved = pl.read_parquet(train).filter(pl.col("subject_id") == 101)
    rewrite(train, pl.read_parquet(train).filter(pl.col("subject_id") != 101))
    rewrite(tuning, pl.concat([pl.read_parquet(tuning), moved.tail(3)]))
    pl.concat([moved.head(moved.height - 3)]).write_parquet(train.parent / "1.parquet")
    r = validate(meds_root, today=TODAY)
    assert r.n_events == TINY_N_EVENTS
    assert any("1 subject with events in more than one shard (e.g. 101)" in w for w in r.warnings)
    assert_read_in_meds_order(meds_root)


def test_bad_code_metadata_is_a_warning(meds_root):
    path = meds_root / meds.code_metadata_filepath
    pl.DataFrame({"code": [1, 2]}).write_parquet(path)
    r = validate(meds_root, today=TODAY)
    assert any(str(path) in w and "'code'" in w and "ignores" in w for w in r.warnings)


def test_codes_missing_from_code_metadata_are_a_note(meds_root):
    path = meds_root / meds.code_metadata_filepath
    codes = pq.read_table(path)
    pq.write_table(codes.slice(0, 4), path)
    r = validate(meds_root, today=TODAY)
    assert not r.warnings
    assert any("describes 4 of the 10 codes" in n for n in r.notes)


def test_without_split_file_subjects_are_hash_split(meds_root):
    (meds_root / meds.subject_splits_filepath).unlink()
    r = validate(meds_root, today=TODAY)
    assert "hash" in r.split_source
    assert sum(r.split_subjects.values()) == TINY_N_SUBJECTS
    assert set(r.split_subjects) <= set(TINY_SPLIT_SIZES)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def test_run_prints_summary(meds_root, capsys):
    assert run(Args(data=str(meds_root), now="2024-06-01")) == 0
    out = capsys.readouterr().out
    assert "subjects       10" in out and "OK: valid MEDS" in out


def test_bad_now_is_a_config_error(meds_root):
    with pytest.raises(ConfigError, match="YYYY-MM-DD"):
        run(Args(data=str(meds_root), now="June"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ehrlong.data", "validate", *args], capture_output=True, text=True
    )


def test_cli_valid_exits_0(meds_root):
    done = cli(f"data={meds_root}")
    assert done.returncode == 0, done.stderr
    assert "events         96" in done.stdout and "OK: valid MEDS" in done.stdout


def test_cli_bad_data_exits_2_without_traceback(meds_root):
    path = shard(meds_root)
    rewrite(path, with_row(pl.read_parquet(path), 7, code=None))
    done = cli(f"data={meds_root}")
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and str(path) in done.stderr and "row 7" in done.stderr
    assert "Traceback" not in done.stderr
