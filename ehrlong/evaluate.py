"""python -m ehrlong.evaluate run=RUN_DIR [run=RUN_DIR ...] data=DIR tasks=all k=all

EHRSHOT-style evaluation of trained runs, stratified the Context Clues way (DESIGN.md §6):

    labels (tasks/, es-aces or the synthetic cohort's own)      ehrlong.evaluation.labels
      -> representation per label: last-token state, last L tokens at or before prediction_time
      -> probe per (model, task, k, seed): MaxAbsScaler + L2 logistic regression, C on tuning AUROC
      -> held-out AUROC / AUPRC / Brier with subject-level bootstrap CIs, overall and per quartile of
         repetition, irregularity and event count (cut points recomputed in every resample)
      -> long-vs-short paired differences and win rates when several runs are given

Besides each run, a count baseline (bag of tokens over the same window, same probe) shows what the
model adds over counting. Writes results.{parquet,csv} (model, task, k, seed, stratum, quartile,
metric, value, ci_low, ci_high, ...), comparisons.{parquet,csv}, PNG plots and summary.txt into
`out` (default runs/evaluations/<timestamp>), logs them to each run's MLflow run, and prints a summary.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ehrlong.config import parse
from ehrlong.errors import ConfigError, DataError, run_cli

if TYPE_CHECKING:
    from ehrlong.evaluation.representations import LoadedRun

PROG = "python -m ehrlong.evaluate"
STRATA = ("repetition_1", "repetition", "irregularity", "event_count")  # evaluation.strata columns
BASELINE = "counts"
THIN_CLASS = 10  # held-out positives (or negatives) below which the summary flags a task's CIs


@dataclass
class Args:
    run: list[str] = field(default_factory=list)  # run directories written by ehrlong.train (repeat run=)
    data: str | None = None  # MEDS root or dataset name (mimic-iv-demo); null = the runs' own dataset
    tasks: str = "all"  # all (the tasks that apply to the dataset) | a,b | paths to ACES task .yaml files
    k: list[str] = field(default_factory=lambda: ["all"])  # few-shot k: all | 1,2,4,... | grid (EHRSHOT's)
    seeds: int = 5  # replicate draws per few-shot k (k=all is fit once)
    n_boot: int = 1000  # subject-level bootstrap resamples
    baseline: bool = True  # the count baseline beside the runs
    # Ablation: also embed every run with these window lengths (same weights, L tokens before prediction
    # time), as models "<run>@L<n>", so long-vs-short compares context with the model held fixed.
    context_lengths: list[int] = field(default_factory=list)
    max_labels: int | None = None  # per task: a seeded random sample of this many labels (null = all)
    out: str | None = None  # results folder; null = <runs root>/evaluations/<timestamp>
    tokens_per_batch: int | None = None  # forward batches incl. padding; null = 4,096 on CPU, 65,536 on GPU
    cache: bool = True  # keep representations in <cache root>/representations (per weights, data, L, labels)
    mlflow: bool = True  # log results and plots to each run's MLflow run
    predictions: bool = False  # also write predictions.parquet: per label subject_id, time, probability
    # (it identifies patients, so only when asked; results, plots and MLflow hold no subject ids)
    progress: bool = True


@dataclass
class Model:
    """A run or a baseline: a name and one feature row per label key."""

    name: str
    context_length: int
    backbone: str
    features: object  # np.ndarray [n, d] or scipy CSR
    run: LoadedRun | None = None  # None for the count baseline

    @property
    def run_dir(self) -> Path | None:
        return self.run.run_dir if self.run is not None else None

    @property
    def own_length(self) -> bool:
        """A run at the context length it was trained for (not a context_lengths= ablation entry)."""
        return self.run is not None and self.context_length == self.run.context_length


class Stages:
    """Wall time per stage, printed as each ends and kept for summary.txt (where does evaluation spend it)."""

    def __init__(self, progress: bool):
        self.progress, self.seconds, self._t = progress, {}, time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now
        if self.progress:
            print(f"  [{name}: {self.seconds[name]:.1f} s]")

    def describe(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return f"{total:.1f} s ({parts})"


def _ks(values: Sequence[str]) -> list[int | str]:
    from ehrlong.evaluation.probes import K_SHOTS

    if list(values) == ["grid"]:
        return list(K_SHOTS)
    out: list[int | str] = []
    for v in values:
        if str(v) == "all":
            out.append("all")
        elif str(v).isdigit() and int(v) > 0:
            out.append(int(v))
        else:
            raise ConfigError(
                f"k={v!r}: each k is a positive integer or 'all'; or k=grid for {list(K_SHOTS)}."
            )
    return out


def _label_table(
    tasks: list[str], root: Path, progress: bool, max_labels: int | None
) -> tuple[pl.DataFrame, list[str]]:
    """All tasks' labels in one frame (task, subject_id, prediction_time, boolean_value) + one note each.

    `max_labels` keeps a seeded random sample per task: every label costs one forward pass over L tokens,
    and the MIMIC-IV demo's lab tasks have ~30 labels per patient (about 3,000 per task).
    """
    from ehrlong.evaluation.labels import get_labels

    frames, notes = [], []
    for task in tasks:
        got = get_labels(task, root)
        labels, note = got.labels, got.summary.describe()
        if max_labels is not None and labels.height > max_labels:
            labels = labels.sample(max_labels, seed=0).sort("subject_id", "prediction_time")
            note += f"; evaluated a random {max_labels:,} of them (max_labels)"
        notes.append(note)
        if progress:
            print(f"  {note}")
        frames.append(labels.with_columns(pl.lit(got.summary.task).alias("task")))
    return pl.concat(frames).select("task", "subject_id", "prediction_time", "boolean_value"), notes


def _with_strata(labels: pl.DataFrame, root: Path) -> pl.DataFrame:
    """Strata of each label's full history at or before its prediction time (not only the window)."""
    from ehrlong.data.meds import scan_events
    from ehrlong.evaluation.strata import meds_strata

    keys = labels.select("subject_id", "prediction_time").unique(maintain_order=True)
    values = meds_strata(scan_events(root, with_text=False), keys)
    return labels.join(values, on=["subject_id", "prediction_time"], how="left")


def _splits(store, subject_ids: np.ndarray) -> np.ndarray:
    from ehrlong.data.store import SPLITS

    idx = np.searchsorted(np.asarray(store.subject_ids), subject_ids)
    return np.asarray(SPLITS)[np.asarray(store.splits)[idx]]


def _count_features(store, windows: np.ndarray):
    from ehrlong.evaluation.probes import count_features_flat

    lengths = windows[:, 2] - windows[:, 1]
    codes = np.concatenate([np.asarray(store.tokens[s:e]) for _, s, e in windows]) if len(windows) else []
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return count_features_flat(np.asarray(codes, dtype=np.int64), offsets, store.tokenizer.vocab_size)


def _bootstrap_rows(preds: pl.DataFrame, labels: pl.DataFrame, n_boot: int, progress: bool) -> pl.DataFrame:
    """Metrics with CIs per (model, task, k, seed), overall and per quartile of every stratum."""
    from ehrlong.evaluation.metrics import bootstrap

    frames = []
    groups = preds.group_by(["model", "task"], maintain_order=True)
    n_groups = preds.select("model", "task").n_unique()
    for (model, task), part in tqdm(
        groups, total=n_groups, desc="bootstrap", unit="model x task", disable=not progress
    ):
        part = part.join(labels, on=["task", "subject_id", "prediction_time"], how="left")
        group = part["k"].cast(pl.String) + "|" + part["seed"].cast(pl.String).fill_null("-")
        for i, stratum in enumerate(STRATA):
            res = bootstrap(
                part["y_true"].to_numpy(),
                part["y_prob"].to_numpy(),
                part["subject_id"].to_numpy(),
                n_boot=n_boot,
                groups=group.to_numpy(),
                strata_values=part[stratum].cast(pl.Float64).fill_null(float("nan")).to_numpy(),
            )
            if i > 0:  # the overall rows are the same for every stratum: keep them once
                res = res.filter(pl.col("stratum_quantile").is_not_null())
            frames.append(
                res.with_columns(
                    pl.lit(model).alias("model"),
                    pl.lit(task).alias("task"),
                    pl.when(pl.col("stratum_quantile").is_null())
                    .then(pl.lit("all"))
                    .otherwise(pl.lit(stratum))
                    .alias("stratum"),
                )
            )
    out = pl.concat(frames)
    k_seed = out["group"].str.split("|")
    out = out.with_columns(
        k_seed.list.get(0).cast(pl.Int64).alias("k"),
        k_seed.list.get(1).replace("-", None).cast(pl.Int64).alias("seed"),
        pl.col("stratum_quantile").alias("quartile"),
    )
    cols = ["model", "task", "k", "seed", "stratum", "quartile", "metric", "value", "ci_low", "ci_high"]
    return out.select(*cols, "stratum_low", "stratum_high", "n", "n_subjects", "n_pos", "n_boot_valid")


def _comparisons(
    preds: pl.DataFrame, labels: pl.DataFrame, models: list[Model], n_boot: int, progress: bool
) -> pl.DataFrame:
    """Every longer-context run against every shorter one, and every longer count baseline against every
    shorter one (what the same extra tokens give counting), k=all: paired differences and win rates."""
    from ehrlong.evaluation.metrics import paired_difference

    # Runs against runs, baselines against baselines; same-L pairs are no context comparison.
    runs = [m for m in models if m.run_dir is not None]
    baselines = [m for m in models if m.run_dir is None]
    pairs = [
        (long, short)
        for family in (runs, baselines)
        for long in family
        for short in family
        if long.context_length > short.context_length
    ]
    frames = []
    full = preds.filter(pl.col("k") == -1)
    keys = ["task", "subject_id", "prediction_time"]
    for long, short in pairs:
        a = full.filter(pl.col("model") == long.name).select(*keys, "y_true", pl.col("y_prob").alias("a"))
        b = full.filter(pl.col("model") == short.name).select(*keys, pl.col("y_prob").alias("b"))
        pair = a.join(b, on=keys).join(labels, on=keys, how="left")
        tasks = pair.group_by("task", maintain_order=True)
        desc = f"{long.name} vs {short.name}"
        for task, part in tqdm(tasks, total=pair["task"].n_unique(), desc=desc, disable=not progress):
            for stratum in STRATA:
                res = paired_difference(
                    part["y_true"].to_numpy(),
                    part["a"].to_numpy(),
                    part["b"].to_numpy(),
                    part["subject_id"].to_numpy(),
                    metric=("auroc", "auprc", "brier"),
                    n_boot=n_boot,
                    strata_values=part[stratum].cast(pl.Float64).fill_null(float("nan")).to_numpy(),
                )
                frames.append(
                    res.with_columns(
                        pl.lit(long.name).alias("long"),
                        pl.lit(short.name).alias("short"),
                        pl.lit(task[0]).alias("task"),
                        pl.lit(stratum).alias("stratum"),
                        pl.col("stratum_quantile").alias("quartile"),
                    )
                )
    if not frames:
        return pl.DataFrame()
    cols = ["long", "short", "task", "stratum", "quartile", "metric", "value_a", "value_b", "difference"]
    return pl.concat(frames).select(*cols, "ci_low", "ci_high", "win_rate", "n", "n_boot_valid")


def _summary(results: pl.DataFrame, models: list[Model]) -> str:
    """Task x model table of held-out AUROC [95% CI] at the largest k (seed-mean for few-shot k)."""
    overall = results.filter((pl.col("stratum") == "all") & (pl.col("metric") == "auroc"))
    k_top = -1 if (overall["k"] == -1).any() else int(overall["k"].max())
    top = overall.filter(pl.col("k") == k_top)
    table = top.group_by("model", "task").agg(
        pl.col("value").mean(), pl.col("ci_low").mean(), pl.col("ci_high").mean()
    )
    # Held-out labels, positives and subjects are the task's, whichever model scored them.
    sizes = {
        task: (int(n), int(pos), int(subjects))
        for task, n, pos, subjects in top.group_by("task")
        .agg(pl.col("n").first(), pl.col("n_pos").first(), pl.col("n_subjects").first())
        .iter_rows()
    }
    names = [m.name for m in models]
    lines = [
        f"held-out AUROC [95% CI], k={'all' if k_top == -1 else k_top}; n = held-out labels (positives, subjects)"
    ]
    thin = []
    width = max(len(n) for n in names)
    tasks = sorted(table["task"].unique())
    task_w = max(12, *(len(t) for t in tasks))
    lines.append(f"{'task':{task_w}s}  " + "  ".join(f"{n:>{max(width, 19)}s}" for n in names) + "  n")
    for task in tasks:
        cells = []
        for name in names:
            row = table.filter((pl.col("task") == task) & (pl.col("model") == name))
            if row.height:
                v, lo, hi = row["value"][0], row["ci_low"][0], row["ci_high"][0]
                cells.append(f"{v:.3f} [{lo:.2f}, {hi:.2f}]")
            else:
                cells.append("-")
        labels, pos, subjects = sizes[task]
        n = f"{labels} ({pos}, {subjects})"
        lines.append(f"{task:{task_w}s}  " + "  ".join(f"{c:>{max(width, 19)}s}" for c in cells) + f"  {n}")
        if min(pos, labels - pos) < THIN_CLASS:
            thin.append(f"{task} ({pos} positive, {labels - pos} negative)")
    if thin:
        # A subject-level bootstrap over a handful of positives resamples the same few cases: its CI is
        # narrow because there is little to vary, not because the estimate is precise.
        lines.append(
            f"too few held-out cases to trust the CI (fewer than {THIN_CLASS} of a class): " + ", ".join(thin)
        )
    return "\n".join(lines)


def _verdict(ci_low: float, ci_high: float) -> str:
    """What a paired difference's CI says: a side wins only when the CI excludes zero."""
    if math.isnan(ci_low):
        return "no CI"
    if ci_low > 0:
        return "longer better"
    if ci_high < 0:
        return "shorter better"
    return "CI includes 0"


def _comparison_summary(comparisons: pl.DataFrame) -> str:
    """Longer minus shorter context, held-out AUROC over all labels, per pair and task ("" if no pairs)."""
    if not comparisons.height:
        return ""
    # Every stratum repeats the overall cell (quartile null) on the same resamples; print it once.
    overall = comparisons.filter(
        (pl.col("stratum") == STRATA[0]) & pl.col("quartile").is_null() & (pl.col("metric") == "auroc")
    )
    lines = ["longer minus shorter context: held-out AUROC difference [95% CI], win rate over resamples"]
    for long, short, task, diff, lo, hi, win in overall.select(
        "long", "short", "task", "difference", "ci_low", "ci_high", "win_rate"
    ).iter_rows():
        cell = (
            "n/a"
            if math.isnan(diff)
            else f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]  win {win:.2f}  {_verdict(lo, hi)}"
        )
        lines.append(f"  {long} vs {short}, {task}: {cell}")
    return "\n\n" + "\n".join(lines)


def _plots(results: pl.DataFrame, models: list[Model], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    tasks = sorted(results["task"].unique())
    full = results.filter((pl.col("k") == -1) & (pl.col("metric") == "auroc"))
    # 1. AUROC by stratum quartile, one panel per (stratum, task).
    if full.height:
        fig, axes = plt.subplots(
            len(STRATA), len(tasks), figsize=(3.2 * len(tasks), 2.6 * len(STRATA)), squeeze=False
        )
        for r, stratum in enumerate(STRATA):
            for c, task in enumerate(tasks):
                ax = axes[r][c]
                for m in models:
                    rows = full.filter(
                        (pl.col("model") == m.name)
                        & (pl.col("task") == task)
                        & (pl.col("stratum") == stratum)
                    ).sort("quartile")
                    if rows.height:
                        q, v = rows["quartile"].to_numpy(), rows["value"].to_numpy()
                        err = np.abs(
                            np.vstack([v - rows["ci_low"].to_numpy(), rows["ci_high"].to_numpy() - v])
                        )
                        ax.errorbar(q, v, yerr=np.nan_to_num(err), marker="o", capsize=3, label=m.name)
                ax.set_title(f"{task}\nby {stratum} quartile", fontsize=8)
                ax.set_xticks([1, 2, 3, 4])
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.supylabel("held-out AUROC (95% CI)")
        fig.tight_layout()
        paths.append(out / "auroc_by_quartile.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    # 2. AUROC vs k (seed mean), one panel per task.
    overall = results.filter((pl.col("stratum") == "all") & (pl.col("metric") == "auroc"))
    if overall["k"].n_unique() > 1:
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
        for c, task in enumerate(tasks):
            for m in models:
                rows = (
                    overall.filter((pl.col("model") == m.name) & (pl.col("task") == task))
                    .group_by("k")
                    .agg(pl.col("value").mean())
                    .sort("k")
                )
                k = rows["k"].to_numpy().astype(float)
                k[k == -1] = np.nanmax(np.r_[k[k > 0], 1]) * 2  # "all" drawn after the largest k
                axes[0][c].plot(k, rows["value"].to_numpy(), marker="o", label=m.name)
            axes[0][c].set_xscale("log", base=2)
            axes[0][c].set_title(task, fontsize=8)
            axes[0][c].set_xlabel("k (rightmost: all)")
        axes[0][0].set_ylabel("held-out AUROC")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "auroc_vs_k.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    # 3. Validation perplexity by position in the window, per run (from its metrics.json).
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for m in models:
        path = m.run_dir / "metrics.json" if m.own_length else None
        if path is None or not path.is_file():
            continue
        by_pos = json.loads(path.read_text()).get("val_loss_by_position") or {}
        if by_pos:
            ends = [int(k.split("-")[1]) for k in by_pos]
            ax.plot(ends, [math.exp(min(v, 50)) for v in by_pos.values()], marker="o", label=m.name)
            drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in the window (bucket end)")
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "perplexity_by_position.png")
        fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _save_probes(
    probes: dict, models: list[Model], results: pl.DataFrame, root: Path, out: Path, max_labels
) -> None:
    """Each run's k=all probe per task into <run>/probes/<task>.json, where ehrlong.predict finds it.

    The meta keeps what predict needs to check it is applied as it was fit (tokenizer, context length,
    dataset) and the held-out AUROC evaluate reported, so predictions can be checked against it."""
    from ehrlong.evaluation.probes import save_probe

    by_name = {m.name: m.run for m in models if m.own_length}
    for (name, task), probe in probes.items():
        run = by_name[name]
        row = results.filter(
            (pl.col("model") == name)
            & (pl.col("task") == task)
            & (pl.col("k") == -1)
            & (pl.col("stratum") == "all")
            & (pl.col("metric") == "auroc")
        ).row(0, named=True)
        meta = {
            "task": task,
            "config_name": run.cfg.config_name,
            "context_length": run.context_length,
            "tokenizer_hash": run.tokenizer_hash,
            "dataset": str(root),
            "evaluation": str(out),
            "max_labels": max_labels,
            "held_out_auroc": row["value"],
            "held_out_n": row["n"],
        }
        save_probe(probe, run.run_dir / "probes" / f"{task}.json", meta)


def _metric_key(row: dict) -> str:
    """MLflow name of one k=all result row: eval/<task>/<metric>[/<stratum>/q<n>] (ehrlong.compare reads it)."""
    key = f"eval/{row['task']}/{row['metric']}"
    return key if row["stratum"] == "all" else f"{key}/{row['stratum']}/q{row['quartile']}"


def _log_mlflow(models: list[Model], results: pl.DataFrame, out: Path, files: list[Path]) -> None:
    """Results and plots as artifacts of each run's MLflow run; every k=all value and its CI bounds as
    metrics (`<key>`, `<key>/ci_low`, `<key>/ci_high`, keys from _metric_key) so compare can find them."""
    import mlflow
    from mlflow.entities import Metric

    from ehrlong.tracking import tracking_uri

    for m in [m for m in models if m.own_length]:
        run = m.run
        id_file = run.run_dir / "mlflow_run_id"
        if not id_file.is_file() or not run.cfg.tracking.enabled:
            continue
        client = mlflow.MlflowClient(tracking_uri(run.cfg.tracking.tracking_uri, run.run_dir.parent.parent))
        run_id = id_file.read_text().strip()
        now = int(time.time() * 1000)
        metrics = []
        for row in results.filter((pl.col("model") == m.name) & (pl.col("k") == -1)).iter_rows(named=True):
            key = _metric_key(row)
            for suffix, col in (("", "value"), ("/ci_low", "ci_low"), ("/ci_high", "ci_high")):
                if row[col] is not None and not math.isnan(row[col]):
                    metrics.append(Metric(key + suffix, float(row[col]), now, 0))
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics per batch
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        for f in files:
            client.log_artifact(run_id, str(f), artifact_path=f"evaluation/{out.name}")


def evaluate(args: Args) -> Path:
    from ehrlong.evaluation.labels import resolve_tasks
    from ehrlong.evaluation.metrics import EvalInputError
    from ehrlong.evaluation.probes import K_ALL, evaluate_probe
    from ehrlong.evaluation.representations import (
        data_root,
        load_run,
        representations,
        store_for_run,
    )
    from ehrlong.paths import cache_root, runs_root
    from ehrlong.safety import atomic_folder

    if not args.run:
        raise ConfigError(f"give at least one run: {PROG} run=runs/<config>/<timestamp> [run=...]")
    if args.n_boot < 100:
        raise ConfigError(f"n_boot={args.n_boot}: use >= 100 resamples (1,000 for reported CIs).")
    stages = Stages(args.progress)
    ks = _ks(args.k)
    runs = [load_run(r) for r in args.run]
    root = data_root(args.data, runs)
    tasks = resolve_tasks(args.tasks, root)
    print(f"evaluating {len(runs)} run(s) on {root}: tasks {', '.join(tasks)}; k={ks}")
    if any(n < 1 for n in args.context_lengths):
        raise ConfigError(f"context_lengths={args.context_lengths}: each is a positive number of tokens.")
    if args.max_labels is not None and args.max_labels < 10:
        raise ConfigError(f"max_labels={args.max_labels}: keep at least 10 labels per task, or null for all.")
    labels, notes = _label_table(tasks, root, args.progress, args.max_labels)
    stages.done("runs + labels")
    labels = _with_strata(labels, root)
    stages.done("strata")
    keys = labels.select("subject_id", "prediction_time").unique(maintain_order=True)

    # Features per model for every distinct (subject, prediction_time); tasks share them.
    models: list[Model] = []
    names = [f"{r.cfg.config_name}@{r.run_dir.name}" if len(runs) > 1 else r.cfg.config_name for r in runs]
    valid = None
    stores = {}
    cache_dir = cache_root() / "representations" if args.cache else None
    for run, name in zip(runs, names, strict=True):
        store = store_for_run(run, root)
        extra = [n for n in args.context_lengths if n != run.context_length]
        for length in [run.context_length, *extra]:
            reps, win = representations(
                run, store, keys, args.progress, args.tokens_per_batch, length, cache_dir
            )
            valid = win.valid if valid is None else valid & win.valid
            label = name if length == run.context_length else f"{name}@L{length}"
            models.append(Model(label, length, run.cfg.backbone, reps, run))
            stores[length] = (store, win)
            stages.done("representations")
    if args.baseline:
        for length, (store, win) in sorted(stores.items()):  # the runs' own windows: same keys, same L
            feats = _count_features(store, win.windows)
            name = BASELINE if len(stores) == 1 else f"{BASELINE}_L{length}"
            models.append(Model(name, length, BASELINE, feats))
        stages.done("count features")
    store = next(iter(stores.values()))[0]
    n_dropped = int((~valid).sum())
    if n_dropped:
        print(
            f"  {n_dropped:,} label times have no token at or before them (or no subject in the store): "
            "left out of every probe, counted in summary.txt"
        )
    keys = keys.with_row_index("row").filter(pl.Series(valid))

    # Probes per (model, task); the k=all probe of each run is kept for ehrlong.predict.
    frames, probes = [], {}
    bar = tqdm(
        total=labels["task"].n_unique() * len(models), desc="probes", unit="fit", disable=not args.progress
    )
    for task in labels["task"].unique(maintain_order=True):
        part = labels.filter(pl.col("task") == task).join(
            keys, on=["subject_id", "prediction_time"], how="inner"
        )
        sids = part["subject_id"].to_numpy()
        split = _splits(store, sids)
        for m in models:
            bar.update(1)
            X = m.features[part["row"].to_numpy()]
            fitted: dict = {}
            try:
                pred = evaluate_probe(
                    X,
                    part["boolean_value"].to_numpy(),
                    sids,
                    split,
                    ks=ks,
                    seeds=range(args.seeds),
                    fitted=fitted,
                )
            except EvalInputError as e:  # e.g. a split without positives on a small cohort: say so, go on
                notes.append(f"{task} / {m.name}: no probe fit: {e}")
                print(f"  {notes[-1]}")
                continue
            if m.own_length and (K_ALL, None) in fitted:
                probes[(m.name, task)] = fitted[(K_ALL, None)]
            meta = part.select("subject_id", "prediction_time")[pred["label_index"].to_numpy()]
            frames.append(
                pred.with_columns(
                    meta["prediction_time"], pl.lit(task).alias("task"), pl.lit(m.name).alias("model")
                )
            )
    if not frames:
        raise DataError("no probe could be fit for any task:\n" + "\n".join(notes))
    bar.close()
    stages.done("probes")
    preds = pl.concat(frames)
    results = _bootstrap_rows(preds, labels, args.n_boot, args.progress)
    stages.done("bootstrap")
    comparisons = _comparisons(preds, labels, models, args.n_boot, args.progress)
    stages.done("comparisons")

    out = (
        Path(args.out) if args.out else runs_root() / "evaluations" / datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    with atomic_folder(out) as tmp:  # all or nothing: a failed evaluation leaves no half-written folder
        results.write_parquet(tmp / "results.parquet")
        results.write_csv(tmp / "results.csv")
        if args.predictions:
            preds.write_parquet(tmp / "predictions.parquet")
        if comparisons.height:
            comparisons.write_parquet(tmp / "comparisons.parquet")
            comparisons.write_csv(tmp / "comparisons.csv")
        summary = _summary(results, models) + _comparison_summary(comparisons)
        notes.append(f"{n_dropped:,} label times without any token at or before them: not evaluated")
        plots = _plots(results, models, tmp)
        stages.done("write + plots")
        text = (
            f"{summary}\n\nlabels:\n"
            + "\n".join(f"  {n}" for n in notes)
            + f"\n\ntime: {stages.describe()}\n"
        )
        (tmp / "summary.txt").write_text(text)
    files = [out / p.name for p in plots] + [out / "results.csv", out / "summary.txt"]
    if comparisons.height:
        files.append(out / "comparisons.csv")
    _save_probes(probes, models, results, root, out, args.max_labels)
    if args.mlflow:
        _log_mlflow(models, results, out, files)
        stages.done("mlflow")
    print(f"\n{text}\nwrote {out}")
    return out


def main(argv: Sequence[str]) -> int:
    evaluate(parse(Args, argv, prog=PROG))
    return 0


if __name__ == "__main__":
    run_cli(main)
