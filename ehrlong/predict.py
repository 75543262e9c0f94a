"""python -m ehrlong.predict run=RUN_DIR [data=DIR] [task=NAME,...] [labels=FILE | times=FILE] [out=PATH]

Batch prediction on patient timelines with a trained run and the probes `ehrlong.evaluate` saved in it
(`<run>/probes/<task>.json`): for every asked (subject, prediction_time), the run's last-token state over
the last L tokens at or before prediction_time (exactly as evaluate computes it), through the task's
probe, written in the MEDS prediction schema (meds-evaluation):

    subject_id  prediction_time  boolean_value  predicted_boolean_value  predicted_boolean_probability

plus a `status` column: ok | only_unknown_codes (predicted, but every code in the window was unknown to
the tokenizer) | no_history (no event at or before prediction_time) | unknown_subject (not in the data).
The last two have null predictions. Every status is counted in the summary; no row is dropped.

What is predicted: `labels=FILE` (MEDS labels: boolean_value is kept), `times=FILE` (subject_id,
prediction_time), or neither: "now", each subject of `split` (default held_out) at its last event.

Streams: subjects go through in batches (`subjects_per_batch`), each batch's probabilities are appended
to the output, so memory does not grow with the number of subjects. Output goes to a `.partial` path
renamed at the end: a killed run leaves no output file that looks complete.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ehrlong.config import parse
from ehrlong.errors import ConfigError, DataError, run_cli

PROG = "python -m ehrlong.predict"

# meds-evaluation's prediction schema, plus our status column.
PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", pa.timestamp("us"), nullable=False),
        pa.field("boolean_value", pa.bool_()),
        pa.field("predicted_boolean_value", pa.bool_()),
        pa.field("predicted_boolean_probability", pa.float64()),
        pa.field("status", pa.string(), nullable=False),
    ]
)
STATUSES = ("ok", "only_unknown_codes", "no_history", "unknown_subject")


@dataclass
class Args:
    run: str | None = None  # run directory written by ehrlong.train and evaluated by ehrlong.evaluate
    data: str | None = None  # MEDS root or dataset name; null = the run's own dataset
    task: list[str] = field(default_factory=list)  # tasks with a probe in <run>/probes; empty = all of them
    labels: str | None = None  # MEDS label file (parquet/csv): subject_id, prediction_time[, boolean_value]
    times: str | None = None  # prediction times (parquet/csv): subject_id, prediction_time
    split: str = "held_out"  # without labels/times: each subject of this split (or all) at its last event
    out: str | None = None  # FILE.parquet (one task) or a folder; null = <run>/predictions/<timestamp>/
    threshold: float = 0.5  # predicted_boolean_value = probability >= threshold
    subjects_per_batch: int = 256  # subjects whose windows are embedded and written together
    tokens_per_batch: int | None = None  # forward batches incl. padding; null = 4,096 on CPU, 65,536 on GPU
    progress: bool = True


# ---------------------------------------------------------------------------------------------------
# What to predict
# ---------------------------------------------------------------------------------------------------


def _read_table(path: str, kind: str) -> pl.DataFrame:
    """A labels= or times= file as (subject_id, prediction_time, boolean_value); times= has no values."""
    wanted = ["subject_id", "prediction_time", *(["boolean_value"] if kind == "labels" else [])]
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"{kind}={path}: no such file. Give a parquet or csv file with columns {', '.join(wanted)}."
        )
    try:
        frame = pl.read_csv(p, try_parse_dates=True) if p.suffix == ".csv" else pl.read_parquet(p)
    except Exception as e:  # polars raises several types for unreadable files
        raise DataError(
            f"{kind}={path}: cannot be read as {'csv' if p.suffix == '.csv' else 'parquet'} ({e})."
        ) from e
    missing = [c for c in ("subject_id", "prediction_time") if c not in frame.columns]
    if missing:
        raise DataError(
            f"{kind}={path}: missing column(s) {', '.join(missing)} (has {', '.join(frame.columns)}). "
            f"A {kind} file needs {', '.join(wanted)} (MEDS label schema)."
        )
    try:
        frame = frame.select(
            pl.col("subject_id").cast(pl.Int64, strict=True),
            pl.col("prediction_time").cast(pl.Datetime("us"), strict=True),
            *(
                [pl.col("boolean_value").cast(pl.Boolean, strict=True)]
                if "boolean_value" in frame.columns and kind == "labels"
                else [pl.lit(None, pl.Boolean).alias("boolean_value")]
            ),
        )
    except pl.exceptions.PolarsError as e:
        raise DataError(
            f"{kind}={path}: a column has the wrong type ({e}); subject_id must be int64, prediction_time a "
            "timestamp, boolean_value boolean."
        ) from e
    nulls = [c for c in ("subject_id", "prediction_time") if frame[c].null_count()]
    if nulls:
        row = frame.with_row_index().filter(pl.any_horizontal(pl.col(nulls).is_null()))["index"][0]
        raise DataError(f"{kind}={path}: column {nulls[0]} is null in row {row}; every row needs both keys.")
    return frame


def _n_without_timed_events(root: Path, store, split: str) -> int:
    """Subjects of `split` the store left out because they have no timed event (counted at tokenization)."""
    excluded = store.meta["excluded"]["subjects_without_timed_events"]
    if split == "all" or not excluded:
        return len(excluded)
    from ehrlong.data.meds import read_splits

    splits = read_splits(root)
    return splits.filter(pl.col("subject_id").is_in(excluded) & (pl.col("split") == split)).height


def _now_queries(store, split: str) -> pl.DataFrame:
    """Each subject of `split` (or all) at its last timed event: the time of its last token in the store
    (integer microseconds, the MEDS timestamp itself; statics and gap tokens never come after it)."""
    idx = np.arange(store.n_subjects) if split == "all" else store.split_indices(split)
    last = np.asarray(store.offsets)[idx + 1] - 1
    return pl.DataFrame(
        {
            "subject_id": np.asarray(store.subject_ids)[idx],
            "prediction_time": np.asarray(store.times_us)[last].astype("datetime64[us]"),
            "boolean_value": pl.Series([None] * len(idx), dtype=pl.Boolean),
        },
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean},
    )


# ---------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------


def _probes(run, tasks: list[str]) -> dict:
    from ehrlong.evaluation.probes import load_probe

    folder = run.run_dir / "probes"
    available = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    if not available:
        raise ConfigError(
            f"run {run.run_dir} has no probes: run `python -m ehrlong.evaluate run={run.run_dir}` first; it saves "
            "each task's probe in <run>/probes/."
        )
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise ConfigError(
            f"task={','.join(unknown)}: no probe in {folder}; evaluated tasks: {', '.join(available)}."
        )
    out = {}
    for task in tasks or available:
        probe, meta = load_probe(folder / f"{task}.json")
        if (
            meta.get("tokenizer_hash") != run.tokenizer_hash
            or meta.get("context_length") != run.context_length
        ):
            raise DataError(
                f"{folder / task}.json was fit on another model (tokenizer or context length differ from the "
                f"run's); re-run python -m ehrlong.evaluate run={run.run_dir}."
            )
        out[task] = probe
    return out


# ---------------------------------------------------------------------------------------------------
# Predict
# ---------------------------------------------------------------------------------------------------


def _remove(path: Path) -> None:
    """Delete a file or folder if it is there (a stale .partial, or the output being replaced)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _status(store, windows, valid: np.ndarray, known_subject: np.ndarray) -> np.ndarray:
    """Per row: ok, only_unknown_codes, no_history or unknown_subject (see the module docstring)."""
    first_code = store.tokenizer.first_code_id
    status = np.full(len(valid), "ok", dtype=object)
    status[~known_subject] = "unknown_subject"
    status[known_subject & ~valid] = "no_history"
    tokens = store.tokens
    for i in np.flatnonzero(valid):
        _, s, e = windows[i]
        window = np.asarray(tokens[s:e])
        codes = window[window >= first_code]
        if codes.size == 0 and (window == store.tokenizer.unk_id).any():
            status[i] = "only_unknown_codes"
    return status


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def release_memory(store) -> None:
    """Give back what a finished batch of subjects left resident, so peak memory follows the batch and not
    the number of subjects: the store pages read for its windows (still in the OS file cache), and the
    activation buffers glibc keeps in its heap after they are freed (its mmap threshold rises as large
    blocks are freed, so later ones come from the heap and fragment it; see the README's HMT note)."""
    import ctypes

    store.drop_resident_pages()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only; elsewhere nothing to do
    if trim is not None:
        trim(0)


def predict(args: Args) -> Path:
    from ehrlong.evaluation.representations import (
        data_root,
        embed_windows,
        label_windows,
        load_run,
        store_for_run,
    )

    if args.run is None:
        raise ConfigError(f"give a run: {PROG} run=runs/<config>/<timestamp>")
    if args.labels and args.times:
        raise ConfigError("give labels=FILE or times=FILE, not both.")
    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"threshold={args.threshold}: a probability threshold is between 0 and 1.")
    if args.subjects_per_batch < 1:
        raise ConfigError(
            f"subjects_per_batch={args.subjects_per_batch}: use a positive number (default 256)."
        )
    t0 = time.perf_counter()
    run = load_run(args.run)
    probes = _probes(run, args.task)
    root = data_root(args.data, [run])
    store = store_for_run(run, root)
    n_no_time = 0
    if args.labels or args.times:
        queries = _read_table(args.labels or args.times, "labels" if args.labels else "times")
        source = f"{'labels' if args.labels else 'times'}={args.labels or args.times}"
    else:
        if args.split not in ("train", "tuning", "held_out", "all"):
            raise ConfigError(f"split={args.split!r}: one of train, tuning, held_out, all.")
        queries = _now_queries(store, args.split)
        n_no_time = _n_without_timed_events(root, store, args.split)
        source = f"each {'' if args.split == 'all' else args.split + ' '}subject at its last event"
    queries = queries.sort("subject_id", "prediction_time", maintain_order=True)

    single = args.out is not None and args.out.endswith(".parquet")
    if single and len(probes) != 1:
        raise ConfigError(
            f"out={args.out} is one file but {len(probes)} tasks are asked for; give task=NAME or a folder."
        )
    out = Path(args.out) if args.out else run.run_dir / "predictions" / time.strftime("%Y%m%d-%H%M%S")
    tmp = out.with_name(out.name + ".partial")
    _remove(tmp)
    files = {task: tmp if single else tmp / f"{task}.parquet" for task in probes}
    if not single:
        tmp.mkdir(parents=True)
    else:
        tmp.parent.mkdir(parents=True, exist_ok=True)
    writers = {task: pq.ParquetWriter(path, PREDICTION_SCHEMA) for task, path in files.items()}

    print(
        f"predicting {', '.join(probes)} for {queries.height:,} times ({source}) with {run.run_dir} on {root}"
    )
    counts = dict.fromkeys(STATUSES, 0)
    subjects = queries["subject_id"].to_numpy()
    starts = (
        np.flatnonzero(np.r_[True, subjects[1:] != subjects[:-1]]) if len(subjects) else np.array([], int)
    )
    bounds = np.r_[starts[:: args.subjects_per_batch], len(subjects)]
    bar = tqdm(total=len(starts), desc="predict", unit="subject", disable=not args.progress)
    try:
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            chunk = queries[int(a) : int(b)]
            win = label_windows(store, chunk, run.context_length)
            status = _status(store, win.windows, win.valid, win.known)
            reps = (
                embed_windows(
                    run.module, store, win.windows[win.valid], args.tokens_per_batch, progress=False
                )
                if win.valid.any()
                else np.zeros((0, run.module.backbone.d_model), dtype=np.float32)
            )
            for s in STATUSES:
                counts[s] += int((status == s).sum())
            for task, probe in probes.items():
                prob = np.full(chunk.height, np.nan)
                if len(reps):
                    prob[win.valid] = probe.predict_proba(reps)
                has = ~np.isnan(prob)
                table = pa.table(
                    {
                        "subject_id": chunk["subject_id"].to_arrow(),
                        "prediction_time": chunk["prediction_time"].to_arrow(),
                        "boolean_value": chunk["boolean_value"].to_arrow(),
                        "predicted_boolean_value": pa.array(
                            np.where(has, prob >= args.threshold, False), mask=~has
                        ),
                        "predicted_boolean_probability": pa.array(prob, mask=~has),
                        "status": pa.array(status.astype(str)),
                    },
                    schema=PREDICTION_SCHEMA,
                )
                writers[task].write_table(table)
            bar.update(int(np.sum((starts >= a) & (starts < b))))
            del reps, win
            release_memory(store)
    except BaseException:
        for w in writers.values():
            w.close()
        _remove(tmp)
        raise
    finally:
        bar.close()
    for w in writers.values():
        w.close()
    seconds = time.perf_counter() - t0
    summary = {
        "run": str(run.run_dir),
        "data": str(root),
        # Encoded with the run's vocabulary; events whose code it never saw became UNK (counted, not dropped).
        "store": str(store.root),
        "unknown_code_events": {s: v["unk"] for s, v in store.meta["counts"]["per_split"].items()},
        "source": source,
        "tasks": list(probes),
        "rows": queries.height,
        "subjects": len(starts),
        "status_counts": counts,
        "subjects_without_timed_events": n_no_time,
        "threshold": args.threshold,
        "seconds": round(seconds, 2),
        "subjects_per_second": round(len(starts) / seconds, 2) if seconds > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if single:
        tmp.replace(out)
        out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    else:
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        _remove(out)
        tmp.rename(out)
    flagged = {s: n for s, n in counts.items() if s != "ok" and n}
    print(
        f"{queries.height:,} predictions for {len(starts):,} subjects in {seconds:.1f} s "
        f"({summary['subjects_per_second']} subjects/s); "
        + (f"flagged rows: {flagged}" if flagged else "no flagged rows")
        + (f"; {n_no_time:,} subjects have no timed event and were not asked for" if n_no_time else "")
        + f"\nwrote {out}"
    )
    return out


def main(argv: Sequence[str]) -> int:
    predict(parse(Args, argv, prog=PROG))
    return 0


if __name__ == "__main__":
    run_cli(main)
