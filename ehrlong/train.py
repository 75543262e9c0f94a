"""Pretrain a backbone on next-event prediction.

    python -m ehrlong.train config=mamba_16k size=tiny trainer.max_steps=20
    python -m ehrlong.train config=list
    python -m ehrlong.train resume=runs/mamba_16k/20261129-231500

Data defaults to the embedded synthetic cohort (generated and tokenized on first use, then cached);
`data.root=DIR` takes any MEDS root, `data.root=mimic-iv-demo` the public demo. Each run writes a
self-describing directory runs/<config_name>/<timestamp>/ (config.yaml, tokenizer.json, model.ckpt,
metrics.json, checkpoints/last.ckpt) and an MLflow run tagged backbone / context_length / config_name /
dataset.
"""

from __future__ import annotations

import json
import os
import shutil
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
from ehrlong.errors import ConfigError, run_cli
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    os.replace(tmp, path)


def load_resume_config(run_dir: Path, argv: Sequence[str]) -> TrainConfig:
    """The saved config of `run_dir`, with this command line's key=value on top (e.g. a longer max_steps)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"resume={run_dir}: no config.yaml there. Pass a run directory written by {PROG}.")
    overrides = [a for a in argv if not a.startswith(("config=", "resume="))]
    cfg = parse(TrainConfig, overrides, prog=PROG, base=(path, yaml.safe_load(path.read_text()) or {}))
    cfg.resume = str(run_dir)
    return cfg


def save_model(module, tokenizer_hash: str, cfg: TrainConfig, path: Path) -> None:
    """Weights + what is needed to rebuild, as plain tensors and primitives (loads with weights_only=True)."""
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "tokenizer_hash": tokenizer_hash,
        "config": to_flat_dict(cfg),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the old file or none, never half of one


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

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ehrlong.backbones import build_backbone
    from ehrlong.data.batching import EvalBatches, TrainBatches
    from ehrlong.data.meds import dataset_name
    from ehrlong.data.store import TokenStore, ensure_store
    from ehrlong.module import EHRLitModule
    from ehrlong.tracking import make_logger, tracking_uri

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    root = resolve_data_root(cfg)
    store_dir = ensure_store(root, cfg.data.tokenizer)
    store = TokenStore.open(store_dir)
    tokenizer = store.tokenizer

    if cfg.resume:
        run_dir = Path(cfg.resume)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise ConfigError(f"resume={run_dir}: no checkpoints/last.ckpt yet; start a new run instead.")
        run_id = (
            (run_dir / "mlflow_run_id").read_text().strip() if (run_dir / "mlflow_run_id").is_file() else None
        )
    else:
        run_dir, ckpt, run_id = new_run_dir(cfg), None, None
        save_config(cfg, run_dir / "config.yaml")
        shutil.copyfile(store_dir / "tokenizer.json", run_dir / "tokenizer.json")
    print(f"run directory: {run_dir}")

    eval_length = cfg.eval_context_length or cfg.context_length
    if eval_length < 1:
        raise ConfigError(f"eval_context_length must be a positive token count, got {eval_length}.")
    budget = max(cfg.batch.tokens_per_micro_batch, cfg.context_length)
    per_step = max(1, cfg.batch.tokens_per_step // budget)
    max_steps = cfg.trainer.max_steps

    backbone = build_backbone(cfg, tokenizer.vocab_size)
    module = EHRLitModule(
        backbone, tokenizer.vocab_size, cfg.optim, max_steps, eval_length, cfg.model.tie_embeddings
    )

    # Resume at the same data position: the plan is deterministic, so skip what earlier steps consumed.
    # mmap: read the step without loading the checkpoint's tensors (Lightning loads them again in fit).
    start_step = (
        torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"] if ckpt else 0
    )
    train_data = TrainBatches(
        store, "train", cfg.context_length, budget, per_step, cfg.seed, start_step * per_step
    )
    # Validation may use longer windows than training (train short, evaluate long: transformer_16k_yarn).
    val_data = EvalBatches(store, "tuning", eval_length, max(budget, eval_length))
    to_loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.batch.num_workers)  # noqa: E731

    loggers = []
    if cfg.tracking.enabled:
        uri = tracking_uri(cfg.tracking.tracking_uri, runs_root(cfg.runs_dir))
        tags = {
            "backbone": cfg.backbone,
            "context_length": cfg.context_length,
            "config_name": cfg.config_name,
            "dataset": dataset_name(root),
            "size": cfg.size,
        }
        logger = make_logger(
            uri, cfg.tracking.experiment, runs_root(cfg.runs_dir), run_dir.name, tags, run_id
        )
        if run_id is None:
            logger.log_hyperparams(to_flat_dict(cfg))
            (run_dir / "mlflow_run_id").write_text(logger.run_id)
        loggers.append(logger)

    t = cfg.trainer
    precision = t.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=t.max_epochs if t.max_epochs is not None else -1,
        accelerator=t.accelerator,
        devices=yaml.safe_load(t.devices) if t.devices != "auto" else "auto",
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
        accumulate_grad_batches=per_step,
        gradient_clip_val=cfg.optim.grad_clip or None,
        val_check_interval=t.val_check_interval * per_step if t.val_check_interval else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if t.val_check_interval else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        logger=loggers or False,
        callbacks=[
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                save_last=True,
                save_top_k=0,
                every_n_train_steps=cfg.checkpoint_every,
            )
        ],
        default_root_dir=run_dir,
    )
    print(
        f"{cfg.backbone} size={cfg.size} L={cfg.context_length} (validation L={eval_length}): "
        f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, "
        f"{per_step} micro-batch(es) of <= {budget} tokens per step, {max_steps} steps"
    )
    t0 = time.perf_counter()
    trainer.fit(
        module, train_dataloaders=to_loader(train_data), val_dataloaders=to_loader(val_data), ckpt_path=ckpt
    )
    train_seconds = time.perf_counter() - t0

    # Final validation over the whole tuning split, loss by position bucket, and the unigram floor.
    trainer.limit_val_batches = 1.0
    val = trainer.validate(module, dataloaders=to_loader(val_data), verbose=False)[0]
    unigram = unigram_loss(store, tokenizer.vocab_size)
    metrics = {
        "val_loss": val.get("val/loss"),
        "val_perplexity": val.get("val/perplexity"),
        "unigram_loss": unigram,
        "val_loss_by_position": module.val_loss_by_position(),
        "global_step": trainer.global_step,
        "train_seconds": train_seconds,
        "train_tokens_per_s": module.tokens_seen / max(train_seconds, 1e-9),
        "parameters": sum(p.numel() for p in module.parameters()),
    }
    if trainer.is_global_zero:
        save_model(module, tokenizer.hash, cfg, run_dir / "model.ckpt")
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
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
