"""Crash safety for training runs (issue 8): atomic checkpoint files and a clean stop on SIGTERM.

The guarantee: SIGKILL at any moment loses at most the optimizer steps since the last checkpoint and
leaves no half-written file where a reader (resume, predict, evaluate, MLflow) looks; SIGTERM finishes
the current optimizer step, writes checkpoints/last.ckpt and exits with status 143 (128 + SIGTERM, the
shell's "terminated" status: the run is not finished, `resume=RUN_DIR` continues it).

- Every file of the run directory is written to a temporary sibling, flushed to disk and renamed over
  its target (`atomic_write`). Lightning 2.6's own "atomic" checkpoint save writes to a file under the
  system temp folder and then `shutil.move`s it, which is a copy (not atomic) whenever /tmp and the runs
  folder are on different filesystems (tmpfs, node-local /tmp vs. a shared runs folder), and leaks the
  temporary file on a kill. `AtomicCheckpointIO` is the CheckpointIO plugin that puts the temporary file
  beside the target instead.
- Lightning 2.6 handles SIGTERM by raising SIGTERMException after whichever micro-batch is running
  (mid-accumulation: there is no consistent step to save, and a checkpoint there would misalign the
  accumulation boundaries on resume), saves nothing unless asked, exits with status 0 (SystemExit
  without a code: a scheduler reads "completed"), and under DDP broadcasts from inside the signal
  handler. Its handler is also re-armed, and its flag reset, at the start of every trainer.fit/validate,
  so a SIGTERM that arrives between the two is forgotten. `SigtermCheckpoint` takes SIGTERM over for
  the whole run: the handler only records the signal, and the training loop acts on it at the next
  optimizer-step boundary, where all ranks agree (one all-reduce of a flag per step).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a temporary sibling of `path`, flush it to disk, then rename it over `path`.

    A kill at any moment leaves the old `path` (or none) and at worst a stray `.NAME.tmp-PID` file,
    never a half-written `path`: rename within one folder is atomic on POSIX filesystems."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # fsync: the rename must not reach the disk before the data does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power cut only once the folder is flushed
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """An empty `<out>.partial` folder to write a command's results into. When the block ends, it replaces
    `out` in one rename; when the block fails it is deleted. Nobody ever sees a half-written `out`."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete `.NAME.tmp-PID` files a killed process left in `folder` (never read by anything)."""
    stale = sorted(Path(folder).glob(".*.tmp-*")) if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO with local checkpoint files written by `atomic_write`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        get_filesystem(path).makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


class Terminated(Exception):
    """Raised to abandon work that SIGTERM made pointless; train.py exits with EXIT_SIGTERM."""


class SigtermCheckpoint(L.Callback):
    """On SIGTERM: finish the optimizer step in flight, save `checkpoints/last.ckpt`, stop training.

    `install()` (main thread, before trainer.fit) puts the handler in place; the callback re-installs it
    each time Lightning has installed its own (at the start of fit and of validate). After fit,
    `received` tells train.py to skip the final validation and exit with EXIT_SIGTERM. It also saves
    last.ckpt when training ends, so a kill during the final validation or export costs no steps.
    """

    def __init__(self, every_n_train_steps: int, ckpt_name: str = "last.ckpt"):
        self.every_n = every_n_train_steps  # ModelCheckpoint saves at these steps itself
        self.ckpt_name = ckpt_name
        self.received = False  # this process got SIGTERM
        self.stopped_at: int | None = None  # global step at which training stopped for it
        self._trainer: L.Trainer | None = None
        self._boundary_step = -1
        self._saved_step = -1

    # --- the signal -----------------------------------------------------------------------------------

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        if not self.received:
            print("SIGTERM: finishing the current step, then saving a checkpoint and exiting", flush=True)
        self.received = True
        # Lightning's `ddp` launcher starts ranks 1.. as child processes of rank 0; a `kill PID` reaches
        # rank 0 only. Pass it on so that every rank stops, also outside the training loop.
        launcher = getattr(self._trainer.strategy, "launcher", None) if self._trainer else None
        if launcher is not None and getattr(launcher, "procs", None):
            launcher.kill(signum)

    # --- Lightning hooks --------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()  # Lightning installed its SIGTERM handler just before this hook: take it back
        self._boundary_step = trainer.global_step
        self._saved_step = trainer.global_step if trainer.ckpt_path else -1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        # The final validation (trainer.validate after fit) changes no training state and its checkpoint
        # is already saved (on_train_end): stop it at once. Validation inside fit runs to its end; the
        # training loop stops at the next step boundary.
        if self.received and trainer.state.fn == "validate":
            raise Terminated(f"SIGTERM during the final validation, after step {trainer.global_step}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self._boundary_step:
            return  # mid-accumulation: the optimizer has not stepped since the last boundary
        self._boundary_step = trainer.global_step
        # Any rank's signal stops all ranks at the same step (a rank that stopped alone would hang the
        # others in their next all-reduce).
        if trainer.strategy.reduce_boolean_decision(self.received, all=False):
            self.received = True
            self.save(trainer)
            self.stopped_at = trainer.global_step
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)  # the final step, unless just saved: the final validation is resumable as is

    # --- saving -----------------------------------------------------------------------------------------

    def save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == self._saved_step or (self.every_n > 0 and step % self.every_n == 0):
            return  # saved already, or ModelCheckpoint saves this step (it runs after this callback)
        # Same folder on every rank: ModelCheckpoint broadcast rank 0's dirpath in its setup.
        trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / self.ckpt_name)
        self._saved_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {}
