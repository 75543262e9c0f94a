"""Effective context length, length x depth heatmaps and the printed summary of a benchmark."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ehrlong.benchmarks.scoring import GROUP_LENGTH, aggregate

# RULER (Hsieh et al. 2024, §4) calls a length "effective" when a model's score there exceeds 85.6 (of
# 100): the score Llama-2-7B, a model with a 4k training context, reaches at 4k tokens, i.e. "as good
# as a short-context model is at its own length". That absolute bar is tied to text LLMs; an EHR model
# has no Llama-2 reference, so the same ratio is applied to the model's own score at its shortest
# tested length (research/anchor_longcontext.md §5.4).
THRESHOLD = 0.856
RULE = (
    "effective length: the longest tested length up to which the mean score (over depths) stays >= 85.6% "
    "of the same model's score at the shortest tested length. RULER (Hsieh et al. 2024) uses an absolute "
    "bar instead: the largest length whose score exceeds 85.6, Llama-2-7B's score at 4k tokens. A score "
    "that recovers after a drop does not extend the effective length (longest_passing reports it); none "
    "when the shortest-length score, or the low end of its 95% CI, is not above chance. "
    "effective_length_far applies the same rule to the depths below 1 only, leaving out the target placed "
    "right before the query: a model that only uses its last few tokens scores the same there at every "
    "length, so the plain rule can credit it with the longest length."
)
# The far rule's depths: a target at depth 1 sits next to the query at every length (session 5 measured a
# tiny Mamba's zero-shot likelihood gain at depth 1 only, which the plain rule called effective to 16,384).
FAR_DEPTH = 1.0
# Tasks whose score is a share in [0, 1] are averaged per length into RULER's overall score.
RETRIEVAL_MEAN = "retrieval_mean"


@dataclass
class EffectiveLength:
    effective_length: int | None  # None: undefined (shortest-length score not above chance)
    longest_passing: int | None  # the longest length at or above the threshold, drops in between or not
    reference_length: int | None
    reference_score: float
    threshold: float
    note: str

    def as_row(self) -> dict:
        return {
            "effective_length": self.effective_length,
            "longest_passing": self.longest_passing,
            "reference_length": self.reference_length,
            "reference_score": self.reference_score,
            "threshold": self.threshold,
            "note": self.note,
        }


def effective_length(
    lengths: Sequence[int], scores: Sequence[float], chance: float = 0.0, ci_low: float | None = None
) -> EffectiveLength:
    """The rule of RULE on one score per length (any order). The shortest length is the reference, so it
    passes by definition when it is above chance; when it is not (score at or below chance, or the
    lower bound `ci_low` of its 95% CI at or below chance: a model at chance would otherwise "keep" its
    chance score at every length) the effective length is None. Non-monotone scores: the effective
    length ends before the first length that falls below the threshold, even if a longer one passes
    again (a model that fails at 8k is not trusted at 16k); `longest_passing` reports the longest
    passing one."""
    if len(lengths) != len(scores) or not len(lengths):
        raise ValueError("give one score per length, at least one")
    order = np.argsort(np.asarray(lengths), kind="stable")
    ls = [int(lengths[i]) for i in order]
    ss = [float(scores[i]) for i in order]
    ref = ss[0]
    low = math.nan if ci_low is None else float(ci_low)
    if math.isnan(ref) or ref <= chance or (not math.isnan(low) and low <= chance):
        why = f"score {ref:.4g}" + ("" if math.isnan(low) else f" (95% CI low {low:.4g})")
        return EffectiveLength(
            None,
            None,
            ls[0],
            ref,
            math.nan,
            f"{why} at the shortest length {ls[0]} is not above chance ({chance:.4g}): no effective length",
        )
    threshold = THRESHOLD * ref
    passing = [not math.isnan(s) and s >= threshold for s in ss]
    effective = ls[0]
    for length, ok in zip(ls, passing, strict=True):
        if not ok:
            break
        effective = length
    longest = max(length for length, ok in zip(ls, passing, strict=True) if ok)
    note = ""
    if longest != effective:
        drop = next(length for length, ok in zip(ls, passing, strict=True) if not ok)
        note = f"non-monotone: below the threshold at {drop}, passing again up to {longest}"
    return EffectiveLength(effective, longest, ls[0], ref, threshold, note)


def is_share(metric: str) -> bool:
    """Scores in [0, 1] (exact retrieval, recall@k): the ones RULER averages into its overall score."""
    return metric.startswith(("accuracy", "recall"))


def by_length(rows: list[dict], chance: dict[str, float], seed: int = 0) -> pl.DataFrame:
    """Mean score per (task, metric, length) over the samples of every depth, with a 95% CI; plus, when
    several retrieval tasks share a length, RULER's overall score (the mean over those tasks) as task
    `retrieval_mean`. Every task has the same samples per length, so pooling their samples gives that
    mean, and a CI over the pooled samples."""
    per = aggregate(rows, chance, seed, GROUP_LENGTH)
    shares = [r for r in rows if is_share(r["metric"])]
    names = sorted({r["task"] for r in shares})
    if len(names) < 2:
        return per
    measured = {}
    for r in shares:
        measured.setdefault(r["length"], set()).add(r["task"])
    pooled = [
        {**r, "task": RETRIEVAL_MEAN, "metric": "mean accuracy / recall"}
        for r in shares
        if measured[r["length"]] == set(names)
    ]
    if not pooled:
        return per
    mean_chance = {RETRIEVAL_MEAN: float(np.mean([chance[n] for n in names]))}
    return pl.concat([per, aggregate(pooled, mean_chance, seed, GROUP_LENGTH)], how="diagonal_relaxed")


def far_rows(rows: list[dict]) -> list[dict]:
    """The samples whose target is not right before the query (depth < 1)."""
    return [r for r in rows if r["depth"] < FAR_DEPTH]


def _effective(part: pl.DataFrame) -> EffectiveLength:
    part = part.sort("length")
    return effective_length(
        part["length"].to_list(), part["score"].to_list(), float(part["chance"][0]), part["ci_low"][0]
    )


def effective_table(per_length: pl.DataFrame, per_length_far: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per (task, metric): RULE on `per_length`; with `per_length_far` (by_length of far_rows) also
    effective_length_far, null where no depth below 1 was tested or none is effective."""
    far = {}
    if per_length_far is not None and per_length_far.height:
        for (task, metric), part in per_length_far.group_by("task", "metric", maintain_order=True):
            far[(task, metric)] = _effective(part).effective_length
    rows = []
    for (task, metric), part in per_length.group_by("task", "metric", maintain_order=True):
        eff = _effective(part)
        row = {"task": task, "metric": metric, **eff.as_row()}
        if per_length_far is not None:
            row["effective_length_far"] = far.get((task, metric))
        rows.append({**row, "rule": RULE})
    return pl.from_dicts(rows, infer_schema_length=None)


def _draw_heatmap(ax, results: pl.DataFrame, task: str, effective: int | None, effective_far: int | None):
    """One task's length (rows) x depth (columns) mean scores on `ax`, each cell annotated with score and
    n; the title gives the effective length, and the one without depth 1 when the depths go below 1."""
    part = results.filter(pl.col("task") == task)
    lengths = sorted(part["length"].unique().to_list())
    depths = sorted(part["depth"].unique().to_list())
    grid = np.full((len(lengths), len(depths)), np.nan)
    counts = np.zeros_like(grid, dtype=int)
    for length, depth, score, n in part.select("length", "depth", "score", "n").iter_rows():
        grid[lengths.index(length), depths.index(depth)] = score
        counts[lengths.index(length), depths.index(depth)] = n
    metric = part["metric"][0]
    share = is_share(metric)
    if share:
        vmin, vmax, cmap = 0.0, 1.0, "viridis"
    else:  # loss drop / Δ log p: centred on 0 (chance)
        bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
        vmin, vmax, cmap = -max(bound, 1e-6), max(bound, 1e-6), "RdBu"
    im = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    for r in range(len(lengths)):
        for c in range(len(depths)):
            if np.isfinite(grid[r, c]):
                dark = grid[r, c] < 0.5 if share else abs(grid[r, c]) > 0.6 * vmax
                ax.text(
                    c,
                    r,
                    f"{grid[r, c]:.2f}\nn={counts[r, c]}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set_xlabel("depth (share of the haystack before the target)")
    ax.set_ylabel("length (tokens)")
    title = f"{task}: {metric}\neffective length {_fmt_length(effective)}"
    if any(d < FAR_DEPTH for d in depths):
        title += f" (without depth 1: {_fmt_length(effective_far)})"
    ax.set_title(title, fontsize=9)
    return im, (len(lengths), len(depths))


def heatmap(
    results: pl.DataFrame,
    task: str,
    path: Path,
    effective: int | None = None,
    effective_far: int | None = None,
) -> Path:
    """One task's heatmap (_draw_heatmap) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = results.filter(pl.col("task") == task)
    n_lengths, n_depths = part["length"].n_unique(), part["depth"].n_unique()
    fig, ax = plt.subplots(figsize=(1.1 * n_depths + 2.5, 0.55 * n_lengths + 2))
    im, _ = _draw_heatmap(ax, results, task, effective, effective_far)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap_grid(results: pl.DataFrame, effective: pl.DataFrame, path: Path, title: str = "") -> Path:
    """Every task's heatmap in one PNG (3 per row), to see a whole suite at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["task"].unique(maintain_order=True).to_list()
    eff = {r["task"]: r for r in effective.iter_rows(named=True)}
    n_lengths, n_depths = results["length"].n_unique(), results["depth"].n_unique()
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    w, h = 1.1 * n_depths + 2.5, 0.55 * n_lengths + 2
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        e = eff.get(task, {})
        im, _ = _draw_heatmap(ax, results, task, e.get("effective_length"), e.get("effective_length_far"))
        fig.colorbar(im, ax=ax, fraction=0.05)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt_length(value: int | None) -> str:
    return "none" if value is None else f"{value:,}"


def _effective_text(e: dict) -> str:
    text = _fmt_length(e["effective_length"]) + (f" ({e['note']})" if e["note"] else "")
    if "effective_length_far" in e:
        text += f"; without depth 1: {_fmt_length(e['effective_length_far'])}"
    return text


def summary(
    results: pl.DataFrame, per_length: pl.DataFrame, effective: pl.DataFrame, header: Sequence[str]
) -> str:
    """Per task: a length x depth table of mean scores (n per cell), the mean over depths and the effective
    length; then the rule."""
    lines = list(header)
    eff = {r["task"]: r for r in effective.iter_rows(named=True)}
    for task in results["task"].unique(maintain_order=True):
        part = results.filter(pl.col("task") == task)
        depths = sorted(part["depth"].unique().to_list())
        metric, chance = part["metric"][0], part["chance"][0]
        lines += ["", f"{task} ({metric}; chance {chance:.3g})"]
        lines.append(
            f"  {'length':>8s}  "
            + "  ".join(f"{'d=' + format(d, 'g'):>8s}" for d in depths)
            + "   mean [95% CI]        n"
        )
        for length in sorted(part["length"].unique().to_list()):
            cells = []
            for d in depths:
                row = part.filter((pl.col("length") == length) & (pl.col("depth") == d))
                cells.append(f"{row['score'][0]:8.3f}" if row.height else f"{'-':>8s}")
            pl_row = per_length.filter((pl.col("task") == task) & (pl.col("length") == length))
            m, lo, hi, n = pl_row.select("score", "ci_low", "ci_high", "n").row(0)
            lines.append(
                f"  {length:>8,d}  " + "  ".join(cells) + f"  {m:6.3f} [{lo:5.2f}, {hi:5.2f}]  {n:5d}"
            )
        e = eff.get(task)
        if e is not None:
            lines.append(f"  effective length: {_effective_text(e)}")
    if RETRIEVAL_MEAN in eff:
        e = eff[RETRIEVAL_MEAN]
        scores = per_length.filter(pl.col("task") == RETRIEVAL_MEAN)
        table = ", ".join(
            f"{n:,}: {s:.3f} [{lo:.2f}, {hi:.2f}]"
            for n, s, lo, hi in scores.select("length", "score", "ci_low", "ci_high").iter_rows()
        )
        lines += [
            "",
            f"mean over the retrieval tasks (RULER's overall score) by length: {table}",
            f"  effective length: {_effective_text(e)}",
        ]
    lines += ["", RULE]
    return "\n".join(lines)
