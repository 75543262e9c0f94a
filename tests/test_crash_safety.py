"""Crash safety of `python -m ehrlong.train` (issue 8): atomic checkpoint writes, SIGTERM saves and exits
cleanly, and SIGKILL at random moments loses at most the steps since the last checkpoint, corrupts no
store (run directory, token store, MLflow sqlite), and resuming ends bit for bit where an uninterrupted
run ends."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from test_train import THREADS, small

from ehrlong.safety import EXIT_SIGTERM, AtomicCheckpointIO, atomic_folder, atomic_write_text

SMALL = ["config=transformer_512", *small("model.n_layers=1", "trainer.max_steps=6")]

# Runs ehrlong.train; SIGNAL_AT=STEP:NAME makes the process signal itself when step STEP starts (the
# signal is delivered exactly as one from outside would be).
LAUNCHER = """
import os, signal, sys
import lightning as L
from ehrlong.errors import run_cli
from ehrlong.train import main

SIGNAL_AT = os.environ.get("SIGNAL_AT")

class SignalAt(L.Callback):
    def on_train_batch_start(self, trainer, *args):
        step, name = SIGNAL_AT.split(":")
        if trainer.global_step == int(step):
            os.kill(os.getpid(), getattr(signal, name))

if SIGNAL_AT:
    _init = L.Trainer.__init__
    def init(self, *a, callbacks=(), **k):
        _init(self, *a, callbacks=[*callbacks, SignalAt()], **k)
    L.Trainer.__init__ = init

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
"""


# --- helpers ------------------------------------------------------------------------------------------


def env_for(base: Path, **extra: str) -> dict:
    env = dict(os.environ, **THREADS, **extra)
    env.update(
        EHRLONG_DATA=str(base / "data"), EHRLONG_CACHE=str(base / "cache"), EHRLONG_RUNS=str(base / "runs")
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start(base: Path, *args: str, **extra: str) -> subprocess.Popen:
    launcher = base / "launch.py"
    if not launcher.exists():
        launcher.write_text(LAUNCHER)
    return subprocess.Popen(
        [sys.executable, str(launcher), *args],
        env=env_for(base, **extra),
        cwd=base,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def run_dirs(base: Path) -> list[Path]:
    folder = base / "runs" / "transformer_512"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.ckpt", weights_only=True)["state_dict"]


def ckpt_step(run_dir: Path) -> int | None:
    path = run_dir / "checkpoints" / "last.ckpt"
    return torch.load(path, weights_only=True)["global_step"] if path.is_file() else None


def client(base: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{base / 'runs' / 'mlflow.db'}")


def loss_curve(base: Path, run_dir: Path) -> dict[int, float]:
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return {m.step: m.value for m in client(base).get_metric_history(run_id, "train/loss")}


def tree_digest(folder: Path) -> str:
    """sha256 over every file (path and bytes) under `folder`: any change to a store shows up."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def stores_intact(base: Path) -> list[str]:
    """What is wrong with the MLflow store (none = intact)."""
    problems = []
    db = base / "runs" / "mlflow.db"
    with sqlite3.connect(db) as con:
        check = con.execute("PRAGMA integrity_check").fetchall()
    if check != [("ok",)]:
        problems.append(f"sqlite integrity_check: {check}")
    try:
        client(base).search_runs(experiment_ids=[e.experiment_id for e in client(base).search_experiments()])
    except Exception as e:  # noqa: BLE001 - any failure to read the store is the finding
        problems.append(f"mlflow search_runs: {e!r}")
    return problems


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # resume is deterministic: bit for bit


# --- the uninterrupted reference (shared) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, dict]:
    """One uninterrupted 6-step run; its data, token store and MLflow store are reused by the tests."""
    base = tmp_path_factory.mktemp("crash")
    t0 = time.perf_counter()
    code, out, err = finish(start(base, *SMALL, "checkpoint_every=2"))
    assert code == 0, err[-3000:]
    (run_dir,) = run_dirs(base)
    return base, run_dir, {"wall_s": time.perf_counter() - t0}


# --- unit: the atomic write -----------------------------------------------------------------------------


def test_checkpoint_write_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 2, "w": torch.ones(3)}, path)

    real_save = torch.save
    written_in: list[Path] = []

    def crash_midway(obj, f, *a, **k):  # write a torn file, then die as a crash would
        written_in.append(Path(f).parent)
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 4, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)

    # The temporary file sits beside the target (a rename, never a copy across filesystems) ...
    assert written_in == [path.parent]
    # ... and the target is still the complete previous checkpoint; nothing else is left behind.
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 2 and torch.equal(ckpt["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]

    atomic_write_text(tmp_path / "metrics.json", json.dumps({"a": 1}))
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1}


# --- SIGTERM ----------------------------------------------------------------------------------------------


# --- SIGKILL at random moments -----------------------------------------------------------------------------


def kill_and_resume(
    base: Path, ref_dir: Path, rng: np.random.Generator, span_s: float, from_start: bool
) -> dict:
    """Start a run, SIGKILL it after a random delay, resume it to the end; return what the kill cost.

    from_start: the delay counts from process start (start-up, data, MLflow set-up included); otherwise
    from the moment the run directory has its MLflow run id (training is about to start)."""
    store_dirs = [base / "cache", base / "data"]
    before = {str(d): tree_digest(d) for d in store_dirs}
    known = set(run_dirs(base))
    proc = start(base, *SMALL, "checkpoint_every=2")
    t0 = time.perf_counter()
    if not from_start:
        while not any((d / "mlflow_run_id").is_file() for d in set(run_dirs(base)) - known):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        t0 = time.perf_counter()
    delay = float(rng.uniform(0, span_s))
    time.sleep(max(0.0, delay - (time.perf_counter() - t0)))
    proc.kill()  # SIGKILL
    proc.communicate()
    killed_by_us = proc.returncode == -signal.SIGKILL

    new = sorted(set(run_dirs(base)) - known)
    trial = {
        "delay_s": round(delay, 2),
        "from_start": from_start,
        "killed": killed_by_us,
        "run_dir": bool(new),
    }
    if new and (new[0] / "config.yaml").is_file():
        (run_dir,) = new
        logged = loss_curve(base, run_dir) if (run_dir / "mlflow_run_id").is_file() else {}
        done = max(logged) + 1 if logged else 0  # steps trained before the kill
        saved = ckpt_step(run_dir) or 0
        trial.update(steps_done=done, ckpt_step=saved, steps_lost=max(0, done - saved))
        code, out, err = finish(start(base, f"resume={run_dir}"))
        assert code == 0, err[-3000:]
        assert_same_weights(weights(run_dir), weights(ref_dir))
        curve, ref = loss_curve(base, run_dir), loss_curve(base, ref_dir)
        assert curve == ref  # every step's loss, bit for bit (steps redone after the kill log the same value)
    # Nothing else may change: the cohort and the token store are only read by training.
    after = {str(d): tree_digest(d) for d in store_dirs}
    trial["stores_changed"] = [d for d in before if before[d] != after[d]]
    trial["mlflow_problems"] = stores_intact(base)
    return trial


def check_trial(trial: dict) -> None:
    assert trial["stores_changed"] == [] and trial["mlflow_problems"] == [], trial
    if "steps_lost" in trial:
        assert trial["steps_lost"] <= 2, trial  # checkpoint_every=2


def test_output_folder_appears_whole_or_the_old_one_stays(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "old.csv").write_text("old")
    stale = tmp_path / "results.partial"
    stale.mkdir()
    (stale / "half.csv").write_text("from a killed run")
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        assert tmp == stale and not any(tmp.iterdir())  # the killed run's leftovers are gone
        (tmp / "new.csv").write_text("new")
        raise RuntimeError("plot failed")
    assert [p.name for p in out.iterdir()] == ["old.csv"] and not stale.exists()
    with atomic_folder(out) as tmp:
        (tmp / "new.csv").write_text("new")
        assert not (out / "new.csv").exists()  # nothing visible before the block ends
    assert [p.name for p in out.iterdir()] == ["new.csv"] and not stale.exists()


def test_sigterm_saves_the_step_then_sigkill_during_resume_and_resume_again_matches(reference):
    """The default-run kill/resume test: SIGTERM in the middle of a step, then SIGKILL at a random moment
    of the resumed run, then a second resume; the end is bit for bit the uninterrupted run's."""
    base, ref_dir, _ = reference
    # SIGTERM at the start of step 3 (micro-batch 1 of 2): the run finishes step 3, saves, exits 143.
    # No periodic checkpoint before step 100: any checkpoint of this run is one the run wrote for SIGTERM
    # (or, in the resumed run, at the end of training).
    code, out, err = finish(start(base, *SMALL, "checkpoint_every=100", SIGNAL_AT="3:SIGTERM"))
    assert code == EXIT_SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    run_dir = run_dirs(base)[-1]
    assert run_dir != ref_dir
    # global_step 4 = step 3 completed; nothing after it was trained.
    assert ckpt_step(run_dir) == 4 and max(loss_curve(base, run_dir)) == 3
    assert not (run_dir / "model.ckpt").exists()  # not finished: nothing claims to be the final model
    assert f"resume={run_dir}" in out
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client(base).get_run(run_id).info.status == "KILLED"

    # SIGKILL the resumed run at a random moment (seeded), then resume again to the end: at most the
    # steps since step 4 (or the end-of-training checkpoint at 6) are redone.
    proc = start(base, f"resume={run_dir}")
    time.sleep(float(np.random.default_rng(8).uniform(0, 15)))
    proc.kill()
    proc.communicate()
    assert stores_intact(base) == []
    code, out, err = finish(start(base, f"resume={run_dir}"))
    assert code == 0, err[-3000:]
    assert_same_weights(weights(run_dir), weights(ref_dir))
    assert loss_curve(base, run_dir) == loss_curve(base, ref_dir)
    assert client(base).get_run(run_id).info.status == "FINISHED"
    assert stores_intact(base) == []


@pytest.mark.slow
def test_sigkill_at_random_moments_never_corrupts_and_resume_matches(reference):
    """Kill points drawn over the whole life of the process (start-up included) and over training."""
    base, ref_dir, info = reference
    rng = np.random.default_rng(2026)
    trials = []
    for i in range(int(os.environ.get("EHRLONG_KILL_TRIALS", "8"))):
        from_start = i % 2 == 0
        span = info["wall_s"] if from_start else 8.0
        trials.append(kill_and_resume(base, ref_dir, rng, span, from_start))
        check_trial(trials[-1])
    print("kill trials:", json.dumps(trials, indent=1))
    report = os.environ.get("EHRLONG_KILL_REPORT")
    if report:
        Path(report).write_text(json.dumps(trials, indent=1))


# --- the MLflow store's first creation ----------------------------------------------------------------------


def test_fresh_mlflow_store_is_created_whole_or_not_at_all(tmp_path, monkeypatch):
    """MLflow migrates a new sqlite store in ~50 separate commits; a kill in between used to leave a
    store MLflow can never open again. Now a crash mid-creation leaves no store at all."""
    import mlflow.store.tracking.sqlalchemy_store as sa

    from ehrlong.tracking import create_local_store, tracking_uri

    uri = tracking_uri(None, tmp_path)
    real = sa.SqlAlchemyStore

    def half_migrated(db_uri, artifact_root):  # what a kill during the migrations leaves behind
        with sqlite3.connect(db_uri.removeprefix("sqlite:///")) as con:
            con.execute("create table experiments (experiment_id integer)")
        raise KeyboardInterrupt

    monkeypatch.setattr(sa, "SqlAlchemyStore", half_migrated)
    with pytest.raises(KeyboardInterrupt):
        create_local_store(uri, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary

    monkeypatch.setattr(sa, "SqlAlchemyStore", real)
    create_local_store(uri, tmp_path)
    c = mlflow.MlflowClient(uri)
    exp = c.create_experiment("x")
    c.create_run(exp)
    create_local_store(uri, tmp_path)  # an existing store is left alone
    assert len(c.search_runs([exp])) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


CREATE = "import sys; from pathlib import Path; from ehrlong.tracking import create_local_store as c; c(sys.argv[1], Path(sys.argv[2]))"


@pytest.mark.slow
def test_sigkill_while_creating_the_mlflow_store_never_leaves_a_broken_one(tmp_path):
    rng = np.random.default_rng(16)
    for i in range(int(os.environ.get("EHRLONG_KILL_TRIALS", "8"))):
        root = tmp_path / str(i)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        proc = subprocess.Popen(
            [sys.executable, "-c", CREATE, uri, str(root)], env=dict(os.environ, **THREADS)
        )
        time.sleep(float(rng.uniform(2, 15)))  # imports take the first seconds, then the migrations
        proc.kill()
        proc.wait()
        subprocess.run(
            [sys.executable, "-c", CREATE, uri, str(root)], env=dict(os.environ, **THREADS), check=True
        )
        c = mlflow.MlflowClient(uri)
        exp = c.create_experiment("x")
        c.create_run(exp)
        assert len(c.search_runs([exp])) == 1, i
