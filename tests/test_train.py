"""`python -m ehrlong.train` end to end on a small synthetic cohort: the run directory, MLflow, and
resume after SIGKILL reproducing the uninterrupted loss curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from ehrlong.config import TrainConfig, parse
from ehrlong.tracking import TAG_KEYS

SMALL = [
    "data.synthetic.n_subjects=40",
    "model.d_model=32",
    "model.n_layers=2",
    "context_length=128",
    "batch.tokens_per_step=4096",
    "batch.tokens_per_micro_batch=2048",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "optim.warmup_steps=2",
]
# One thread each: a test that starts processes must not oversubscribe the 2-core CI machine.
THREADS = {"OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1", "MKL_NUM_THREADS": "1"}


def small(*overrides: str) -> list[str]:
    """SMALL with `overrides` (key=value) replacing the same keys in place and adding new ones at the end."""
    new = dict(o.split("=", 1) for o in overrides)
    out = [f"{k}={new.pop(k)}" if k in new else a for a, k in ((a, a.split("=", 1)[0]) for a in SMALL)]
    return out + [f"{k}={v}" for k, v in new.items()]


def env_for(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        EHRLONG_DATA=str(tmp / "data"), EHRLONG_CACHE=str(tmp / "cache"), EHRLONG_RUNS=str(tmp / "runs")
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


CLI = "import sys; from ehrlong.errors import run_cli; from {module} import main; run_cli(main, sys.argv[1:])"


def run_code(tmp: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `python -c code *args` in `tmp` with data, cache and runs kept under `tmp`."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env_for(tmp),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )


def train(tmp: Path, *args: str, kill_at_step: int | None = None) -> subprocess.CompletedProcess:
    # A crash is simulated with a real SIGKILL from inside the process, right after the checkpoint of
    # step `kill_at_step - 1` has been written (Lightning runs checkpoint callbacks last).
    code = CLI.format(module="ehrlong.train")
    if kill_at_step is not None:
        code = (
            "import os, signal, lightning as L\n"
            "class Kill(L.Callback):\n"
            "    def on_train_batch_start(self, trainer, *a):\n"
            f"        if trainer.global_step == {kill_at_step}: os.kill(os.getpid(), signal.SIGKILL)\n"
            "_init = L.Trainer.__init__\n"
            "def init(self, *a, callbacks=(), **k): _init(self, *a, callbacks=[*callbacks, Kill()], **k)\n"
            "L.Trainer.__init__ = init\n" + code.replace("; ", "\n")
        )
    return run_code(tmp, code, *args)


def run_dirs(tmp: Path, name: str) -> list[Path]:
    return sorted((tmp / "runs" / name).iterdir())


def loss_curve(tmp: Path, run_dir: Path) -> dict[int, float]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    return {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}


def test_run_directory_is_self_describing_and_tracked(tmp_path):
    proc = train(tmp_path, "config=mamba_1k", "trainer.max_steps=3", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path, "mamba_1k")
    for name in ("config.yaml", "tokenizer.json", "model.ckpt", "metrics.json", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name

    # config.yaml is the resolved config: it parses back into the same TrainConfig.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (
        saved["backbone"] == "mamba" and saved["context_length"] == 128 and saved["config_name"] == "mamba_1k"
    )
    expected = parse(
        TrainConfig, ["config=mamba_1k", "trainer.max_steps=3", *SMALL], presets_dir=Path("configs")
    )
    assert saved["model"]["d_model"] == expected.model.d_model

    # model.ckpt loads with weights_only=True (no pickled code) and carries the tokenizer hash.
    ckpt = torch.load(run_dir / "model.ckpt", weights_only=True)
    tok = json.loads((run_dir / "tokenizer.json").read_text())
    assert ckpt["tokenizer_hash"] == tok["hash"]
    assert any(k.startswith("backbone.layers.0.mixer") for k in ckpt["state_dict"])

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["val_loss"] > 0 and metrics["unigram_loss"] > 0
    assert set(metrics["val_loss_by_position"]) == {"0-64", "64-128"}

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.data.tags["backbone"] == "mamba"
    assert run.data.tags["context_length"] == "128"
    assert run.data.tags["config_name"] == "mamba_1k"
    assert run.data.tags["dataset"].startswith("ehrlong-synthetic")
    assert run.data.tags["size"] == "tiny"
    assert set(TAG_KEYS) <= set(run.data.tags)  # what compare and the MLflow UI search by
    assert run.data.params["optim.lr"] == str(expected.optim.lr)
    assert "val/loss" in run.data.metrics and "val/unigram_loss" in run.data.metrics


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    steps = ["trainer.max_steps=6", "checkpoint_every=2"]
    full = train(tmp_path, "config=transformer_512", *steps, *SMALL)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = train(tmp_path, "config=transformer_512", *steps, *SMALL, kill_at_step=3)
    assert killed.returncode == -9  # SIGKILL
    first, crashed = run_dirs(tmp_path, "transformer_512")
    assert not (crashed / "model.ckpt").exists()

    resumed = train(tmp_path, f"resume={crashed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, curve = loss_curve(tmp_path, first), loss_curve(tmp_path, crashed)
    assert sorted(reference) == sorted(curve) == list(range(6))
    for step in range(6):
        assert curve[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), step
    ref_metrics = json.loads((first / "metrics.json").read_text())
    new_metrics = json.loads((crashed / "metrics.json").read_text())
    assert new_metrics["global_step"] == 6
    assert new_metrics["val_loss"] == pytest.approx(ref_metrics["val_loss"], rel=1e-4)


def test_unknown_key_exits_2_with_the_valid_keys(tmp_path):
    proc = train(tmp_path, "config=mamba_1k", "trainer.max_step=3")
    assert proc.returncode == 2
    assert "Did you mean trainer.max_steps" in proc.stderr and "Traceback" not in proc.stderr


def test_validation_on_longer_windows_than_training(tmp_path):
    """transformer_16k_yarn's shape, scaled down: train on 128-token windows, validate on 256-token ones."""
    proc = train(
        tmp_path, "config=transformer_16k_yarn", "trainer.max_steps=2", *SMALL, "eval_context_length=256"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path, "transformer_16k_yarn")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Loss is reported past the training length: the buckets reach the validation length.
    assert set(metrics["val_loss_by_position"]) == {"0-64", "64-128", "128-256"}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["rope"]["type"] == "yarn" and saved["eval_context_length"] == 256
