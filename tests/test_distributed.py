"""Distributed training (issue 8): DDP over 2 CPU processes (gloo) against one process on the same data.

The one-process reference iterates both ranks' subject shards in every step (TrainBatches.ranks), which
is exactly the data the two DDP ranks see; gradients, logged losses, validation loss and final weights
must agree, and only rank 0 may write the run directory and MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import torch
from test_train import THREADS, small

# 2 micro-batches of 2048 per step: one per rank, or both in one process.
SMALL = [
    "config=transformer_512",
    *small("model.n_layers=1", "trainer.max_steps=3", "trainer.accelerator=cpu"),
]

# A script file (not python -c): Lightning's ddp launcher starts rank 1 by re-running sys.argv[0].
# RECORD_DIR: every rank saves its gradients before each optimizer step (after DDP's all-reduce).
# EMULATE_RANKS=W: a single process trains on all W shards per step, as W ranks together would.
LAUNCHER = """
import os, sys
import lightning as L, torch
from ehrlong.data import batching
from ehrlong.errors import run_cli
from ehrlong.train import main

OUT, EMULATE = os.environ["RECORD_DIR"], int(os.environ.get("EMULATE_RANKS", "0"))

class Record(L.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
        torch.save(grads, f"{OUT}/grads_step{trainer.global_step}_rank{trainer.global_rank}.pt")

_init = L.Trainer.__init__
def init(self, *a, callbacks=(), **k):
    _init(self, *a, callbacks=[*callbacks, Record()], **k)
L.Trainer.__init__ = init

if EMULATE:
    _tb_init, _shard = batching.TrainBatches.__init__, batching.TrainBatches.shard
    def tb_init(self, *a, **k):
        _tb_init(self, *a, **k)
        self.per_step //= EMULATE  # the process accumulates every rank's share
    def shard(self, rank, world_size):
        _shard(self, 0, EMULATE)
        self.ranks = tuple(range(EMULATE))
    batching.TrainBatches.__init__, batching.TrainBatches.shard = tb_init, shard

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
"""


def train(base: Path, name: str, *args: str, **extra: str) -> Path:
    record = base / f"record_{name}"
    record.mkdir()
    launcher = base / "launch.py"
    launcher.write_text(LAUNCHER)
    env = dict(os.environ, **THREADS, **extra, RECORD_DIR=str(record))
    env.update(
        EHRLONG_DATA=str(base / "data"), EHRLONG_CACHE=str(base / "cache"), EHRLONG_RUNS=str(base / "runs")
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, str(launcher), *SMALL, *args],
        env=env,
        cwd=base,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return record


def test_ddp_two_cpu_processes_match_one_process_on_the_same_data(tmp_path):
    one = train(tmp_path, "one", EMULATE_RANKS="2")
    (one_dir,) = (tmp_path / "runs" / "transformer_512").iterdir()
    two = train(tmp_path, "ddp", "trainer.strategy=ddp", "trainer.devices=2")
    runs = sorted((tmp_path / "runs" / "transformer_512").iterdir())
    assert len(runs) == 2, runs  # rank 1 made no run directory of its own
    ddp_dir = next(r for r in runs if r != one_dir)

    # Gradients of every step: identical on both ranks (all-reduced), and equal to the one process's,
    # which holds the loss normalisation (targets of all ranks, DDP's averaging undone) and the shards.
    for step in range(3):
        ref = torch.load(one / f"grads_step{step}_rank0.pt", weights_only=True)
        r0 = torch.load(two / f"grads_step{step}_rank0.pt", weights_only=True)
        r1 = torch.load(two / f"grads_step{step}_rank1.pt", weights_only=True)
        assert ref.keys() == r0.keys() == r1.keys()
        for k in ref:
            torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, msg=f"step {step} {k}")
            torch.testing.assert_close(r0[k], ref[k], rtol=1e-4, atol=1e-7, msg=f"step {step} {k}")

    # The logged loss is the step's loss over both ranks' targets; one MLflow run per training run.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "ehrlong"]
    assert len(client.search_runs([exp.experiment_id])) == 2

    def curve(run_dir: Path) -> dict[int, float]:
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        return {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}

    ref_curve, ddp_curve = curve(one_dir), curve(ddp_dir)
    assert sorted(ref_curve) == sorted(ddp_curve) == [0, 1, 2]
    for step in ref_curve:
        assert abs(ddp_curve[step] - ref_curve[step]) <= 1e-5 * abs(ref_curve[step]), step
    assert client.get_run((ddp_dir / "mlflow_run_id").read_text().strip()).data.tags["world_size"] == "2"

    # Validation sums both ranks' windows (each rank validates its share) to the whole tuning split.
    m_one = json.loads((one_dir / "metrics.json").read_text())
    m_ddp = json.loads((ddp_dir / "metrics.json").read_text())
    assert m_ddp["world_size"] == 2 and m_ddp["global_step"] == 3
    assert abs(m_ddp["val_loss"] - m_one["val_loss"]) <= 1e-5 * m_one["val_loss"]
    assert m_ddp["val_loss_by_position"].keys() == m_one["val_loss_by_position"].keys()

    # model.ckpt is the full model in plain names: loads on one CPU process like any other run's.
    w_one = torch.load(one_dir / "model.ckpt", weights_only=True)["state_dict"]
    w_ddp = torch.load(ddp_dir / "model.ckpt", weights_only=True)["state_dict"]
    assert w_one.keys() == w_ddp.keys()
    for k in w_one:
        torch.testing.assert_close(w_ddp[k], w_one[k], rtol=1e-4, atol=1e-6, msg=k)
    from ehrlong.evaluation.representations import load_run

    assert load_run(ddp_dir).module.head.weight.shape == w_ddp["head.weight"].shape
