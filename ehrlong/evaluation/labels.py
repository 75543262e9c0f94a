"""Task labels: one MEDS label frame per (task, dataset), `subject_id, prediction_time, boolean_value`.

Where labels come from (DESIGN.md §3, §6):

- The synthetic cohort (a root written by `ehrlong.data.synthetic`, recognised by its
  `metadata/synthetic.json` and dataset name): its built-in tasks `synthetic.TASKS`, read from the
  `labels/<task>.parquet` files the generator writes with the events.
- Any other MEDS root: the ACES task configs `tasks/<name>.yaml` (or a path to your own `.yaml`), run
  through `es-aces` in process. A config's optional `metadata: {supported_datasets: [...]}` (ignored by
  ACES) says which datasets (`dataset_name` in `metadata/dataset.json`) `tasks="all"` runs it on.

ACES is run once per data shard (MEDS keeps each subject in one shard), each time on a fresh deep copy
of the parsed config. The copy matters: es-aces 0.7.3's `extract_subtree` adds the subtree offset to a
window's bound *in place* (`endpoint_expr.offset += subtree_root_offset`), so every query on one config
object shifts its offset windows again. Running the shards with one config object gave the in-ICU
mortality task 60 correct labels on the first shard and 5 + 2 wrong ones on the other two (67 labels,
8 positive, against the 74 / 9 of the demo's shipped label file); a second query on the whole dataset
with a used config gave 58 / 17. `aces-cli` loads the config afresh in each process, which is why it
reproduced the file. (research/proto_tokenize_aces.md §3.3 saw ACES's own query-idempotency tests fail
on 0.7.3, for a bug fixed after it, ACES PR #198.) Shard by shard or all at once, a fresh config gives
the same labels.

ACES's `label` is a count of the label predicate in the label window; `boolean_value = label > 0`
(research/anchor_ecosystem.md §0.5), and `index_timestamp` is the prediction time.

Every frame is sorted by (subject_id, prediction_time) with one row per pair. Nothing is dropped
silently: `LabelSummary` counts exact duplicate rows (removed), pairs that came with both labels
(merged into one positive row), and labels whose subject has no timed
event other than MEDS_BIRTH at or before the prediction time (kept, since that is the evaluation's
call; a representation for them would hold next to nothing).

Cache: ACES results are stored under `<cache root>/labels/` (`EHRLONG_CACHE`, default `./cache`, see
`ehrlong.paths`) as `<task>-<key>.parquet` plus the summary in `<task>-<key>.json`. The key is a
sha256 of the task file's bytes, the resolved data root, the path, size and mtime of every data shard,
`metadata/dataset.json`, the es-aces version and `CACHE_VERSION`, so editing the task or the data (or
upgrading ACES) reruns ACES and repeated evaluations do not. Delete the folder to clear it. Synthetic
labels are read from the cohort's own files and need no cache.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import meds
import polars as pl
import yaml

from ehrlong.data import synthetic
from ehrlong.data.meds import CODE, SUBJECT_ID, TIME, data_files, read_dataset_metadata, scan_shard
from ehrlong.errors import ConfigError, DataError
from ehrlong.paths import cache_root

TASK_DIR = Path(__file__).resolve().parents[2] / "tasks"
CACHE_VERSION = 1  # bump when the label frame or summary for the same inputs would change

PREDICTION_TIME = meds.LabelSchema.prediction_time_name
BOOLEAN_VALUE = meds.LabelSchema.boolean_value_name
LABEL_SCHEMA = {SUBJECT_ID: pl.Int64, PREDICTION_TIME: pl.Datetime("us"), BOOLEAN_VALUE: pl.Boolean}

SOURCE_SYNTHETIC = "synthetic"
SOURCE_ACES = "aces"


@dataclass(frozen=True)
class LabelSummary:
    """What `get_labels` returned and what it had to resolve on the way."""

    task: str
    data_root: str
    source: str  # "synthetic" (the cohort's label files) or "aces" (a task config run by es-aces)
    task_file: str  # the label parquet (synthetic) or the ACES task config
    n_labels: int  # rows returned
    n_positive: int
    n_subjects: int
    n_duplicates: int  # exact duplicate rows removed
    n_conflicting: int  # (subject, prediction_time) pairs that came with both labels, kept as positive
    n_no_history: int  # labels with no event but birth/static rows at or before prediction_time (kept)
    from_cache: bool = False
    cache_file: str | None = None

    @property
    def prevalence(self) -> float:
        return self.n_positive / self.n_labels if self.n_labels else float("nan")

    def describe(self) -> str:
        """One line for logs and reports."""
        line = (
            f"{self.task}: {self.n_labels:,} labels, {self.n_positive:,} positive "
            f"({100 * self.prevalence:.1f}%), {self.n_subjects:,} subjects [{self.source}"
            f"{', cached' if self.from_cache else ''}]"
        )
        notes = [
            f"{self.n_duplicates:,} duplicate rows removed" if self.n_duplicates else "",
            f"{self.n_conflicting:,} times with both labels kept as positive" if self.n_conflicting else "",
            f"{self.n_no_history:,} labels with no care event at or before their time"
            if self.n_no_history
            else "",
        ]
        notes = [n for n in notes if n]
        return line + (f"; {'; '.join(notes)}" if notes else "")


@dataclass(frozen=True)
class TaskLabels:
    labels: pl.DataFrame  # subject_id Int64, prediction_time Datetime[us], boolean_value Boolean
    summary: LabelSummary


# ---------------------------------------------------------------------------------------------------
# Which tasks exist
# ---------------------------------------------------------------------------------------------------


def is_synthetic(data_root: str | Path) -> bool:
    """Whether `data_root` is a cohort written by `ehrlong.data.synthetic` (its own metadata says so)."""
    root = Path(data_root)
    if not (root / "metadata" / "synthetic.json").is_file():
        return False
    try:
        meta = read_dataset_metadata(root)
    except DataError:
        return False
    return meta.get("dataset_name") == synthetic.DATASET_NAME


def _yaml_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(TASK_DIR.glob("*.yaml"))}


def supported_datasets(task_file: str | Path) -> list[str] | None:
    """`metadata.supported_datasets` of a task config; None when it does not say (any dataset)."""
    path = Path(task_file)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read task config {path}: {_error_line(e)}") from None
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    names = meta.get("supported_datasets") if isinstance(meta, dict) else None
    return [str(n) for n in names] if names else None


def list_tasks(data_root: str | Path | None = None) -> list[str]:
    """Task names, sorted.

    No `data_root`: every ACES task config in TASK_DIR. A synthetic cohort: its built-in tasks. Any
    other MEDS root: the task configs that apply to it, i.e. those whose `metadata.supported_datasets`
    names its `dataset_name` or that name no dataset (this is what `tasks="all"` runs).
    """
    if data_root is None:
        return list(_yaml_tasks())
    if is_synthetic(data_root):
        return sorted(synthetic.TASKS)
    name = read_dataset_metadata(data_root).get("dataset_name")
    out = []
    for task, path in _yaml_tasks().items():
        supported = supported_datasets(path)
        if supported is None or name in supported:
            out.append(task)
    return out


def resolve_tasks(tasks: str | Sequence[str], data_root: str | Path) -> list[str]:
    """Task names to evaluate: "all" (the tasks that apply to the dataset), "a,b", or a list of names.

    Each name is checked (an unknown one lists the valid ones); paths to `.yaml` configs pass through.
    """
    data_files(data_root)  # a root that does not exist, or holds no data/, says so before tasks are listed
    if isinstance(tasks, str):
        if tasks.strip() == "all":
            found = list_tasks(data_root)
            if not found:
                name = read_dataset_metadata(data_root).get("dataset_name") or Path(data_root).name
                raise ConfigError(
                    f"tasks=all: no task in {TASK_DIR} applies to dataset {name!r} at {data_root} (their "
                    f"metadata.supported_datasets name other datasets). Name tasks explicitly "
                    f"(tasks=a,b; valid: {', '.join(list_tasks()) or 'none'}) or pass paths to your own "
                    "ACES task .yaml files."
                )
            return found
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError(f"no task given. Valid tasks for {data_root}: {', '.join(list_tasks(data_root))}.")
    for task in tasks:
        _task_source(task, data_root)  # raises for unknown names
    return list(tasks)


def _task_source(task: str, data_root: str | Path) -> tuple[str, str, Path]:
    """(task name, source, file) for `task` on `data_root`; ConfigError listing valid names if unknown."""
    if is_synthetic(data_root):
        if task not in synthetic.TASKS:
            raise ConfigError(
                f"unknown task {task!r} for the synthetic cohort at {data_root}. Valid tasks: "
                f"{', '.join(sorted(synthetic.TASKS))}."
            )
        path = Path(data_root) / "labels" / f"{task}.parquet"
        if not path.is_file():
            raise DataError(
                f"{path} is missing: the synthetic cohort at {data_root} is incomplete. Delete the folder "
                "and generate it again (python -m ehrlong.data synth out=DIR)."
            )
        return task, SOURCE_SYNTHETIC, path
    as_path = Path(task)
    if as_path.suffix in (".yaml", ".yml"):
        if not as_path.is_file():
            raise ConfigError(
                f"task config {as_path} does not exist. Pass a path to an ACES task .yaml file."
            )
        return as_path.stem, SOURCE_ACES, as_path
    known = _yaml_tasks()
    if task not in known:
        raise ConfigError(
            f"unknown task {task!r}. Valid tasks (tasks/*.yaml): {', '.join(known) or 'none'}; or pass the "
            "path to an ACES task .yaml file."
        )
    return task, SOURCE_ACES, known[task]


# ---------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------


def load_labels(
    task: str, data_root: str | Path, *, cache_dir: str | Path | None = None, use_cache: bool = True
) -> pl.DataFrame:
    """The labels of `task` on `data_root` in the MEDS label schema, sorted, one row per pair."""
    return get_labels(task, data_root, cache_dir=cache_dir, use_cache=use_cache).labels


def get_labels(
    task: str, data_root: str | Path, *, cache_dir: str | Path | None = None, use_cache: bool = True
) -> TaskLabels:
    """The labels of `task` on `data_root` and their `LabelSummary`.

    `task` is a synthetic task name on a synthetic cohort, else a name in TASK_DIR or a path to an ACES
    task .yaml. ACES results are cached (see the module docstring); `use_cache=False` neither reads nor
    writes the cache. A task that yields no label is a DataError naming task and data root.
    """
    root = Path(data_root)
    name, source, path = _task_source(task, root)
    if source == SOURCE_SYNTHETIC:
        raw = pl.read_parquet(path).select(
            pl.col(SUBJECT_ID), pl.col(PREDICTION_TIME), pl.col(BOOLEAN_VALUE).cast(pl.Boolean)
        )
        return _finish(name, root, source, path, raw)

    cache_file = None
    if use_cache:
        folder = Path(cache_dir) if cache_dir is not None else cache_root() / "labels"
        cache_file = folder / f"{name}-{cache_key(path, root)[:20]}.parquet"
        hit = _read_cache(cache_file)
        if hit is not None:
            summary = dataclasses.replace(hit.summary, task=name, data_root=str(root), task_file=str(path))
            return TaskLabels(hit.labels, summary)
    raw = labels_from_aces(query_aces(path, root))
    result = _finish(name, root, source, path, raw)
    if cache_file is not None:
        result = _write_cache(cache_file, result)
    return result


def _finish(name: str, root: Path, source: str, path: Path, raw: pl.DataFrame) -> TaskLabels:
    labels, n_dup, n_conflict = normalise_labels(raw)
    if labels.is_empty():
        raise DataError(_no_labels_message(name, root, source, path))
    summary = LabelSummary(
        task=name,
        data_root=str(root),
        source=source,
        task_file=str(path),
        n_labels=labels.height,
        n_positive=int(labels[BOOLEAN_VALUE].sum()),
        n_subjects=labels[SUBJECT_ID].n_unique(),
        n_duplicates=n_dup,
        n_conflicting=n_conflict,
        n_no_history=count_no_history(labels, root),
    )
    return TaskLabels(labels, summary)


def normalise_labels(raw: pl.DataFrame) -> tuple[pl.DataFrame, int, int]:
    """(labels in LABEL_SCHEMA, sorted, one row per pair; exact duplicates removed; conflicting pairs).

    A (subject, prediction_time) pair with both labels becomes one positive row.
    """
    frame = raw.select(
        pl.col(SUBJECT_ID).cast(pl.Int64),
        pl.col(PREDICTION_TIME).cast(pl.Datetime("us")),
        pl.col(BOOLEAN_VALUE).cast(pl.Boolean),
    )
    nulls = frame.null_count().row(0, named=True)
    if any(nulls.values()):
        bad = ", ".join(f"{c} ({n:,})" for c, n in nulls.items() if n)
        raise DataError(f"labels hold null values in {bad}; every label needs a subject, a time and a value.")
    unique = frame.unique(maintain_order=True)
    merged = unique.group_by(SUBJECT_ID, PREDICTION_TIME).agg(
        pl.col(BOOLEAN_VALUE).any(), pl.len().alias("_n")
    )
    n_conflicting = int((merged["_n"] > 1).sum())
    labels = merged.drop("_n").sort(SUBJECT_ID, PREDICTION_TIME)
    return labels.select(list(LABEL_SCHEMA)), frame.height - unique.height, n_conflicting


def count_no_history(labels: pl.DataFrame, data_root: str | Path) -> int:
    """How many labels have no event of their subject at or before the prediction time.

    Static (null-time) rows and MEDS_BIRTH do not count as history: a timeline of only those before the
    prediction time says nothing about care (e.g. a lab task triggered by a subject's first recorded
    lab). Subjects absent from the data count as having no history.
    """
    first = (
        pl.concat(
            [scan_shard(p, with_text=False).select(SUBJECT_ID, TIME, CODE) for p in data_files(data_root)]
        )
        .filter(pl.col(TIME).is_not_null() & (pl.col(CODE) != meds.birth_code))
        .group_by(SUBJECT_ID)
        .agg(pl.col(TIME).min().alias("_first"))
        .collect()
    )
    joined = labels.join(first, on=SUBJECT_ID, how="left")
    return int((joined["_first"].is_null() | (joined["_first"] > joined[PREDICTION_TIME])).sum())


# ---------------------------------------------------------------------------------------------------
# ACES
# ---------------------------------------------------------------------------------------------------


def load_task_config(task_file: str | Path):
    """The parsed ACES `TaskExtractorConfig`; ConfigError with the file and ACES's message if invalid."""
    from aces.config import TaskExtractorConfig  # es-aces imports hydra: keep it out of module import

    from ehrlong.config import load_yaml_mapping

    path = Path(task_file)
    # YAML syntax first, with the line it stops at (ACES's own message for it has no line number).
    load_yaml_mapping(
        path, "task config", "See https://eventstreamaces.readthedocs.io for the task language."
    )
    try:
        cfg = TaskExtractorConfig.load(config_path=path)
    except Exception as e:  # ACES raises ValueError, KeyError, TypeError, ... for a bad config
        raise ConfigError(
            f"task config {path} is not a valid ACES task: {_error_line(e)}. See "
            "https://eventstreamaces.readthedocs.io for the task language."
        ) from e
    if cfg.label_window is None:
        raise ConfigError(f"task config {path} has no `label:` in any window; a task needs one label.")
    if cfg.index_timestamp_window is None:
        raise ConfigError(
            f"task config {path} has no `index_timestamp:` in any window; set `index_timestamp: end` on "
            "the input window so each label has a prediction time."
        )
    return cfg


def query_aces(task_file: str | Path, data_root: str | Path) -> pl.DataFrame:
    """ACES's raw result for a task on a MEDS root: `subject_id, index_timestamp, label, trigger` and one
    summary struct per window (`<window>.start_summary` / `.end_summary`). Empty when nothing matched.

    Runs shard by shard, on a fresh deep copy of the config for each (see the module docstring); one run
    over all shards when a subject spans shards (MEDS forbids it, but then no shard holds its history).
    """
    from aces import predicates, query
    from omegaconf import DictConfig

    path, root = Path(task_file), Path(data_root)
    cfg = load_task_config(path)
    shards = data_files(root)
    if _subjects_span_shards(shards):
        shards = [root / meds.data_subdirectory]
    results = []
    with _quiet_aces():
        for shard in shards:
            run_cfg = copy.deepcopy(cfg)  # query() mutates the config's window bounds (es-aces 0.7.3)
            try:
                preds = predicates.get_predicates_df(
                    run_cfg, DictConfig({"path": str(shard), "standard": "meds"})
                )
                result = query.query(run_cfg, preds)
            except Exception as e:
                raise DataError(
                    f"ACES failed on task config {path} with data {shard}: {_error_line(e)}. Check that the "
                    "task's predicates and windows fit this dataset (codes, value columns)."
                ) from e
            if result.height:
                results.append(result)
    if not results:
        return pl.DataFrame(
            schema={SUBJECT_ID: pl.Int64, "index_timestamp": pl.Datetime("us"), "label": pl.Int64}
        )
    return pl.concat(results, how="diagonal_relaxed")


def labels_from_aces(result: pl.DataFrame) -> pl.DataFrame:
    """ACES output -> label columns: index_timestamp is the prediction time, label count > 0 the value."""
    return result.select(
        pl.col(SUBJECT_ID),
        pl.col("index_timestamp").alias(PREDICTION_TIME),
        (pl.col("label") > 0).alias(BOOLEAN_VALUE),
    )


def _subjects_span_shards(shards: list[Path]) -> bool:
    if len(shards) < 2:
        return False
    ids = pl.concat(
        [pl.scan_parquet(p).select(pl.col(SUBJECT_ID).cast(pl.Int64).unique()) for p in shards]
    ).collect()[SUBJECT_ID]
    return bool(ids.is_duplicated().any())


@contextlib.contextmanager
def _quiet_aces() -> Iterator[None]:
    """Silence ACES's per-shard warnings ("all labels are the same" on a small shard); errors still raise."""
    logger = logging.getLogger("aces")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _error_line(e: BaseException) -> str:
    """`Type: first line of the message` (polars adds the query plan on later lines), at most 300 chars."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = line if len(line) <= 300 else line[:297] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _no_labels_message(name: str, root: Path, source: str, path: Path) -> str:
    msg = f"task {name!r} yields no labels on {root} ({path})."
    if source == SOURCE_SYNTHETIC:
        return msg + " The cohort's label file is empty; generate the cohort again."
    hints = []
    dataset = read_dataset_metadata(root).get("dataset_name")
    supported = supported_datasets(path)
    if supported is not None and dataset not in supported:
        hints.append(f"the task is written for {', '.join(supported)}, this dataset is {dataset!r}")
    missing = _unmatched_predicates(path, root)
    if missing:
        hints.append(f"these predicates match no event of the data: {', '.join(missing)}")
    hints = hints or ["no trigger event passed all the window constraints"]
    return msg + " " + "; ".join(hints) + ". Check the task's codes against the dataset's codes."


def _unmatched_predicates(path: Path, root: Path) -> list[str]:
    """Plain predicates whose code spec matches no code in the data (a value range is not checked)."""
    try:
        cfg = load_task_config(path)
    except ConfigError:
        return []
    codes = (
        pl.concat([pl.scan_parquet(p).select(pl.col(CODE).cast(pl.String)) for p in data_files(root)])
        .unique()
        .collect()[CODE]
    )
    out = []
    for name, pred in cfg.plain_predicates.items():
        spec = pred.code
        if isinstance(spec, dict) and "regex" in spec:
            hit = codes.str.contains(spec["regex"]).any()
        elif isinstance(spec, dict) and "any" in spec:
            hit = codes.is_in(list(spec["any"])).any()
        else:
            hit = (codes == str(spec)).any()
        if not hit:
            out.append(f"{name} ({spec})")
    return out


# ---------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------


def cache_key(task_file: str | Path, data_root: str | Path) -> str:
    """sha256 of everything ACES labels depend on: task bytes, data files (path, size, mtime), versions."""
    root = Path(data_root).resolve()
    shards = []
    for p in data_files(root):
        st = p.stat()
        shards.append([p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    dataset_json = root / meds.dataset_metadata_filepath
    ident = {
        "cache_version": CACHE_VERSION,
        "es_aces": package_version("es-aces"),
        "task_sha256": hashlib.sha256(Path(task_file).read_bytes()).hexdigest(),
        "data_root": str(root),
        "shards": shards,
        "dataset_json": hashlib.sha256(dataset_json.read_bytes()).hexdigest()
        if dataset_json.is_file()
        else None,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _read_cache(cache_file: Path) -> TaskLabels | None:
    meta_file = cache_file.with_suffix(".json")
    if not (cache_file.is_file() and meta_file.is_file()):
        return None
    try:
        labels = pl.read_parquet(cache_file)
        meta = json.loads(meta_file.read_text())
        fields = {f.name for f in dataclasses.fields(LabelSummary)}
        summary = LabelSummary(**{k: v for k, v in meta.items() if k in fields})
    except (OSError, ValueError, TypeError, pl.exceptions.PolarsError):
        return None  # a damaged entry is recomputed and rewritten
    if dict(labels.schema) != LABEL_SCHEMA or labels.height != summary.n_labels:
        return None
    summary = dataclasses.replace(summary, from_cache=True, cache_file=str(cache_file))
    return TaskLabels(labels, summary)


def _write_cache(cache_file: Path, result: TaskLabels) -> TaskLabels:
    """Write labels and summary atomically (temporary files renamed into place); the cached result."""
    summary = dataclasses.replace(result.summary, from_cache=False, cache_file=str(cache_file))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_labels = cache_file.with_name(cache_file.name + tag)
    tmp_meta = cache_file.with_name(cache_file.stem + ".json" + tag)
    try:
        result.labels.write_parquet(tmp_labels)
        tmp_meta.write_text(json.dumps(dataclasses.asdict(summary), indent=2, sort_keys=True) + "\n")
        os.replace(tmp_labels, cache_file)
        os.replace(tmp_meta, cache_file.with_suffix(".json"))
    finally:
        tmp_labels.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return TaskLabels(result.labels, summary)
