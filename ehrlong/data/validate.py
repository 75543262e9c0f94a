"""Check a MEDS root and summarise it: `python -m ehrlong.data validate data=DIR`.

Exit 0 prints a one-screen summary (subjects, events, codes, time span, events per subject, split
sizes) with notes and warnings; exit 2 prints one error paragraph naming the file, column, row or
subject, and the fix. Column presence and types come from the `meds` package's schemas; the value
checks are polars aggregations, one pass over each shard, and example rows are read only for failures.

The rule for fatal versus reported: fatal when reading the data as they are would give ehrlong wrong
values or silently lose some; reported when the data can be read faithfully and the user should know.

Fatal (DataError, exit 2):
- no `data/` folder, no parquet shard in it, no events in the shards, a shard that is not parquet or
  is truncated;
- a required column (subject_id, time, code) missing, or a core column of a type ehrlong cannot read
  as the MEDS type (a lossless cast such as int32 ids or large_string codes is fine, and noted);
- a null subject_id or code (MEDS requires both on every event);
- a non-finite numeric_value (NaN, +-inf). Fatal rather than read as null: it usually means a failed
  unit conversion upstream, and nulling it would hide a bug in the ETL that wrote the data;
- `metadata/subject_splits.parquet` that is unreadable, lacks or mistypes a column, has nulls, puts a
  subject in two splits, names subjects that have no events, or leaves out subjects that have events.

Reported, exit 0 (warnings):
- events dated after `now` (default: today), with counts and examples. When most dated events are in
  the future the dataset is date-shifted on purpose (the MIMIC-IV demo runs 2030-2202) and this is a note;
- events before the subject's MEDS_BIRTH, with counts and examples;
- subjects spread over several shards (MEDS wants one shard per subject; ehrlong merges them on read);
- subjects in splits other than train / tuning / held_out: counted as excluded from training and
  evaluation;
- a `metadata/codes.parquet` that cannot be read as the MEDS code schema: ignored.

Notes: shards not sorted by subject and time (`ehrlong.data.meds.scan_events` sorts on read, so every
consumer gets sorted events), extra columns (ignored), columns read with a cast, static (null-time)
events, subjects without MEDS_BIRTH, codes missing from `metadata/codes.parquet`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from flexible_schema.exceptions import SchemaValidationError
from tqdm import tqdm

from ehrlong.config import MISSING
from ehrlong.data.meds import (
    CODE,
    NUMERIC_VALUE,
    READABLE_TYPES,
    SPLIT,
    SPLITS,
    SUBJECT_ID,
    TEXT_VALUE,
    TIME,
    TYPE_FIXES,
    _is_string,
    data_files,
    dataset_name,
    hash_splits,
    out_of_order,
    read_parquet_schema,
    scan_shard,
)
from ehrlong.errors import ConfigError, DataError

QUANTILES = {
    "min": 0.0,
    "p10": 0.1,
    "p25": 0.25,
    "median": 0.5,
    "p75": 0.75,
    "p90": 0.9,
    "p99": 0.99,
    "max": 1.0,
}
MAX_PROBLEMS_SHOWN = 3  # fatal problems spelled out in one error; the rest are counted
N_EXAMPLES = 3  # example rows or subjects quoted per finding


def count(n: int, noun: str) -> str:
    """'1 subject', '2,000 subjects'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


@dataclass
class Args:
    data: str = MISSING  # a MEDS root: the folder that holds data/ and metadata/
    now: str | None = None  # cut-off for the future-date check, YYYY-MM-DD; null = today


@dataclass
class ValidationReport:
    """What `validate` found. Counts are events unless the name says subjects."""

    root: str
    name: str
    n_shards: int
    n_events: int
    n_subjects: int
    n_codes: int
    n_static: int  # events with a null time (static measurements)
    n_numeric: int  # events with a numeric_value
    n_text: int  # events with a text_value
    first_time: dt.datetime | None
    last_time: dt.datetime | None
    events_per_subject: dict[str, float]  # QUANTILES keys plus "mean"
    split_source: str  # the split file, or how the splits were derived without one
    split_subjects: dict[str, int]
    split_events: dict[str, int]
    unsorted_shards: list[str]  # shards out of (subject, time) order; scan_events sorts them on read
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> count that ehrlong will not use
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def was_unsorted(self) -> bool:
        return bool(self.unsorted_shards)


# ---------------------------------------------------------------------------------------------------
# Schemas: the meds package says what is required and what type; we add which types we can cast.
# ---------------------------------------------------------------------------------------------------


def _read_arrow_schema(path: Path) -> pa.Schema:
    return read_parquet_schema(path)


def _schema_findings(schema: pa.Schema, meds_schema: type) -> tuple[list[str], list[str]]:
    """(problems, notes on casts) for one file's arrow schema against a meds schema class."""
    try:
        meds_schema.validate(schema)
        return [], []
    except SchemaValidationError as e:
        problems, notes = [], []
        present = ", ".join(schema.names)
        for col in e.missing_req_cols or []:
            problems.append(
                f"required column {col!r} is missing (columns present: {present}). {meds_schema.__name__} "
                f"requires {', '.join(meds_schema.required_columns())}; rename or add the column in the ETL."
            )
        for col, want, got in e.mistyped_cols or []:
            if _is_string(want) and _is_string(got):
                continue  # string, large_string, string_view: the same values, any reader takes them
            if READABLE_TYPES.get(col, lambda t: False)(got):
                notes.append(f"column {col!r} is {got} (MEDS: {want}); read with a cast")
            else:
                problems.append(
                    f"column {col!r} has type {got}, which cannot be read as the MEDS type {want}; "
                    f"{TYPE_FIXES.get(col, 'cast it in the ETL')}."
                )
        return problems, notes


def _group_by_message(findings: list[tuple[Path, str]]) -> list[str]:
    """'FILE: message' lines, merging the same message across many files into one line."""
    by_message: dict[str, list[Path]] = {}
    for path, message in findings:
        by_message.setdefault(message, []).append(path)
    lines = []
    for message, paths in by_message.items():
        where = ", ".join(str(p) for p in paths[:N_EXAMPLES])
        if len(paths) > N_EXAMPLES:
            where += f" and {len(paths) - N_EXAMPLES} more files"
        lines.append(f"{where}: {message}")
    return lines


def _raise_problems(problems: list[str]) -> None:
    if not problems:
        return
    shown = " ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = len(problems) - MAX_PROBLEMS_SHOWN
    raise DataError(shown + (f" ({more} more problems not shown; fix these first.)" if more > 0 else ""))


def _extra_columns(schema: pa.Schema, meds_schema: type) -> list[str]:
    return [c for c in schema.names if c not in meds_schema.columns()]


def check_shard_schemas(files: list[Path]) -> list[str]:
    """Raise DataError for unreadable shards or unusable columns; return notes on extras and casts."""
    problems: list[tuple[Path, str]] = []
    casts: list[tuple[Path, str]] = []
    extras: set[str] = set()
    for path in files:
        schema = _read_arrow_schema(path)
        file_problems, file_casts = _schema_findings(schema, meds.DataSchema)
        problems += [(path, p) for p in file_problems]
        casts += [(path, n) for n in file_casts]
        extras.update(_extra_columns(schema, meds.DataSchema))
    _raise_problems(_group_by_message(problems))
    # One line for all extras: the MIMIC demo carries 20 ETL columns in every shard.
    extra_note = [f"{len(extras)} extra columns ignored: {', '.join(sorted(extras))}"] if extras else []
    return _group_by_message(casts) + extra_note


# ---------------------------------------------------------------------------------------------------
# Per-shard value checks: one aggregation per shard, example rows only for failures.
# ---------------------------------------------------------------------------------------------------


def _conditions() -> dict[str, pl.Expr]:
    return {
        "null_subject": pl.col(SUBJECT_ID).is_null(),
        "null_code": pl.col(CODE).is_null(),
        "non_finite": pl.col(NUMERIC_VALUE).is_not_null() & ~pl.col(NUMERIC_VALUE).is_finite(),
        "unsorted": out_of_order(),
    }


def _shard_stats(path: Path) -> dict:
    conditions = _conditions()
    aggs = [
        pl.len().alias("rows"),
        pl.col(TIME).is_null().sum().alias("static"),
        pl.col(NUMERIC_VALUE).is_not_null().sum().alias("numeric"),
        pl.col(TEXT_VALUE).is_not_null().sum().alias("text"),
    ]
    for name, cond in conditions.items():
        aggs += [cond.sum().alias(name), cond.arg_true().first().alias(f"{name}_row")]
    try:
        return scan_shard(path).select(aggs).collect().row(0, named=True)
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as e:
        raise DataError(
            f"{path} could not be read ({str(e).splitlines()[0]}). The file may be corrupt or truncated; "
            "copy it again or re-run the ETL that wrote it."
        ) from None


def _example_rows(path: Path, condition: str) -> str:
    rows = (
        scan_shard(path, with_text=False)
        .with_row_index("row")
        .filter(_conditions()[condition])
        .head(N_EXAMPLES)
        .collect()
    )
    examples = [
        f"row {r['row']}: subject {r[SUBJECT_ID]}, code {r[CODE]!r}, numeric_value {r[NUMERIC_VALUE]}"
        for r in rows.iter_rows(named=True)
    ]
    return "first at " + "; then ".join(examples)


NOUNS = {"null_subject": "null value", "null_code": "null value", "non_finite": "non-finite value"}

# condition -> (what is wrong, the MEDS rule and the fix)
VALUE_PROBLEMS = {
    "null_subject": (
        "column 'subject_id' has {n}",
        "MEDS requires a subject_id on every event; fix the ETL or drop those rows before ehrlong reads the "
        "data.",
    ),
    "null_code": (
        "column 'code' has {n}",
        "MEDS requires a code on every event; fix the ETL or drop those rows before ehrlong reads the data.",
    ),
    "non_finite": (
        "column 'numeric_value' has {n}, NaN or +-inf as float32",
        "MEDS numeric values are finite or null; write null where there is no value and check the unit "
        "conversion that produced them.",
    ),
}


def _value_problems(path: Path, stats: dict) -> list[str]:
    problems = []
    for condition, (what, fix) in VALUE_PROBLEMS.items():
        n = stats[condition]
        if n:
            examples = _example_rows(path, condition)
            problems.append(f"{path}: {what.format(n=count(n, NOUNS[condition]))} ({examples}). {fix}")
    return problems


def check_shard_values(files: list[Path]) -> pl.DataFrame:
    """Per-shard counts (one row per shard); DataError for null ids or codes and non-finite values."""
    rows, problems = [], []
    for path in tqdm(files, desc="checking shards", unit="shard", disable=None, leave=False):
        stats = _shard_stats(path)
        problems += _value_problems(path, stats)
        rows.append({"path": str(path), **stats})
    _raise_problems(problems)
    return pl.DataFrame(rows)


def _unsorted_notes(shards: pl.DataFrame) -> tuple[list[str], list[str]]:
    unsorted = shards.filter(pl.col("unsorted") > 0)
    notes = [
        f"{r['path']}: {count(r['unsorted'], 'event')} out of (subject, time) order (first at row "
        f"{r['unsorted_row']}); ehrlong sorts events by subject and time on read "
        "(ehrlong.data.meds.scan_events), nothing is lost"
        for r in unsorted.iter_rows(named=True)
    ]
    return list(unsorted["path"]), notes


# ---------------------------------------------------------------------------------------------------
# Per-subject checks across shards: birth, future dates, shard spread.
# ---------------------------------------------------------------------------------------------------


def _events(files: list[Path]) -> pl.LazyFrame:
    """All events in path order with the shard index (not sorted: order does not matter here)."""
    return pl.concat(
        [
            scan_shard(p, with_text=False).with_columns(pl.lit(i, pl.Int32).alias("shard"))
            for i, p in enumerate(files)
        ]
    )


def _subject_stats(events: pl.LazyFrame, cutoff: dt.datetime) -> pl.LazyFrame:
    """Per subject: event count, shard spread, first/last/birth time, events before birth and after cutoff."""
    t = pl.col(TIME)
    births = events.filter(pl.col(CODE) == meds.birth_code).group_by(SUBJECT_ID).agg(t.min().alias("birth"))
    # A join with the (small) births table, rather than filtering inside the aggregation: about twice as
    # fast on 10M events.
    before = (
        events.join(births, on=SUBJECT_ID)
        .filter(t < pl.col("birth"))
        .group_by(SUBJECT_ID)
        .agg(pl.len().alias("before_birth"))
    )
    per_subject = events.group_by(SUBJECT_ID).agg(
        pl.len().alias("events"),
        (pl.col("shard").max() > pl.col("shard").min()).alias("several_shards"),
        t.min().alias("first"),
        t.max().alias("last"),
        (t >= cutoff).sum().alias("future"),
    )
    return (
        per_subject.join(births, on=SUBJECT_ID, how="left")
        .join(before, on=SUBJECT_ID, how="left")
        .with_columns(pl.col("before_birth").fill_null(0))
    )


def _quantiles(counts: pl.Series) -> dict[str, float]:
    out = {k: float(counts.quantile(q, interpolation="nearest")) for k, q in QUANTILES.items()}
    out["mean"] = float(counts.mean())
    return out


def _before_birth_examples(events: pl.LazyFrame, subjects: pl.DataFrame) -> str:
    births = subjects.lazy().filter(pl.col("before_birth") > 0).select(SUBJECT_ID, "birth")
    rows = (
        events.join(births, on=SUBJECT_ID).filter(pl.col(TIME) < pl.col("birth")).head(N_EXAMPLES).collect()
    )
    return "; ".join(
        f"subject {r[SUBJECT_ID]}: {r[CODE]!r} at {r[TIME]} before birth {r['birth']}"
        for r in rows.iter_rows(named=True)
    )


def _future_examples(events: pl.LazyFrame, cutoff: dt.datetime) -> str:
    rows = events.filter(pl.col(TIME) >= cutoff).head(N_EXAMPLES).collect()
    return "; ".join(f"subject {r[SUBJECT_ID]}: {r[CODE]!r} at {r[TIME]}" for r in rows.iter_rows(named=True))


def _date_findings(
    events: pl.LazyFrame, subjects: pl.DataFrame, cutoff: dt.datetime, n_dated: int
) -> tuple[list[str], list[str]]:
    """(warnings, notes) for events before birth and after the cut-off."""
    warnings, notes = [], []
    before = subjects.filter(pl.col("before_birth") > 0)
    if before.height:
        warnings.append(
            f"{count(int(before['before_birth'].sum()), 'event')} of {count(before.height, 'subject')} dated "
            f"before the subject's {meds.birth_code} ({_before_birth_examples(events, subjects)}). They are "
            "kept; check the ETL's birth dates and date shifting."
        )
    n_future = int(subjects["future"].sum())
    day = (cutoff - dt.timedelta(days=1)).date()
    if n_future and n_future > n_dated / 2:
        notes.append(
            f"{n_future:,} of {n_dated:,} dated events are after {day}: the dates look shifted on purpose "
            "(de-identified data such as MIMIC-IV move them decades ahead), so the future-date check is "
            "moot"
        )
    elif n_future:
        n_subj = int((subjects["future"] > 0).sum())
        warnings.append(
            f"{count(n_future, 'event')} of {count(n_subj, 'subject')} dated after {day} "
            f"({_future_examples(events, cutoff)}). They are kept; check the ETL's date parsing, or pass "
            "now=YYYY-MM-DD if the data are date-shifted."
        )
    return warnings, notes


def _subject_findings(subjects: pl.DataFrame) -> tuple[list[str], list[str]]:
    warnings, notes = [], []
    spread = subjects.filter(pl.col("several_shards"))
    if spread.height:
        ids = ", ".join(str(s) for s in spread[SUBJECT_ID].head(N_EXAMPLES))
        warnings.append(
            f"{count(spread.height, 'subject')} with events in more than one shard (e.g. {ids}); MEDS keeps "
            "each subject in one shard. ehrlong merges them on read; check the ETL did not write a subject "
            "twice."
        )
    no_birth = int(subjects["birth"].is_null().sum())
    if no_birth:
        notes.append(f"{no_birth:,} of {count(subjects.height, 'subject')} without a {meds.birth_code} event")
    return warnings, notes


# ---------------------------------------------------------------------------------------------------
# Splits and code metadata
# ---------------------------------------------------------------------------------------------------


@dataclass
class SplitFindings:
    source: str
    splits: pl.DataFrame  # subject_id, split for every subject with events
    warnings: list[str]
    notes: list[str]


def _ids(frame: pl.DataFrame) -> str:
    return ", ".join(str(s) for s in frame[SUBJECT_ID].head(N_EXAMPLES))


def _read_split_file(path: Path) -> tuple[pl.DataFrame, list[str]]:
    schema = _read_arrow_schema(path)
    problems, notes = _schema_findings(schema, meds.SubjectSplitSchema)
    _raise_problems([f"{path}: {p}" for p in problems])
    notes += [f"extra column {c!r} ignored" for c in _extra_columns(schema, meds.SubjectSplitSchema)]
    splits = pl.read_parquet(path, columns=[SUBJECT_ID, SPLIT]).cast({SUBJECT_ID: pl.Int64, SPLIT: pl.String})
    for col in (SUBJECT_ID, SPLIT):
        nulls = splits.with_row_index("row").filter(pl.col(col).is_null())
        if nulls.height:
            raise DataError(
                f"{path}: column {col!r} has {count(nulls.height, 'null value')} (first at row "
                f"{nulls['row'][0]}). Every row of a MEDS split file names a subject and its split; fill or "
                "drop those rows."
            )
    return splits, [f"{path}: {n}" for n in notes]


def _split_problems(path: Path, splits: pl.DataFrame, subjects: pl.DataFrame) -> list[str]:
    problems = []
    per_subject = (
        splits.group_by(SUBJECT_ID).agg(pl.col(SPLIT).unique().sort()).filter(pl.col(SPLIT).list.len() > 1)
    )
    if per_subject.height:
        examples = "; ".join(
            f"subject {r[SUBJECT_ID]} in {' and '.join(r[SPLIT])}"
            for r in per_subject.head(N_EXAMPLES).iter_rows(named=True)
        )
        problems.append(
            f"{path}: {count(per_subject.height, 'subject')} in more than one split ({examples}). A "
            "subject's events must stay in one split or evaluation leaks training data; keep one row per "
            "subject."
        )
    unknown = splits.join(subjects, on=SUBJECT_ID, how="anti").unique(SUBJECT_ID, maintain_order=True)
    if unknown.height:
        problems.append(
            f"{path}: {count(unknown.height, 'subject')} without events in data/ (e.g. {_ids(unknown)}). The "
            "split file belongs to another version of the data, or those subjects were filtered out; drop "
            "their rows from the split file (or rebuild it)."
        )
    missing = subjects.join(splits, on=SUBJECT_ID, how="anti")
    if missing.height:
        problems.append(
            f"{path}: {count(missing.height, 'subject')} with events but not in the split file (e.g. "
            f"{_ids(missing)}), so ehrlong would not know where they belong; add them, or delete the file to "
            "let ehrlong split all subjects 80/10/10 by a hash of their id."
        )
    return problems


def check_splits(root: Path, subjects: pl.DataFrame) -> SplitFindings:
    """The split of every subject with events; DataError for a split file that disagrees with the data."""
    path = root / meds.subject_splits_filepath
    if not path.is_file():
        ids = subjects[SUBJECT_ID].sort()
        splits = pl.DataFrame({SUBJECT_ID: ids, SPLIT: hash_splits(ids.to_numpy())})
        source = f"no {meds.subject_splits_filepath}: hash of subject_id, 80/10/10"
        return SplitFindings(source, splits, [], [])
    splits, notes = _read_split_file(path)
    _raise_problems(_split_problems(path, splits, subjects))
    splits = splits.unique(SUBJECT_ID, keep="first", maintain_order=True)
    warnings = []
    other = splits.filter(~pl.col(SPLIT).is_in(SPLITS))
    if other.height:
        names = ", ".join(sorted(other[SPLIT].unique()))
        warnings.append(
            f"{path}: {count(other.height, 'subject')} in splits other than {', '.join(SPLITS)} ({names}); "
            "ehrlong excludes them from training and evaluation. Rename the splits if they should be used."
        )
    return SplitFindings(meds.subject_splits_filepath, splits, warnings, notes)


def check_code_metadata(root: Path, codes: pl.Series) -> tuple[list[str], list[str]]:
    """(warnings, notes) about metadata/codes.parquet: optional in ehrlong, so never fatal."""
    path = root / meds.code_metadata_filepath
    if not path.is_file():
        return [], [f"no {meds.code_metadata_filepath} (optional: code descriptions only)"]
    try:
        problems, _ = _schema_findings(pq.read_schema(path), meds.CodeMetadataSchema)
    except (pa.ArrowException, OSError) as e:
        problems = [f"not a readable parquet file ({str(e).splitlines()[0]})"]
    if problems:
        return [f"{path}: {problems[0]} ehrlong ignores this optional file."], []
    described = pl.read_parquet(path, columns=[CODE]).cast({CODE: pl.String})[CODE]
    n_missing = int((~codes.is_in(described.implode())).sum())
    if not n_missing:
        return [], []
    return [], [
        f"{meds.code_metadata_filepath} describes {len(codes) - n_missing:,} of the {len(codes):,} codes in "
        f"the data ({n_missing:,} have no entry; information only)"
    ]


# ---------------------------------------------------------------------------------------------------
# The whole check
# ---------------------------------------------------------------------------------------------------


def _cutoff(today: dt.date | None) -> dt.datetime:
    """Events at or after the returned instant are 'in the future': the start of the day after `today`."""
    day = today or dt.date.today()
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time.min)


def _split_sizes(subjects: pl.DataFrame, splits: pl.DataFrame) -> pl.DataFrame:
    return (
        subjects.join(splits, on=SUBJECT_ID, how="left")
        .group_by(SPLIT)
        .agg(pl.len().alias("subjects"), pl.col("events").sum())
        .sort(pl.col(SPLIT).replace_strict(list(SPLITS), [0, 1, 2], default=3, return_dtype=pl.Int8), SPLIT)
    )


def validate(root: str | Path, today: dt.date | None = None) -> ValidationReport:
    """Check a MEDS root; DataError for anything fatal (see the module docstring), else the report."""
    root = Path(root)
    files = data_files(root)
    notes = check_shard_schemas(files)
    shards = check_shard_values(files)
    if not shards["rows"].sum():
        raise DataError(
            f"the {count(len(files), 'shard')} under {root / meds.data_subdirectory} hold no events. Check "
            "the path, or re-run the ETL that should have written them."
        )
    unsorted, unsorted_notes = _unsorted_notes(shards)

    events = _events(files)
    cutoff = _cutoff(today)
    subjects, codes = pl.collect_all([_subject_stats(events, cutoff), events.select(pl.col(CODE).unique())])
    n_events = int(shards["rows"].sum())
    n_static = int(shards["static"].sum())

    split = check_splits(root, subjects.select(SUBJECT_ID, "events"))
    sizes = _split_sizes(subjects, split.splits)
    excluded_sizes = sizes.filter(~pl.col(SPLIT).is_in(SPLITS))
    excluded = {}
    if excluded_sizes.height:
        excluded["subjects in other splits"] = int(excluded_sizes["subjects"].sum())
        excluded["events of those subjects"] = int(excluded_sizes["events"].sum())

    date_warnings, date_notes = _date_findings(events, subjects, cutoff, n_events - n_static)
    subject_warnings, subject_notes = _subject_findings(subjects)
    code_warnings, code_notes = check_code_metadata(root, codes[CODE])
    static = [f"{n_static:,} static events (null time)"] if n_static else []
    return ValidationReport(
        root=str(root),
        name=dataset_name(root),
        n_shards=len(files),
        n_events=n_events,
        n_subjects=subjects.height,
        n_codes=codes.height,
        n_static=n_static,
        n_numeric=int(shards["numeric"].sum()),
        n_text=int(shards["text"].sum()),
        first_time=subjects["first"].min(),
        last_time=subjects["last"].max(),
        events_per_subject=_quantiles(subjects["events"]),
        split_source=split.source,
        split_subjects=dict(zip(sizes[SPLIT], sizes["subjects"], strict=True)),
        split_events=dict(zip(sizes[SPLIT], sizes["events"], strict=True)),
        unsorted_shards=unsorted,
        excluded=excluded,
        warnings=split.warnings + date_warnings + subject_warnings + code_warnings,
        notes=notes + split.notes + unsorted_notes + static + subject_notes + date_notes + code_notes,
    )


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def format_report(r: ValidationReport) -> str:
    """The one-screen summary `validate` prints."""
    q = r.events_per_subject
    shown = [f"{k} {q[k]:,.0f}" for k in (*QUANTILES, "mean")]
    first_half, second_half = " · ".join(shown[:5]), " · ".join(shown[5:])
    lines = [
        f"MEDS root      {r.root}  ({r.name}, {count(r.n_shards, 'shard')})",
        f"events         {r.n_events:,}  (numeric {_pct(r.n_numeric, r.n_events)}, text "
        f"{_pct(r.n_text, r.n_events)}, static {r.n_static:,})",
        f"subjects       {r.n_subjects:,}",
        f"codes          {r.n_codes:,}",
        f"time span      {r.first_time} .. {r.last_time}",
        f"events/subject {first_half}",
        f"               {second_half}",
        f"splits         {r.split_source}",
    ]
    for name, n in r.split_subjects.items():
        lines.append(f"  {str(name):12s} {n:>8,} subjects {r.split_events[name]:>12,} events")
    order = (
        f"{count(len(r.unsorted_shards), 'shard')} out of order (sorted on read)"
        if r.was_unsorted
        else "sorted"
    )
    lines.append(f"order          {order}")
    excluded = ", ".join(f"{k}: {v:,}" for k, v in r.excluded.items()) or "nothing"
    lines.append(f"excluded       {excluded}")
    lines += [f"note: {n}" for n in r.notes]
    lines += [f"warning: {w}" for w in r.warnings]
    verdict = f"valid MEDS, {count(len(r.warnings), 'warning')}" if r.warnings else "valid MEDS"
    lines.append(f"OK: {verdict}")
    return "\n".join(lines)


def _parse_day(value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(
            f"now={value!r} is not a date; write now=YYYY-MM-DD (e.g. now=2024-12-31)."
        ) from None


def run(args: Args) -> int:
    report = validate(args.data, today=_parse_day(args.now))
    print(format_report(report))
    return 0
