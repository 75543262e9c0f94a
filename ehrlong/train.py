"""Pretrain a backbone on next-event prediction.

    python -m ehrlong.train config=mamba_16k size=tiny trainer.max_steps=20
    python -m ehrlong.train config=list
    python -m ehrlong.train resume=runs/mamba_16k/20261129-231500
    torchrun --nproc-per-node 2 -m ehrlong.train config=mamba_16k trainer.strategy=ddp trainer.devices=2

Data defaults to the embedded synthetic cohort (generated and tokenized on first use, then cached);
`data.root=DIR` takes any MEDS root, `data.root=mimic-iv-demo` the public demo. Each run writes a
self-describing directory runs/<config_name>/<timestamp>/ (config.yaml, tokenizer.json, model.ckpt,
metrics.json, checkpoints/last.ckpt) and an MLflow run tagged backbone / context_length / config_name /
dataset.

Distributed (issue 8): `trainer.strategy=ddp|fsdp trainer.devices=N trainer.num_nodes=M` with any preset.
`batch.tokens_per_step` stays the tokens of one optimizer step over all ranks; each rank trains on its
own subjects (TrainBatches.shard). Only global rank 0 writes the run directory and talks to MLflow;
model.ckpt holds the full (consolidated) weights, so predict/evaluate load it on any machine.

Crash safety (ehrlong/safety.py): every file is written atomically, SIGTERM saves a checkpoint at the
next step boundary and exits with status 143, and `resume=RUN_DIR` continues bit for bit.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from ehrlong.config import PRESETS_DIR, TrainConfig, parse, to_flat_dict
from ehrlong.errors import ConfigError, DataError, first_line, run_cli
from ehrlong.paths import runs_root

PROG = "python -m ehrlong.train"


# --- data ---------------------------------------------------------------------------------------------


def resolve_data_root(cfg: TrainConfig) -> Path:
    """data.root: null -> the synthetic cohort for data.synthetic; a registered dataset name -> fetched
    copy; anything else -> a MEDS folder."""
    from ehrlong.data.datasets import DATASETS, ensure_dataset
    from ehrlong.data.synthetic import ensure_cohort

    if cfg.data.root is None:
        return ensure_cohort(cfg.data.synthetic)
    if cfg.data.root in DATASETS:
        return ensure_dataset(cfg.data.root)
    return Path(cfg.data.root)


def unigram_loss(store, vocab_size: int) -> float:
    """Cross-entropy of the train-split unigram distribution (add-one) on tuning next-token targets:
    the floor a model must beat to have learned anything about order or context."""
    lengths = np.diff(store.offsets)

    def token_mask(split: str) -> np.ndarray:
        in_split = np.zeros(len(lengths), dtype=bool)
        in_split[store.split_indices(split)] = True
        return np.repeat(in_split, lengths)

    tokens = np.asarray(store.tokens)
    counts = np.bincount(tokens[token_mask("train")], minlength=vocab_size).astype(np.float64)
    logp = np.log((counts + 1) / (counts.sum() + vocab_size))
    targets = token_mask("tuning")
    targets[store.offsets[:-1][lengths > 0]] = False  # a subject's first token is nobody's target
    return float(-logp[tokens[targets]].mean()) if targets.any() else float("nan")


# --- run directory ------------------------------------------------------------------------------------


def new_run_dir(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = runs_root(cfg.runs_dir) / cfg.config_name / stamp
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def save_config(cfg: TrainConfig, path: Path) -> None:
    from ehrlong.safety import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(asdict(cfg), sort_keys=False))


def load_resume_config(run_dir: Path, argv: Sequence[str]) -> TrainConfig:
    """The saved config of `run_dir`, with this command line's key=value on top (e.g. a longer max_steps)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"resume={run_dir}: no config.yaml there. Pass a run directory written by {PROG}.")
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(
            f"resume={run_dir}: {path} is not valid YAML{line} ({first_line(e)}). ehrlong writes it whole "
            "or not at all, so it was edited by hand: fix that line, or start a new run."
        ) from e
    overrides = [a for a in argv if not a.startswith(("config=", "resume="))]
    cfg = parse(TrainConfig, overrides, prog=PROG, base=(path, saved))
    cfg.resume = str(run_dir)
    return cfg


def checkpoint_step(path: Path) -> int:
    """The optimizer step `path` was saved at. Read with weights_only=True before Lightning loads the
    file, so a checkpoint that is not plain tensors and primitives (a pickle with code in it) is refused
    here instead of run."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception as e:
        raise DataError(
            f"resume: {path} cannot be read with torch.load(weights_only=True) ({first_line(e)}); it was not "
            f"written by {PROG} (whose checkpoint writes are atomic). Restore it, or delete it to retrain "
            "this run from step 0."
        ) from e


def save_model(state_dict: dict, tokenizer_hash: str, cfg: TrainConfig, path: Path) -> None:
    """Weights + what is needed to rebuild, as plain tensors and primitives (loads with weights_only=True).
    `state_dict` is the full one (Strategy.lightning_module_state_dict: under FSDP, gathered on rank 0)."""
    from ehrlong.safety import atomic_write

    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "tokenizer_hash": tokenizer_hash,
        "config": to_flat_dict(cfg),
    }
    # atomic: a crash leaves the old file or none, never half of one
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


# --- distributed --------------------------------------------------------------------------------------


def trainer_placement(cfg: TrainConfig) -> tuple[int, int]:
    """(world size, this process's global rank) for cfg.trainer, as Lightning resolves them.

    Needed before the real Trainer exists: the per-rank accumulation depends on the world size, and only
    rank 0 creates the run directory its ModelCheckpoint writes to. A throwaway Trainer is the public
    way to ask (it reads LOCAL_RANK/NODE_RANK of Lightning's launcher, torchrun's RANK, SLURM_PROCID);
    it starts no process and joins no process group."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

    t = cfg.trainer
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the real Trainer prints the same "GPU available" lines
    try:
        probe = L.Trainer(
            accelerator=t.accelerator,
            devices=trainer_devices(t.devices),
            num_nodes=t.num_nodes,
            strategy=t.strategy,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"trainer.strategy={t.strategy} trainer.accelerator={t.accelerator} trainer.devices={t.devices} "
            f"trainer.num_nodes={t.num_nodes}: Lightning refuses this placement ({first_line(e)}). "
            "FSDP needs CUDA devices; DDP runs on CPUs (trainer.accelerator=cpu) or GPUs."
        ) from e
    finally:
        quiet.setLevel(level)
    if isinstance(probe.strategy.launcher, _MultiProcessingLauncher):
        raise ConfigError(
            f"trainer.strategy={t.strategy}: this strategy starts its ranks by spawning or forking this "
            "process after each rank's data shard has been chosen (by rank 0's view). Use "
            "trainer.strategy=ddp (Lightning starts the other ranks as fresh processes) or launch with "
            "torchrun / srun."
        )
    return probe.world_size, probe.global_rank


def trainer_devices(devices: str):
    return yaml.safe_load(devices) if devices != "auto" else "auto"


# --- main ---------------------------------------------------------------------------------------------


def warn_if_slow(cfg: TrainConfig) -> None:
    if cfg.size == "base" and not torch.cuda.is_available():
        warnings.warn(
            f"size=base ({cfg.backbone}, ~110-130M parameters) on CPU takes minutes per step at long context. "
            "Use size=tiny (or size=small) to try things out on a CPU; keep base for a GPU.",
            stacklevel=2,
        )


def main(argv: Sequence[str]) -> int:
    cfg = parse(TrainConfig, argv, presets_dir=PRESETS_DIR, prog=PROG)
    if cfg.resume:
        cfg = load_resume_config(Path(cfg.resume), argv)
    warn_if_slow(cfg)

    from ehrlong.safety import EXIT_SIGTERM, SigtermCheckpoint, Terminated

    # SIGTERM from here on: record it, stop at the next optimizer-step boundary with a checkpoint.
    # (Before this line the default action ends the process at once; nothing has been written yet that
    # a kill could leave half-done, see ehrlong/safety.py.)
    sigterm = SigtermCheckpoint(cfg.checkpoint_every)
    previous = signal.getsignal(signal.SIGTERM)
    sigterm.install()
    try:
        return train(cfg, sigterm)
    except Terminated as e:
        print(f"stopped: {e}; resume with {PROG} resume=RUN_DIR", flush=True)
        return EXIT_SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: TrainConfig, sigterm) -> int:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ehrlong.backbones import build_backbone
    from ehrlong.data.batching import EvalBatches, TrainBatches
    from ehrlong.data.meds import dataset_name
    from ehrlong.data.store import TokenStore, ensure_store
    from ehrlong.module import EHRLitModule
    from ehrlong.safety import (
        EXIT_SIGTERM,
        AtomicCheckpointIO,
        Terminated,
        atomic_copy,
        atomic_write_text,
        remove_stale_temporaries,
    )
    from ehrlong.tracking import check_resumable, make_logger, mark_killed, tracking_uri

    world, rank = trainer_placement(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    root = resolve_data_root(cfg)
    store_dir = ensure_store(root, cfg.data.tokenizer)
    store = TokenStore.open(store_dir)
    tokenizer = store.tokenizer

    eval_length = cfg.eval_context_length or cfg.context_length
    if eval_length < 1:  # checked before the run directory exists: a refused run leaves nothing behind
        raise ConfigError(f"eval_context_length must be a positive token count, got {eval_length}.")

    # Only global rank 0 writes the run directory; the other ranks learn its checkpoint folder from
    # ModelCheckpoint, which broadcasts rank 0's dirpath when fit starts.
    run_dir: Path | None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        ckpt: Path | None = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            # Killed before its first checkpoint: nothing to lose, retrain from step 0 in the same run.
            if rank == 0:
                print(f"resume={run_dir}: no checkpoints/last.ckpt yet; training from step 0")
            ckpt = None
        run_id = (
            (run_dir / "mlflow_run_id").read_text().strip() if (run_dir / "mlflow_run_id").is_file() else None
        )
        if run_id and cfg.tracking.enabled and rank == 0:
            check_resumable(tracking_uri(cfg.tracking.tracking_uri, runs_root(cfg.runs_dir)), run_id, run_dir)
        if rank == 0:
            for folder in (run_dir, run_dir / "checkpoints"):
                remove_stale_temporaries(folder)
    else:
        run_dir, ckpt, run_id = None, None, None
        if rank == 0:
            run_dir = new_run_dir(cfg)
            save_config(cfg, run_dir / "config.yaml")
            atomic_copy(store_dir / "tokenizer.json", run_dir / "tokenizer.json")
    if rank == 0:
        print(f"run directory: {run_dir}")

    budget = max(cfg.batch.tokens_per_micro_batch, cfg.context_length)
    per_step = max(1, cfg.batch.tokens_per_step // budget)
    # tokens_per_step is the whole step over all ranks: each rank accumulates its share of micro-batches.
    per_rank = max(1, per_step // world)
    if per_rank * world != per_step and rank == 0:
        print(
            f"note: batch.tokens_per_step={cfg.batch.tokens_per_step} is {per_step} micro-batch(es) of <= "
            f"{budget} tokens, which {world} ranks cannot share evenly: each rank takes {per_rank}, so a "
            f"step is up to {per_rank * world * budget} tokens. Set batch.tokens_per_step to a multiple of "
            f"{world * budget} to keep the step size of a 1-process run."
        )
    max_steps = cfg.trainer.max_steps

    backbone = build_backbone(cfg, tokenizer.vocab_size)
    module = EHRLitModule(
        backbone, tokenizer.vocab_size, cfg.optim, max_steps, eval_length, cfg.model.tie_embeddings
    )

    # Resume at the same data position: the plan is deterministic, so skip what earlier steps consumed.
    start_step = checkpoint_step(ckpt) if ckpt else 0
    train_data = TrainBatches(
        store, "train", cfg.context_length, budget, per_rank, cfg.seed, start_step * per_rank
    )
    # Validation may use longer windows than training (train short, evaluate long: transformer_16k_yarn).
    val_data = EvalBatches(store, "tuning", eval_length, max(budget, eval_length))
    train_data.shard(rank, world)
    val_data.shard(rank, world)
    to_loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.batch.num_workers)  # noqa: E731

    loggers = []
    if cfg.tracking.enabled and rank == 0:  # MLflow from rank 0 only: one run, no duplicate metrics
        uri = tracking_uri(cfg.tracking.tracking_uri, runs_root(cfg.runs_dir))
        tags = {
            "backbone": cfg.backbone,
            "context_length": cfg.context_length,
            "config_name": cfg.config_name,
            "dataset": dataset_name(root),
            "size": cfg.size,
            "world_size": world,
        }
        logger = make_logger(
            uri, cfg.tracking.experiment, runs_root(cfg.runs_dir), run_dir.name, tags, run_id
        )
        if run_id is None:
            logger.log_hyperparams(to_flat_dict(cfg))
            atomic_write_text(run_dir / "mlflow_run_id", logger.run_id)
        loggers.append(logger)

    t = cfg.trainer
    precision = t.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=t.max_epochs if t.max_epochs is not None else -1,
        accelerator=t.accelerator,
        devices=trainer_devices(t.devices),
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
        accumulate_grad_batches=per_rank,
        gradient_clip_val=cfg.optim.grad_clip or None,
        val_check_interval=t.val_check_interval * per_rank if t.val_check_interval else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if t.val_check_interval else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        logger=loggers or False,
        # The datasets shard themselves by rank (above); a DistributedSampler would re-split them.
        use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            sigterm,
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints" if run_dir else None,
                save_last=True,
                save_top_k=0,
                every_n_train_steps=cfg.checkpoint_every,
            ),
        ],
        default_root_dir=run_dir,
    )
    if rank == 0:
        print(
            f"{cfg.backbone} size={cfg.size} L={cfg.context_length} (validation L={eval_length}): "
            f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, "
            f"{per_rank} micro-batch(es) of <= {budget} tokens per step"
            + (f" on each of {world} ranks" if world > 1 else "")
            + f", {max_steps} steps"
        )
    if sigterm.received:  # during start-up: nothing trained, nothing to save
        raise Terminated("SIGTERM before training started")
    t0 = time.perf_counter()
    trainer.fit(
        module,
        train_dataloaders=to_loader(train_data),
        val_dataloaders=to_loader(val_data),
        ckpt_path=ckpt,
        weights_only=True,
    )
    train_seconds = time.perf_counter() - t0
    if sigterm.stopped_at is not None:
        if rank == 0:
            for logger in loggers:
                mark_killed(logger)
            print(
                f"stopped by SIGTERM after step {sigterm.stopped_at}: checkpoint saved to "
                f"{run_dir / 'checkpoints' / 'last.ckpt'}; continue with {PROG} resume={run_dir}",
                flush=True,
            )
        return EXIT_SIGTERM

    # Final validation over the whole tuning split, loss by position bucket, and the unigram floor.
    trainer.limit_val_batches = 1.0
    try:
        val = trainer.validate(module, dataloaders=to_loader(val_data), verbose=False)[0]
    except Terminated:
        for logger in loggers:
            mark_killed(logger)
        raise
    # Every rank takes part: under FSDP this gathers the full weights on rank 0.
    state_dict = trainer.strategy.lightning_module_state_dict()
    if rank != 0:
        return 0
    unigram = unigram_loss(store, tokenizer.vocab_size)
    metrics = {
        "val_loss": val.get("val/loss"),
        "val_perplexity": val.get("val/perplexity"),
        "unigram_loss": unigram,
        "val_loss_by_position": module.val_loss_by_position(),
        "global_step": trainer.global_step,
        "train_seconds": train_seconds,
        "train_tokens_per_s": module.global_tokens_seen / max(train_seconds, 1e-9),
        "parameters": sum(p.numel() for p in module.parameters()),
        "world_size": world,
    }
    save_model(state_dict, tokenizer.hash, cfg, run_dir / "model.ckpt")
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    for logger in loggers:
        logger.log_metrics({"val/unigram_loss": unigram}, step=trainer.global_step)
        logger.experiment.log_artifact(logger.run_id, str(run_dir / "config.yaml"))
        logger.experiment.log_artifact(logger.run_id, str(run_dir / "metrics.json"))
    print(
        f"done: val loss {metrics['val_loss']:.4f} (unigram baseline {unigram:.4f}) after {trainer.global_step} steps "
        f"in {train_seconds:.0f} s; run directory {run_dir}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
