"""Binary metrics with subject-level bootstrap CIs, per group and per stratum quantile.

The protocol is EHRSHOT's (Wornow et al. 2023, `ehrshot/7_eval.py`) as Context Clues used it (Wornow et
al., ICLR 2025; research/anchor_context_clues.md §4.3, §5.2):

- AUROC, AUPRC (average precision, not the trapezoid area under the PR curve) and Brier score.
- 95% percentile CIs from 1,000 resamples of *subjects* with replacement. A subject drawn twice brings
  all its labels twice, so a resample is a vector of integer weights per label and every metric below
  is computed in its weighted form; with integer weights that equals the metric on the replicated
  labels (EHRSHOT weights by draw count the same way). Resampling labels instead would treat the many
  labels of one patient as independent and give CIs that are too narrow.
- Strata: quantile cut points (quartiles by default) are recomputed inside every resample from the
  resampled strata values, as Context Clues does (DESIGN.md §6), so the CI covers the uncertainty of
  where the cut points fall, not only of the metric within fixed bins. The point estimate uses the cut
  points of the full data.

Resample b draws subjects `default_rng(seed).integers(0, S, size=(n_boot, S))[b]` over the sorted unique
subject ids (`resample_counts`). The draws depend only on (subject set, n_boot, seed): two calls on the
same subjects with the same seed see the same resamples, so their replicates are paired (this is how
Context Clues compares models: one set of patient weight vectors shared by every model and task).

A metric that is undefined on a resample or a bin (AUROC or AUPRC with only one class present, anything
with no labels) is NaN there; the CI is taken over the valid resamples and `n_boot_valid` says how many
there were. Brier is defined with a single class present (it is then calibration on that class alone),
so it is computed whenever there is at least one label: dropping those resamples would bias the CI of
rare-outcome bins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from ehrlong.errors import DataError

DEFAULT_METRICS = ("auroc", "auprc", "brier")
HIGHER_IS_BETTER = {"auroc": True, "auprc": True, "brier": False}
CI_LEVEL = 0.95
# Weights of at most this many labels x resamples are held at once (float64: ~32 MB per temporary).
_CHUNK_ELEMENTS = 4_000_000


class EvalInputError(DataError, ValueError):
    """Bad evaluation input. A ValueError for library callers, a DataError so the CLI prints it cleanly."""


# ---------------------------------------------------------------------------------------------------
# Weighted metrics, batched over resamples: (y [n] bool, p [n], w [B, n] weights) -> [B]
# ---------------------------------------------------------------------------------------------------


def _tie_starts(sorted_scores: np.ndarray) -> np.ndarray:
    """Index where each run of equal scores starts: a threshold can't separate tied scores."""
    return np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])


def _auroc_w(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC: P(score of a positive > score of a negative), ties counting one half.

    This equals roc_auc_score's trapezoid area, ties included, and needs one sort for all resamples.
    """
    order = np.argsort(p, kind="stable")
    starts = _tie_starts(p[order])
    ws, ys = w[:, order], y[order]
    pos = np.add.reduceat(ws * ys, starts, axis=1)  # positive weight per tied score group
    neg = np.add.reduceat(ws * ~ys, starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    ok = (n_pos > 0) & (n_neg > 0)
    pairs = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    return np.where(ok, pairs / np.where(ok, n_pos * n_neg, 1), np.nan)


def _auprc_w(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision, sum_k (R_k - R_{k-1}) P_k over distinct thresholds (sklearn's definition)."""
    order = np.argsort(-p, kind="stable")
    starts = _tie_starts(p[order])
    ws, ys = w[:, order], y[order]
    pos = np.add.reduceat(ws * ys, starts, axis=1)
    seen = np.cumsum(np.add.reduceat(ws, starts, axis=1), axis=1)  # labels scored >= threshold
    tp = np.cumsum(pos, axis=1)
    # A threshold whose group has no weight in this resample adds nothing (pos = 0 there).
    precision = tp / np.maximum(seen, 1)
    n_pos, n_all = tp[:, -1], seen[:, -1]
    ok = (n_pos > 0) & (n_all > n_pos)
    return np.where(ok, (pos * precision).sum(axis=1) / np.where(ok, n_pos, 1), np.nan)


def _brier_w(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    total = w.sum(axis=1)
    sq = (w * (y - p) ** 2).sum(axis=1)
    return np.where(total > 0, sq / np.where(total > 0, total, 1), np.nan)


_WEIGHTED: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "auroc": _auroc_w,
    "auprc": _auprc_w,
    "brier": _brier_w,
}


def _weighted(name: str, y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    if len(y) == 0:
        return np.full(w.shape[0], np.nan)
    return _WEIGHTED[name](y, p, w)


# ---------------------------------------------------------------------------------------------------
# Input checks and the scalar registry
# ---------------------------------------------------------------------------------------------------


def check_labels(y_true: object) -> np.ndarray:
    """y_true as a 1-D bool array; 0/1 numbers are accepted, anything else raises EvalInputError."""
    y = np.asarray(y_true)
    if y.ndim != 1 or len(y) == 0:
        raise EvalInputError(f"y_true must be a non-empty 1-D array of labels; got shape {y.shape}.")
    if y.dtype == bool:
        return y
    if y.dtype.kind not in "iuf":
        raise EvalInputError(
            f"y_true must be boolean or 0/1; got dtype {y.dtype}. Binarise the labels first (e.g. value == 'yes')."
        )
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise EvalInputError(
            f"y_true must be boolean or 0/1; found {bad.sum():,} other values (e.g. {np.unique(y[bad])[:5].tolist()}). "
            "Binarise the labels first (EHRSHOT: abnormal vs normal, i.e. y >= 1)."
        )
    return y.astype(bool)


def _probs(y_prob: object, n: int, name: str = "y_prob") -> np.ndarray:
    p = np.asarray(y_prob, dtype=np.float64)
    if p.shape != (n,):
        raise EvalInputError(f"{name} must have one value per label ({n:,}); got shape {p.shape}.")
    bad = ~((p >= 0) & (p <= 1))  # also catches NaN
    if bad.any():
        raise EvalInputError(
            f"{name} must be probabilities in [0, 1]; {bad.sum():,} values are not (e.g. {p[bad][:3].tolist()}). "
            "Pass predict_proba(X)[:, 1], not decision scores."
        )
    return p


def _per_label(values: object, n: int, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.shape != (n,):
        raise EvalInputError(f"{name} must have one value per label ({n:,}); got shape {a.shape}.")
    return a


def _metric_names(metrics: str | Sequence[str]) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in names if m not in _WEIGHTED]
    if unknown or not names:
        raise EvalInputError(f"unknown metric(s) {unknown or names}; valid metrics: {sorted(_WEIGHTED)}.")
    return names


def _scalar(name: str) -> Callable[[object, object], float]:
    def metric(y_true: object, y_prob: object) -> float:
        y = check_labels(y_true)
        p = _probs(y_prob, len(y))
        return float(_WEIGHTED[name](y, p, np.ones((1, len(y))))[0])

    metric.__name__ = name
    metric.__doc__ = f"{name} of y_prob against y_true; NaN where undefined (see module docstring)."
    return metric


auroc = _scalar("auroc")
auprc = _scalar("auprc")
brier = _scalar("brier")

METRICS: dict[str, Callable[[object, object], float]] = {"auroc": auroc, "auprc": auprc, "brier": brier}


# ---------------------------------------------------------------------------------------------------
# Resampling and per-resample quantile bins
# ---------------------------------------------------------------------------------------------------


def resample_counts(subject_ids: object, n_boot: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Subject draw counts of every resample: (counts [n_boot, S] int32, label -> subject index [n]).

    counts[b, s] is how often subject s (in np.unique order) is drawn in resample b; the weight of label
    i in resample b is counts[b, index[i]], so a subject's labels always travel together.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise EvalInputError(f"n_boot must be a positive integer; got {n_boot!r}. Use 1000 (EHRSHOT).")
    subjects, index = np.unique(np.asarray(subject_ids), return_inverse=True)
    n_subjects = len(subjects)
    draws = np.random.default_rng(seed).integers(0, n_subjects, size=(n_boot, n_subjects))
    flat = (draws + n_subjects * np.arange(n_boot)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_boot * n_subjects).reshape(n_boot, n_subjects)
    return counts.astype(np.int32), index.ravel()


def _quantile_bins(sorted_values: np.ndarray, w: np.ndarray, n_quantiles: int) -> np.ndarray:
    """Bin (0 .. n_quantiles-1) of each label in each resample, from that resample's own cut points.

    `sorted_values` ascending [m]; `w` integer weights [B, m]. Cut point j is the weighted
    `inverted_cdf` quantile j/n_quantiles (the smallest value whose weighted CDF reaches it), i.e.
    np.quantile(replicated values, j/n_quantiles, method="inverted_cdf"); a label goes to the first bin
    whose upper cut point is >= its value, so tied values always share a bin.
    """
    if len(sorted_values) == 0:
        return np.zeros(w.shape, dtype=np.int8)
    cum = np.cumsum(w, axis=1, dtype=np.int64)
    total = cum[:, -1:]
    bins = np.zeros(w.shape, dtype=np.int8)
    for j in range(1, n_quantiles):
        # Integer comparison (cum * q >= j * total) avoids float error at the cut.
        first = np.argmax(cum * n_quantiles >= j * total, axis=1)
        cut = sorted_values[first]
        bins += sorted_values[None, :] > cut[:, None]
    return bins


# ---------------------------------------------------------------------------------------------------
# The shared engine: metric values of every cell (all labels + each quantile bin) per resample
# ---------------------------------------------------------------------------------------------------


class _Group:
    """Labels of one group, ordered: non-NaN strata values ascending first, then NaN strata values."""

    def __init__(self, idx: np.ndarray, strata: np.ndarray | None):
        if strata is None:
            self.order, self.n_valid, self.values = idx, len(idx), None
            return
        s = strata[idx]
        ok = ~np.isnan(s)
        by_value = idx[ok][np.argsort(s[ok], kind="stable")]
        self.order = np.concatenate([by_value, idx[~ok]])
        self.n_valid = len(by_value)
        self.values = strata[by_value]


def _cell_values(
    y: np.ndarray,
    probs: list[np.ndarray],
    names: list[str],
    w: np.ndarray,
    group: _Group,
    n_quantiles: int,
) -> np.ndarray:
    """Metric values [n_probs, n_metrics, n_cells, B] for label weights w [B, m] in group order.

    Cell 0 is every label of the group; cells 1..n_quantiles are the bins of the non-NaN strata values
    with cut points from the same weights (a resample's or, with all-ones weights, the full data's).
    """
    yg = y[group.order]
    pg = [p[group.order] for p in probs]
    cells = [(slice(None), w)]
    if group.values is not None:
        v = slice(0, group.n_valid)
        bins = _quantile_bins(group.values, w[:, v], n_quantiles)
        cells += [(v, np.where(bins == q, w[:, v], 0)) for q in range(n_quantiles)]
    out = np.empty((len(probs), len(names), len(cells), w.shape[0]))
    for c, (sel, wc) in enumerate(cells):
        for i, p in enumerate(pg):
            for j, name in enumerate(names):
                out[i, j, c] = _weighted(name, yg[sel], p[sel], wc)
    return out


def _run(
    y_true: object,
    probs: dict[str, object],
    subject_ids: object,
    metrics: str | Sequence[str],
    n_boot: int,
    seed: int,
    groups: object | None,
    strata_values: object | None,
    n_quantiles: int,
) -> tuple[list[str], list[dict], np.ndarray, np.ndarray]:
    """Point values and replicates for every (group, cell): (names, cell info, point [G..], reps [G..])."""
    y = check_labels(y_true)
    n = len(y)
    ps = [_probs(p, n, name) for name, p in probs.items()]
    names = _metric_names(metrics)
    sids = _per_label(subject_ids, n, "subject_ids")
    strata = None
    if strata_values is not None:
        strata = _per_label(strata_values, n, "strata_values").astype(np.float64)
        if isinstance(n_quantiles, bool) or not isinstance(n_quantiles, int | np.integer) or n_quantiles < 2:
            raise EvalInputError(f"n_quantiles must be an integer >= 2; got {n_quantiles!r} (4 = quartiles).")
    if groups is None:
        group_list = [(None, np.arange(n))]
    else:
        g = _per_label(groups, n, "groups")
        keys, inverse = np.unique(g, return_inverse=True)
        group_list = [(str(k), np.flatnonzero(inverse == i)) for i, k in enumerate(keys)]

    counts, subject_index = resample_counts(sids, n_boot, seed)
    info, points, reps = [], [], []
    for key, idx in group_list:
        group = _Group(idx, strata)
        ones = np.ones((1, len(idx)), dtype=np.int32)
        point = _cell_values(y, ps, names, ones, group, n_quantiles)[..., 0]
        chunk = max(1, _CHUNK_ELEMENTS // len(idx))
        rep = np.concatenate(
            [
                _cell_values(
                    y, ps, names, counts[b : b + chunk][:, subject_index[group.order]], group, n_quantiles
                )
                for b in range(0, n_boot, chunk)
            ],
            axis=-1,
        )
        info += _cell_info(key, y, sids, group, n_quantiles)
        points.append(point)
        reps.append(rep)
    # [n_probs, n_metrics, n_cells_total(, B)]: cells of all groups side by side, in `info` order.
    return names, info, np.concatenate(points, axis=2), np.concatenate(reps, axis=2)


def _cell_info(
    key: str | None, y: np.ndarray, sids: np.ndarray, group: _Group, n_quantiles: int
) -> list[dict]:
    """Counts and stratum range of each cell on the full data (bins from the full-data cut points)."""
    n_missing = None if group.values is None else len(group.order) - group.n_valid
    cells = [(None, group.order, None, None)]
    if group.values is not None:
        bins = _quantile_bins(group.values, np.ones((1, group.n_valid), dtype=np.int32), n_quantiles)[0]
        for q in range(n_quantiles):
            members = bins == q
            vals = group.values[members]
            lo, hi = (float(vals.min()), float(vals.max())) if len(vals) else (None, None)
            cells.append((q + 1, group.order[: group.n_valid][members], lo, hi))
    return [
        {
            "group": key,
            "stratum_quantile": q,
            "stratum_low": lo,
            "stratum_high": hi,
            "n": len(members),
            "n_subjects": len(np.unique(sids[members])),
            "n_pos": int(y[members].sum()),
            "n_missing_stratum": n_missing,
        }
        for q, members, lo, hi in cells
    ]


def _ci(reps: np.ndarray) -> tuple[float, float, int]:
    """Percentile CI over the valid (non-NaN) replicates, and their count."""
    valid = reps[~np.isnan(reps)]
    if len(valid) == 0:
        return float("nan"), float("nan"), 0
    tail = 100 * (1 - CI_LEVEL) / 2
    low, high = np.percentile(valid, [tail, 100 - tail])
    return float(low), float(high), len(valid)


_KEYS = {"metric": pl.String, "group": pl.String, "stratum_quantile": pl.Int64}
_CELL = {"n": pl.Int64, "n_subjects": pl.Int64, "n_pos": pl.Int64, "n_missing_stratum": pl.Int64}
_RANGE = {"stratum_low": pl.Float64, "stratum_high": pl.Float64}
_BOOT = {"n_boot": pl.Int64, "n_boot_valid": pl.Int64}
_F = pl.Float64
# Column order of the two public frames.
BOOTSTRAP_SCHEMA = _KEYS | _RANGE | {"value": _F, "ci_low": _F, "ci_high": _F} | _CELL | _BOOT
PAIRED_SCHEMA = _KEYS | _RANGE | {"value_a": _F, "value_b": _F, "difference": _F, "ci_low": _F}
PAIRED_SCHEMA |= {"ci_high": _F, "win_rate": _F} | _CELL | _BOOT


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def bootstrap(
    y_true: object,
    y_prob: object,
    subject_ids: object,
    metrics: str | Sequence[str] = DEFAULT_METRICS,
    n_boot: int = 1000,
    seed: int = 0,
    groups: object | None = None,
    strata_values: object | None = None,
    n_quantiles: int = 4,
) -> pl.DataFrame:
    """Point estimates and 95% subject-level bootstrap CIs, one row per (metric, group, cell).

    `groups` (one key per label, e.g. task or k/seed): a metric per group, all groups on the same subject
    resamples. `strata_values` (one float per label, NaN = unknown): besides the row over all labels
    (stratum_quantile null), one row per quantile bin 1 (lowest values) .. n_quantiles, cut points
    recomputed inside each resample and per group; NaN values are left out of the bins and counted in
    n_missing_stratum. n, n_subjects, n_pos, stratum_low/high describe the cell on the full data.
    Columns: BOOTSTRAP_SCHEMA (metric, group, stratum_quantile, stratum_low, stratum_high, value,
    ci_low, ci_high, n, n_subjects, n_pos, n_missing_stratum, n_boot, n_boot_valid).
    """
    names, info, point, reps = _run(
        y_true, {"y_prob": y_prob}, subject_ids, metrics, n_boot, seed, groups, strata_values, n_quantiles
    )
    rows = []
    for j, name in enumerate(names):
        for c, cell in enumerate(info):
            low, high, n_valid = _ci(reps[0, j, c])
            rows.append(
                {"metric": name, **cell, "value": float(point[0, j, c]), "ci_low": low, "ci_high": high}
                | {"n_boot": n_boot, "n_boot_valid": n_valid}
            )
    return pl.DataFrame(rows, schema=BOOTSTRAP_SCHEMA)


def paired_difference(
    y_true: object,
    prob_a: object,
    prob_b: object,
    subject_ids: object,
    metric: str | Sequence[str] = "auroc",
    n_boot: int = 1000,
    seed: int = 0,
    strata_values: object | None = None,
    n_quantiles: int = 4,
    groups: object | None = None,
) -> pl.DataFrame:
    """Metric(a) - metric(b) with a paired CI: both runs are scored on the same resamples (and bins).

    `win_rate` is the share of valid resamples where a is better (higher AUROC/AUPRC, lower Brier),
    ties counting one half, so identical predictions give 0.5. The CI excluding zero answers "does run
    a beat run b" (Context Clues, long vs short context). Rows and cells as in `bootstrap`; columns:
    PAIRED_SCHEMA (as BOOTSTRAP_SCHEMA with value_a, value_b, difference, ci_low, ci_high, win_rate).
    """
    names, info, point, reps = _run(
        y_true,
        {"prob_a": prob_a, "prob_b": prob_b},
        subject_ids,
        metric,
        n_boot,
        seed,
        groups,
        strata_values,
        n_quantiles,
    )
    rows = []
    for j, name in enumerate(names):
        sign = 1.0 if HIGHER_IS_BETTER[name] else -1.0
        for c, cell in enumerate(info):
            diff = reps[0, j, c] - reps[1, j, c]  # NaN in a iff NaN in b: definedness depends on y, w only
            low, high, n_valid = _ci(diff)
            valid = diff[~np.isnan(diff)]
            win = float(np.mean((sign * valid > 0) + 0.5 * (valid == 0))) if n_valid else float("nan")
            rows.append(
                {"metric": name, **cell, "value_a": float(point[0, j, c]), "value_b": float(point[1, j, c])}
                | {"difference": float(point[0, j, c] - point[1, j, c]), "ci_low": low, "ci_high": high}
                | {"win_rate": win, "n_boot": n_boot, "n_boot_valid": n_valid}
            )
    return pl.DataFrame(rows, schema=PAIRED_SCHEMA)
