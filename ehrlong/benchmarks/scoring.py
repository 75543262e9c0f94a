"""Samples -> model -> one score row per sample -> one row per (task, length, depth) cell with a CI."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import polars as pl
import torch

from ehrlong.benchmarks.models import as_logits_model
from ehrlong.benchmarks.tasks import Sample

Z95 = 1.959963984540054


def batch_tensors(samples: Sequence[Sample], control: bool):
    L = samples[0].length
    tokens = np.stack([s.control_tokens if control else s.tokens for s in samples])
    times = np.stack([s.times for s in samples]).astype(np.float32)
    P = max(len(s.positions) for s in samples)
    positions = np.zeros((len(samples), P), dtype=np.int64)
    for r, s in enumerate(samples):
        positions[r, : len(s.positions)] = s.positions
    return (
        torch.from_numpy(tokens.astype(np.int64)),
        torch.from_numpy(times),
        torch.ones(len(samples), L, dtype=torch.bool),
        torch.from_numpy(positions),
    )


@torch.inference_mode()
def score_samples(model, samples: Sequence[Sample], tokens_per_batch: int = 65_536) -> list[dict]:
    """One dict per sample: task, metric, length, depth, index, its metrics (`score` first) and where its
    haystack came from. Samples of equal length share a batch of at most `tokens_per_batch` tokens."""
    m = as_logits_model(model)
    rows: list[dict] = []
    i = 0
    while i < len(samples):
        L = samples[i].length
        size = max(1, tokens_per_batch // L)
        j = i
        while j < len(samples) and j - i < size and samples[j].length == L:
            j += 1
        group = samples[i:j]
        logits = m.logits_at(*batch_tensors(group, control=False)).float().cpu().numpy()
        control = None
        if group[0].control_tokens is not None:
            control = m.logits_at(*batch_tensors(group, control=True)).float().cpu().numpy()
        for r, s in enumerate(group):
            P = len(s.positions)
            metrics = s.task.score(s, logits[r, :P], None if control is None else control[r, :P])
            rows.append(
                {
                    "task": s.task.name,
                    "metric": s.task.metric,
                    "length": s.length,
                    "depth": float(s.depth),
                    "index": s.index,
                    **metrics,
                    "n_subjects": s.meta["n_subjects"],
                    "n_separators": s.meta["n_separators"],
                    "repeated_subjects": s.meta["repeated_subjects"],
                    # Positions in the token store, not subject ids: per_sample.parquet is an output
                    # folder's file, and no subject identifier leaves the data (issue 8, privacy).
                    "subject_indices": list(s.meta["subject_indices"]),
                }
            )
        i = j
    return rows


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(values: np.ndarray, seed: int, n_boot: int = 1000) -> tuple[float, float]:
    """Percentile 95% CI of the mean over `n_boot` resamples of the samples."""
    if len(values) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


GROUP_CELL = ("task", "metric", "length", "depth")
GROUP_LENGTH = ("task", "metric", "length")
_NOT_METRICS = {
    "task",
    "metric",
    "length",
    "depth",
    "index",
    "n_subjects",
    "n_separators",
    "repeated_subjects",
    "finetuned",
    "subject_indices",
}


def aggregate(
    rows: list[dict], chance: dict[str, float], seed: int = 0, by: Sequence[str] = GROUP_CELL
) -> pl.DataFrame:
    """Mean score per group (default: task, metric, length, depth; GROUP_LENGTH pools the depths) with n
    and a 95% CI: Wilson when every per-sample score is 0 or 1 (one exact-retrieval answer), else a
    seeded percentile bootstrap over the samples. Extra per-sample metrics (score_vocab, copy_accuracy,
    hit, ...) are averaged alongside; haystack provenance is summarised as the mean number of subjects
    per haystack and the share of haystacks that needed concatenation."""
    frame = pl.from_dicts(rows, infer_schema_length=None)
    extras = [c for c in frame.columns if c not in _NOT_METRICS and c != "score"]
    out = []
    for keys, part in frame.group_by(list(by), maintain_order=True):
        group = dict(zip(by, keys, strict=True))
        scores = part["score"].to_numpy().astype(np.float64)
        n = len(scores)
        if np.isin(scores, (0.0, 1.0)).all():
            lo, hi = wilson(float(scores.sum()), n)
            method = "wilson"
        else:
            lo, hi = bootstrap_ci(scores, zlib.crc32(f"{seed}/{'/'.join(map(str, keys))}".encode()))
            method = "bootstrap"
        row = {
            **group,
            "score": float(scores.mean()),
            "n": n,
            "ci_low": lo,
            "ci_high": hi,
            "ci_method": method,
            "chance": chance[group["task"]],
        }
        for c in extras:
            vals = part[c].drop_nulls()
            row[c] = float(vals.mean()) if len(vals) else None
        row["mean_subjects"] = float(part["n_subjects"].mean())
        row["share_concatenated"] = float((part["n_subjects"] > 1).mean())
        row["repeated_subjects"] = int(part["repeated_subjects"].sum())
        if "finetuned" in part.columns:
            row["finetuned"] = bool(part["finetuned"].any())
        out.append(row)
    return pl.from_dicts(out, infer_schema_length=None)
