"""Privacy (issue 8, part 5): no subject identifier reaches logs, MLflow params, tags, metrics or
artifacts, run directories or evaluation and benchmark folders. Only prediction files the user asks for
(`predict out=...`) carry subject ids.

A small synthetic cohort gets distinctive subject ids (13-digit numbers that occur nowhere else), then
train, evaluate, benchmark and predict run as a user would run them. Everything they leave under the
runs root (the sqlite MLflow store, the artifact folder, run directories, evaluation and benchmark
folders) and everything they print is searched for every id: as decimal text, as binary int64 / float64
in either byte order (uncompressed binaries: .npy, sqlite pages, torch checkpoints), and, for parquet
files (compressed columns), value by value after reading them. The cache (token stores, label and
representation caches) is derived data, like the dataset itself, and is not searched.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
from test_train import THREADS

FIRST_ID = 7_301_946_500_000  # ids FIRST_ID + 7919 * k: 13 digits, in no timestamp, count or hash here
TASKS = "family_history_mi,acute_kidney_injury"
ASKED = "my_predictions.parquet"  # the one file allowed to hold subject ids


def remap_ids(root: Path) -> list[int]:
    """Give every subject of a synthetic cohort a distinctive id, in every file that names subjects."""
    files = [*root.rglob("*.parquet")]
    ids = sorted(
        set(
            pl.concat(
                [
                    pl.read_parquet(f, columns=["subject_id"])
                    for f in files
                    if "subject_id" in pl.read_parquet_schema(f)
                ]
            )["subject_id"].to_list()
        )
    )
    mapping = {old: FIRST_ID + 7919 * k for k, old in enumerate(ids)}
    for f in files:
        frame = pl.read_parquet(f)
        if "subject_id" in frame.columns:
            frame.with_columns(
                pl.col("subject_id").replace_strict(mapping, return_dtype=pl.Int64)
            ).write_parquet(f)
    return list(mapping.values())


def cli(tmp: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        **THREADS,
        "EHRLONG_DATA": str(tmp / "data"),
        "EHRLONG_CACHE": str(tmp / "cache"),
        "EHRLONG_RUNS": str(tmp / "runs"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, cwd=tmp, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"{module} {args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("privacy")
    cohort = tmp / "cohort"
    logs = [cli(tmp, "ehrlong.data", "synth", f"out={cohort}", "n_subjects=120", "seed=3")]
    ids = remap_ids(cohort)
    logs.append(
        cli(
            tmp,
            "ehrlong.train",
            f"data.root={cohort}",
            "model.d_model=32",
            "model.n_layers=2",
            "context_length=128",
            "batch.tokens_per_step=4096",
            "batch.tokens_per_micro_batch=2048",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "optim.warmup_steps=1",
            "trainer.enable_progress_bar=false",
        )
    )
    (run,) = sorted((tmp / "runs" / "default").iterdir())
    logs.append(
        cli(tmp, "ehrlong.evaluate", f"run={run}", f"tasks={TASKS}", "k=all", "n_boot=100", "progress=false")
    )
    logs.append(
        cli(
            tmp,
            "ehrlong.benchmark",
            f"run={run}",
            "tasks=needle_single,copy_forward",
            "lengths=64",
            "depths=0.5",
            "samples=3",
            "finetune_steps=1",
            "finetune_tokens=256",
            "progress=false",
        )
    )
    logs.append(
        cli(
            tmp,
            "ehrlong.predict",
            f"run={run}",
            "task=family_history_mi",
            f"out={tmp / ASKED}",
            "progress=false",
        )
    )
    return tmp, run, ids, logs


def id_patterns(ids: list[int]) -> dict[bytes, int]:
    """Byte strings that would betray an id in a file: decimal text, int64 and float64 in both orders,
    and sqlite's 6-byte big-endian integer (how it stores an integer of this size)."""
    out = {}
    for i in ids:
        for b in (
            str(i).encode(),
            struct.pack("<q", i),
            struct.pack(">q", i),
            struct.pack("<d", float(i)),
            struct.pack(">d", float(i)),
            i.to_bytes(6, "big"),
        ):
            out[b] = i
    return out


def parquet_hits(path: Path, ids: set[int]) -> list[str]:
    frame = pl.read_parquet(path)
    hits = []
    for name, col in frame.to_dict().items():
        if col.dtype.is_integer() or col.dtype.is_float():
            values = set(col.drop_nulls().cast(pl.Float64).to_list())
            if values & {float(i) for i in ids}:
                hits.append(f"{path}: column {name} holds subject ids")
        else:  # strings, lists, structs: their text
            text = str(col.to_list())
            if any(str(i) in text for i in ids):
                hits.append(f"{path}: column {name} holds subject ids")
    return hits


def test_ids_are_distinctive(full_run):
    tmp, run, ids, _ = full_run
    assert len(ids) == 120
    # The asked prediction file does hold them: the search below would find a leak.
    asked = pl.read_parquet(tmp / ASKED)
    assert set(asked["subject_id"]) <= set(ids) and asked.height > 0


def leaks(tmp: Path, ids: list[int]) -> list[tuple[Path, str]]:
    """(file, what) for every sign of a subject id in the files under the runs root."""
    patterns = id_patterns(ids)
    hits = []
    for path in (p for p in (tmp / "runs").rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits += [(path, f"{patterns[b]} as {b!r}") for b in patterns if b in data]
        if path.suffix == ".parquet":
            hits += [(path, h) for h in parquet_hits(path, set(ids))]
    return hits


def test_no_subject_id_in_the_runs_folder_or_mlflow_store(full_run):
    tmp, run, ids, _ = full_run
    files = [p for p in (tmp / "runs").rglob("*") if p.is_file()]
    # What must be searched is there: the store, logged artifacts, run, evaluation and benchmark folders.
    names = {p.name for p in files}
    assert {"mlflow.db", "model.ckpt", "config.yaml", "results.csv", "per_sample.parquet"} <= names
    assert any("mlartifacts" in p.parts for p in files)
    # evaluate writes its per-label predictions.parquet only with predictions=true: not here.
    hits = [f"{p}: {h}" for p, h in leaks(tmp, ids)]
    assert not hits, "subject ids outside the asked prediction file:\n" + "\n".join(hits[:20])


def test_no_subject_id_in_mlflow_params_tags_metrics(full_run):
    tmp, run, ids, _ = full_run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    texts = {str(i) for i in ids}
    values = {float(i) for i in ids}
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id]):
            fields = [r.info.run_name, *r.data.params.items(), *r.data.tags.items(), *r.data.metrics]
            assert not any(t in str(f) for f in fields for t in texts), r.info.run_id
            assert not values & set(r.data.metrics.values()), r.info.run_id


def test_no_subject_id_in_what_the_commands_print(full_run):
    tmp, run, ids, logs = full_run
    printed = "\n".join(p.stdout + p.stderr for p in logs)
    found = [i for i in ids if str(i) in printed]
    assert not found, f"printed subject ids: {found[:5]}"


def test_the_asked_file_is_the_only_one_with_ids_and_nothing_else_was_written_beside_it(full_run):
    tmp, run, ids, _ = full_run
    beside = sorted(p.name for p in tmp.iterdir() if p.is_file())
    assert beside == [ASKED, ASKED.replace(".parquet", ".summary.json")]
    summary = (tmp / ASKED.replace(".parquet", ".summary.json")).read_text()
    assert not any(str(i) in summary for i in ids)
    assert np.isin(pl.read_parquet(tmp / ASKED)["subject_id"].to_numpy(), ids).all()
