"""Frozen representations for labels: a trained run's last-layer hidden state at the last token at or
before each prediction time, over the last L tokens (L = the run's context length). This is the EHRSHOT
protocol as Context Clues used it (DESIGN.md §6; Wornow et al. 2024, §3).

No leakage (DESIGN.md §3): a label's window ends at the last token with time <= prediction_time, so no
event after prediction_time can reach its representation (tests/test_representations.py changes every
later token and checks the vectors do not move).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from ehrlong.backbones import build_backbone
from ehrlong.config import TrainConfig, load_yaml_mapping, parse
from ehrlong.data.batching import collate
from ehrlong.data.store import TokenStore
from ehrlong.errors import ConfigError, DataError, first_line
from ehrlong.module import EHRLitModule
from ehrlong.tokenizer import EventTokenizer

TRAIN_PROG = "python -m ehrlong.train"


def default_tokens_per_batch(device: torch.device | str) -> int:
    """Forward-pass batch size (tokens, padding included) for frozen representations.

    Small on CPU: activations of a large batch exceed glibc's 32 MB mmap ceiling, so every op maps fresh
    pages and pays a page fault per 4 KB; embedding 64 MIMIC-IV windows of 1,024 tokens with tiny Mamba
    on one thread took 49.6 s at 65,536 tokens per batch (61% system time) and 17-21 s at 1,024-4,096.
    Large on an accelerator, where the batch is what fills it."""
    return 4096 if torch.device(device).type == "cpu" else 65_536


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: TrainConfig
    module: EHRLitModule
    tokenizer: EventTokenizer
    tokenizer_hash: str

    @property
    def context_length(self) -> int:
        return self.cfg.context_length


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a trained model from its run directory alone (config.yaml, tokenizer.json, model.ckpt)."""
    run_dir = Path(run_dir)
    missing = [n for n in ("config.yaml", "tokenizer.json", "model.ckpt") if not (run_dir / n).is_file()]
    if missing:
        raise ConfigError(
            f"run={run_dir}: missing {', '.join(missing)}. Pass a finished run directory written by "
            "python -m ehrlong.train (runs/<config>/<timestamp>/)."
        )
    path = run_dir / "config.yaml"
    saved = load_yaml_mapping(
        path, "run config", f"Restore the config.yaml {TRAIN_PROG} wrote for this run, or retrain."
    )
    cfg = parse(TrainConfig, [], base=(path, saved))
    tokenizer = EventTokenizer.load(run_dir / "tokenizer.json")
    try:
        # weights_only: a checkpoint is data; one that carries code is refused, never run.
        ckpt = torch.load(run_dir / "model.ckpt", map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise DataError(
            f"{run_dir / 'model.ckpt'} cannot be read with torch.load(weights_only=True) ({first_line(e)}): "
            f"it is damaged, or was not written by {TRAIN_PROG} (a checkpoint carrying code is refused, never "
            "run). Copy the run directory again or retrain."
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise DataError(
            f"{run_dir / 'model.ckpt'} holds no state_dict; it was not written by {TRAIN_PROG} "
            "(checkpoints/last.ckpt is Lightning's resume file, not a model). Retrain, or copy the run again."
        )
    module = EHRLitModule(
        build_backbone(cfg, tokenizer.vocab_size),
        tokenizer.vocab_size,
        cfg.optim,
        1,
        cfg.context_length,
        cfg.model.tie_embeddings,
    )
    if ckpt.get("tokenizer_hash") != tokenizer.hash:
        raise ConfigError(
            f"run={run_dir}: model.ckpt was trained with tokenizer {str(ckpt.get('tokenizer_hash'))[:12]} but "
            f"tokenizer.json is {tokenizer.hash[:12]}: its token ids would mean other codes. Put back the "
            "tokenizer.json written with this checkpoint (or the checkpoint of this tokenizer)."
        )
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise DataError(
            f"{run_dir / 'model.ckpt'} does not fit the model {run_dir / 'config.yaml'} describes "
            f"({first_line(e)}). "
            "Put back the config.yaml written with this checkpoint."
        ) from None
    return LoadedRun(run_dir, cfg, module.eval(), tokenizer, ckpt["tokenizer_hash"])


def data_root(data: str | None, runs: list[LoadedRun]) -> Path:
    """The MEDS root to evaluate or predict on: `data` (a dataset name such as mimic-iv-demo, or a path),
    else the dataset the runs were trained on (they must agree)."""
    from ehrlong.data.datasets import DATASETS, ensure_dataset
    from ehrlong.train import resolve_data_root

    if data is not None:
        return ensure_dataset(data) if data in DATASETS else Path(data)
    roots = {resolve_data_root(r.cfg).resolve() for r in runs}
    if len(roots) > 1:
        raise ConfigError(
            f"the runs were trained on different datasets ({', '.join(map(str, sorted(roots)))}); "
            "pass data=DIR to use one."
        )
    return roots.pop()


def store_for_run(run: LoadedRun, root: Path) -> TokenStore:
    """The token store of `root` in the run's vocabulary.

    On the run's own dataset that is the store training used (the recipe fitted on its train split).
    On any other dataset, or when that store's fitted vocabulary differs, `root` is encoded with the
    run's tokenizer.json: a refit would give token ids that mean other codes than the run learned.
    Codes the run never saw become UNK and are counted in the store's meta.json."""
    from ehrlong.data.store import META_FILE, default_store_dir, ensure_store
    from ehrlong.tokenizer import load_recipe

    fitted = default_store_dir(root, load_recipe(run.cfg.data.tokenizer))
    if (fitted / META_FILE).is_file():
        store = TokenStore.open(fitted)
        if store.tokenizer.hash == run.tokenizer_hash:
            return store
    return TokenStore.open(ensure_store(root, progress=False, tokenizer=run.tokenizer))


@dataclass
class Windows:
    """One row per label: (subject index in the store, start, end) of its token window; `valid` is False
    for labels that have no window (subject not in the store, or no token at or before prediction_time)."""

    windows: np.ndarray  # [n, 3] int64
    valid: np.ndarray  # [n] bool
    known: np.ndarray  # [n] bool: the subject is in the store
    n_unknown_subject: int
    n_no_history: int


def label_windows(store: TokenStore, labels: pl.DataFrame, length: int) -> Windows:
    """The last `length` tokens at or before each label's prediction_time (time <= prediction_time)."""
    subject_ids = labels["subject_id"].to_numpy()
    # Integer microseconds on both sides: the cut is exact (an event 1 us after prediction_time stays out).
    pred_us = labels["prediction_time"].cast(pl.Datetime("us")).to_physical().to_numpy()
    store_ids = np.asarray(store.subject_ids)
    order = np.argsort(store_ids, kind="stable")
    pos = np.searchsorted(store_ids, subject_ids, sorter=order)
    pos = np.minimum(pos, len(order) - 1)
    subj = order[pos]
    known = store_ids[subj] == subject_ids
    offsets, times_us = np.asarray(store.offsets), store.times_us
    windows = np.zeros((len(labels), 3), dtype=np.int64)
    for i in np.flatnonzero(known):
        s, e = offsets[subj[i]], offsets[subj[i] + 1]
        end = s + int(np.searchsorted(times_us[s:e], pred_us[i], side="right"))
        windows[i] = (subj[i], max(s, end - length), end)
    has_history = windows[:, 2] > windows[:, 1]
    return Windows(
        windows=windows,
        valid=known & has_history,
        known=known,
        n_unknown_subject=int((~known).sum()),
        n_no_history=int((known & ~has_history).sum()),
    )


@torch.no_grad()
def embed_windows(
    module: EHRLitModule,
    store: TokenStore,
    windows: np.ndarray,
    tokens_per_batch: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Last-token hidden state [n, d_model] (float32) of each (subject, start, end) window (end > start)."""
    lengths = windows[:, 2] - windows[:, 1]
    if (lengths < 1).any():
        raise ValueError("embed_windows needs non-empty windows; filter with Windows.valid first")
    out = np.zeros((len(windows), module.backbone.d_model), dtype=np.float32)
    order = np.argsort(-lengths, kind="stable")  # longest first: rows of a batch have similar lengths
    device = next(module.parameters()).device
    tokens_per_batch = tokens_per_batch or default_tokens_per_batch(device)
    tokens, times_us, offsets = store.tokens, store.times_us, np.asarray(store.offsets)
    bar = tqdm(total=len(windows), desc="representations", unit="label", disable=not progress)
    i = 0
    while i < len(order):
        longest = int(lengths[order[i]])
        rows = order[i : i + max(1, tokens_per_batch // longest)]
        batch = collate(tokens, times_us, offsets, windows, rows)
        hidden = module.backbone(
            tokens=batch.tokens.to(device), times=batch.times.to(device), mask=batch.mask.to(device)
        )
        last = torch.as_tensor(lengths[rows] - 1, device=device)
        out[rows] = hidden[torch.arange(len(rows), device=device), last].float().cpu().numpy()
        bar.update(len(rows))
        i += len(rows)
    bar.close()
    return out


def _cache_key(run: LoadedRun, store: TokenStore, labels: pl.DataFrame, length: int) -> str:
    """Changes with the weights (checkpoint size and mtime), the store, the window length and the labels."""
    ckpt = (run.run_dir / "model.ckpt").stat()
    keys = labels.select("subject_id", pl.col("prediction_time").cast(pl.Datetime("us")).dt.epoch("us"))
    h = hashlib.sha1()
    for part in (
        str(run.run_dir.resolve()),
        ckpt.st_size,
        ckpt.st_mtime_ns,
        str(Path(store.root).resolve()),
        length,
    ):
        h.update(f"{part}|".encode())
    h.update(keys.to_numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:20]


def representations(
    run: LoadedRun,
    store: TokenStore,
    labels: pl.DataFrame,
    progress: bool = True,
    tokens_per_batch: int | None = None,
    length: int | None = None,
    cache_dir: Path | None = None,
) -> tuple[np.ndarray, Windows]:
    """Representations [n_labels, d_model] of `labels` (subject_id, prediction_time) under `run`, over the
    last `length` tokens (default: the run's context length); rows of labels without a window are NaN
    and counted in the returned Windows (never dropped silently). With `cache_dir`, results are kept there
    per (weights, store, length, labels), so re-evaluating with other k, tasks or bootstrap settings does
    not embed again."""
    if store.tokenizer.hash != run.tokenizer_hash:
        raise DataError(
            f"token store {store.root} was built with tokenizer {store.tokenizer.hash[:12]}, the run "
            f"{run.run_dir} with {run.tokenizer_hash[:12]}: token ids would mean different codes. Evaluate "
            "on data tokenized with the run's tokenizer.json."
        )
    length = length or run.context_length
    win = label_windows(store, labels, length)
    path = cache_dir / f"{_cache_key(run, store, labels, length)}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        reps = np.load(path)
        if reps.shape == (len(labels), run.module.backbone.d_model):
            if progress:
                print(f"  representations of {run.run_dir.name} at L={length}: cached ({path})")
            return reps, win
    reps = np.full((len(labels), run.module.backbone.d_model), np.nan, dtype=np.float32)
    if win.valid.any():
        reps[win.valid] = embed_windows(
            run.module, store, win.windows[win.valid], tokens_per_batch=tokens_per_batch, progress=progress
        )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial.npy")
        np.save(tmp, reps)
        tmp.replace(path)
    return reps, win
