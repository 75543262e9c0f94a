"""Linear probes on frozen representations, few-shot subsets and the count-based baseline.

EHRSHOT (Wornow et al. 2023, `ehrshot/7_eval.py`, `6_generate_shots.py`) as Context Clues (Wornow et al.
2024) ran it (research/anchor_context_clues.md §4.3):

- Probe: `MaxAbsScaler` fit on train, then L2 `LogisticRegression` (lbfgs, max_iter 1000, tol 1e-4).
  Each C of the grid is fit on train and scored by AUROC on tuning; the best C's model, fit on train
  only, is the probe (EHRSHOT refits on train alone "so that we are truly doing k-shot learning";
  lbfgs is deterministic, so that refit is the model the grid already fit). Ties go to the smaller C.
- Grid: EHRSHOT searches C in {1e-8, 1e-6, 1e-4, 1e-2, 0.1, 1, 1e2, 1e4}. We search 1e-4 .. 1e2 in
  decades: below 1e-4 the weights are tiny and the probabilities all sit near the prevalence, yet AUROC
  is blind to scale and can still pick such a C, leaving a Brier score that measures only the
  prevalence (Brier per stratum is the Context Clues headline); above 1e2 the fit is effectively
  unregularised on MaxAbs-scaled features.
- Few-shot: k positives and k negatives per replicate seed on train and, as EHRSHOT does, on tuning
  too, so a k-shot run never sees more labelled data than 4k labels. For each seed the labels of a class
  are put in one random order and the first k taken, so the k-shot set is a subset of the 2k-shot set
  (EHRSHOT samples max_k once and slices, "to isolate out the effect of increasing k"). Unlike EHRSHOT,
  which draws labels uniformly, the order takes one label from every subject before a second label of
  any subject: k shots then come from k distinct patients where the cohort allows, instead of several
  correlated labels of one patient. A k above the labels of a class is an error here (EHRSHOT
  oversamples with replacement, which adds duplicates, not information); `evaluate_probe` skips it.
- Count baseline: a bag of codes over the same history window as the model's representation, through
  the same probe, so every table shows what the foundation model adds over counting (EHRSHOT's count
  features use the whole history with ontology expansion and time bins; ours match the model's window).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler

from ehrlong.evaluation.metrics import EvalInputError, auroc, check_labels

# EHRSHOT's few-shot grid without 12, 24, 48 (DESIGN.md §6); "all" = every training label (EHRSHOT: -1).
K_SHOTS: tuple[int | str, ...] = (1, 2, 4, 8, 16, 32, 64, 128, "all")
K_ALL = -1  # how "all" is stored in the k column of evaluate_probe's frame, as EHRSHOT does
C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 7))
SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)  # EHRSHOT's scripts run 5 replicates per k
MAX_ITER = 1000
SPLITS = ("train", "tuning", "held_out")  # MEDS split names


@dataclass(frozen=True)
class Probe:
    """A fitted probe: the pipeline (scaler + logistic regression) at the chosen C."""

    pipeline: Pipeline
    C: float
    tune_auroc: float
    grid: dict[float, float]  # tuning AUROC of every C tried
    converged: bool  # lbfgs stopped before max_iter at the chosen C

    def predict_proba(self, X: np.ndarray | sp.spmatrix) -> np.ndarray:
        """Probability of the positive class, one per row of X."""
        return self.pipeline.predict_proba(X)[:, 1]


PROBE_FORMAT = 1


def save_probe(probe: Probe, path: Path, meta: dict) -> None:
    """Write a fitted probe as JSON (scaler and weights as plain numbers, no pickle: a run directory can be
    shared and loading it must not run code). `meta` says what it was fit on (task, run, dataset, ...).
    Written to a temporary file and renamed, so a reader never sees half a probe."""
    scale, lr = probe.pipeline.named_steps["scale"], probe.pipeline.named_steps["lr"]
    doc = {
        "format": PROBE_FORMAT,
        "C": probe.C,
        "tune_auroc": probe.tune_auroc,
        "converged": probe.converged,
        "grid": {str(c): v for c, v in probe.grid.items()},
        "max_abs": scale.max_abs_.tolist(),
        "coef": lr.coef_[0].tolist(),
        "intercept": float(lr.intercept_[0]),
        "meta": meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def load_probe(path: Path) -> tuple[Probe, dict]:
    """The Probe (predict_proba equals the saved one's) and the meta it was saved with."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != PROBE_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {PROBE_FORMAT}")
        max_abs, coef = (
            np.asarray(doc["max_abs"], dtype=np.float64),
            np.asarray(doc["coef"], dtype=np.float64),
        )
        if max_abs.shape != coef.shape:
            raise ValueError(f"{len(max_abs)} scales for {len(coef)} weights")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvalInputError(
            f"{path}: not a probe file written by ehrlong.evaluate ({e}). Re-run python -m ehrlong.evaluate "
            "on the run to write it again."
        ) from e
    pipe = make_pipeline(doc["C"])
    scale, lr = pipe.named_steps["scale"], pipe.named_steps["lr"]
    # The fitted state of MaxAbsScaler and LogisticRegression is exactly these attributes.
    scale.max_abs_, scale.scale_ = max_abs, np.where(max_abs == 0, 1.0, max_abs)
    scale.n_features_in_ = lr.n_features_in_ = len(coef)
    scale.n_samples_seen_ = 0
    lr.coef_, lr.intercept_ = coef[None, :], np.array([doc["intercept"]])
    lr.classes_, lr.n_iter_ = np.array([False, True]), np.array([0])
    grid = {float(c): v for c, v in doc["grid"].items()}
    return Probe(pipe, doc["C"], doc["tune_auroc"], grid, doc["converged"]), doc["meta"]


def make_pipeline(C: float, max_iter: int = MAX_ITER) -> Pipeline:
    # The default penalty is L2 in every scikit-learn version (1.8 deprecates `penalty=` in favour of
    # l1_ratio=0, 1.5 warns on l1_ratio without elasticnet), so leave it unset.
    lr = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=1e-4)
    return Pipeline([("scale", MaxAbsScaler()), ("lr", lr)])


def _rows(X: object, n: int, name: str) -> None:
    shape = getattr(X, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != n:
        raise EvalInputError(
            f"{name} must be a 2-D matrix with one row per label ({n:,}); got shape {shape}."
        )


def fit_probe(
    X_train: np.ndarray | sp.spmatrix,
    y_train: object,
    X_tune: np.ndarray | sp.spmatrix,
    y_tune: object,
    c_grid: Sequence[float] = C_GRID,
    max_iter: int = MAX_ITER,
) -> Probe:
    """Fit one pipeline per C on train, keep the one with the best tuning AUROC (ties: smaller C)."""
    y_tr, y_tu = check_labels(y_train), check_labels(y_tune)
    _rows(X_train, len(y_tr), "X_train")
    _rows(X_tune, len(y_tu), "X_tune")
    for y, name in ((y_tr, "train"), (y_tu, "tuning")):
        if y.all() or not y.any():
            raise EvalInputError(
                f"the {name} labels hold one class only ({len(y):,} labels, all {bool(y[0])}); a probe needs "
                "both. Sample k-shot sets with few_shot_subsets (k positives and k negatives, as EHRSHOT)."
            )
    grid = sorted(float(c) for c in c_grid)
    if not grid or not all(np.isfinite(c) and c > 0 for c in grid):
        raise EvalInputError(f"c_grid must hold positive finite values; got {list(c_grid)}. Default: C_GRID.")
    best: tuple[float, Pipeline, float] | None = None
    scores: dict[float, float] = {}
    for C in grid:
        pipe = make_pipeline(C, max_iter)
        with warnings.catch_warnings():
            # Reported through Probe.converged instead: a k x seed x C loop would print hundreds.
            warnings.simplefilter("ignore", ConvergenceWarning)
            pipe.fit(X_train, y_tr)
        scores[C] = auroc(y_tu, pipe.predict_proba(X_tune)[:, 1])
        if best is None or scores[C] > best[2] + 1e-12:  # ascending grid: a tie keeps the smaller C
            best = (C, pipe, scores[C])
    C, pipe, score = best
    converged = bool(np.all(pipe.named_steps["lr"].n_iter_ < max_iter))
    return Probe(pipeline=pipe, C=C, tune_auroc=score, grid=scores, converged=converged)


def _subject_first_order(idx: np.ndarray, subjects: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`idx` in a random order that takes one label of every subject before any subject's second.

    Labels are shuffled; subjects are ranked by their first appearance; a label's round is how many
    labels of its subject came before it. Sorting by (round, subject rank) gives the order.
    """
    shuffled = idx[rng.permutation(len(idx))]
    _, first, inverse = np.unique(subjects[shuffled], return_index=True, return_inverse=True)
    subject_rank = np.argsort(np.argsort(first))[inverse]
    by_subject = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[by_subject], inverse[by_subject])  # first slot of each subject
    rounds = np.empty(len(idx), dtype=np.int64)
    rounds[by_subject] = np.arange(len(idx)) - starts
    return shuffled[np.lexsort((subject_rank, rounds))]


def _k_value(k: int | str) -> int:
    if k == "all" or k == K_ALL:
        return K_ALL
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise EvalInputError(
            f"k must be a positive integer or 'all'; got {k!r}. The EHRSHOT grid: {K_SHOTS}."
        )
    return int(k)


def few_shot_subsets(
    y_train: object,
    subject_ids: object,
    k: int | str,
    seeds: Sequence[int] = SEEDS,
    cap: bool = False,
) -> list[np.ndarray]:
    """Indices (sorted) of k positives + k negatives for each seed; "all" gives every index per seed.

    Deterministic in (labels, subject ids, k, seed) and nested in k for a seed. A k above the labels
    of a class raises, unless `cap` (then that class gives all its labels; used for tuning sets).
    """
    y = check_labels(y_train)
    sids = np.asarray(subject_ids)
    if sids.shape != y.shape:
        raise EvalInputError(
            f"subject_ids must have one value per label ({len(y):,}); got shape {sids.shape}."
        )
    kk = _k_value(k)
    if kk == K_ALL:
        return [np.arange(len(y)) for _ in seeds]
    classes = {True: np.flatnonzero(y), False: np.flatnonzero(~y)}
    short = {c: len(i) for c, i in classes.items() if len(i) < kk}
    if short and not cap:
        raise EvalInputError(
            f"k={kk} needs {kk} positive and {kk} negative labels, but there are {len(classes[True]):,} positive "
            f"and {len(classes[False]):,} negative. Use k <= {min(len(i) for i in classes.values())} or k='all'."
        )
    out = []
    for seed in seeds:
        parts = []
        for c, idx in classes.items():
            # One stream per (seed, class): the positives' order does not depend on the negatives.
            rng = np.random.default_rng([int(seed), int(c)])
            parts.append(_subject_first_order(idx, sids, rng)[:kk])
        out.append(np.sort(np.concatenate(parts)))
    return out


def count_features(
    codes_per_label: Sequence[np.ndarray], vocab_size: int, exclude: Sequence[int] = ()
) -> sp.csr_matrix:
    """Bag-of-codes counts [n_labels, vocab_size] (CSR, float32): row i counts the codes of label i.

    Pass each label's codes (token ids) over the same window the model's representation saw.
    `exclude`: ids left out (PAD, BOS, ...).
    """
    lengths = np.array([len(c) for c in codes_per_label], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    codes = np.concatenate([np.asarray(c).ravel() for c in codes_per_label]) if len(lengths) else np.array([])
    return count_features_flat(codes, offsets, vocab_size, exclude)


def count_features_flat(
    codes: np.ndarray, offsets: np.ndarray, vocab_size: int, exclude: Sequence[int] = ()
) -> sp.csr_matrix:
    """`count_features` from the token store layout: label i owns codes[offsets[i]:offsets[i+1]]."""
    codes, offsets = np.asarray(codes), np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 1 or np.any(np.diff(offsets) < 0) or offsets[-1] > len(codes):
        raise EvalInputError(
            f"offsets must be non-decreasing with the last <= len(codes) ({len(codes):,}); got {offsets[:5]}..."
        )
    codes = codes[offsets[0] : offsets[-1]].astype(np.int64)
    if len(codes) and (codes.min() < 0 or codes.max() >= vocab_size):
        raise EvalInputError(
            f"codes must lie in [0, vocab_size={vocab_size}); found {codes.min()} .. {codes.max()}. "
            "Pass the tokenizer's vocabulary size."
        )
    keep = ~np.isin(codes, np.asarray(exclude, dtype=np.int64))
    row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    data = np.ones(int(keep.sum()), dtype=np.float32)
    # COO -> CSR sums duplicate (row, code) entries: that is the count.
    X = sp.coo_matrix((data, (row[keep], codes[keep])), shape=(len(offsets) - 1, vocab_size))
    return X.tocsr()


def evaluate_probe(
    X: np.ndarray | sp.spmatrix,
    y: object,
    subject_ids: object,
    split: object,
    ks: Sequence[int | str] = K_SHOTS,
    seeds: Sequence[int] = SEEDS,
    c_grid: Sequence[float] = C_GRID,
    few_shot_tuning: bool = True,
    eval_split: str = "held_out",
    fitted: dict | None = None,
) -> pl.DataFrame:
    """Fit a probe per (k, seed) on train/tuning and predict every `eval_split` label.

    X: one row per label (representation or count features); split: "train" / "tuning" / "held_out"
    per label, subject-level (a subject in two splits raises). k-shot train sets come from
    few_shot_subsets; with `few_shot_tuning` the tuning set is k-shot too (capped at what it holds).
    A k above the smaller train class is skipped with a warning. "all" is fit once (seed null).
    Returns one row per (k, seed, evaluated label): k (K_ALL = -1 for "all"), seed, label_index (row
    of X), subject_id, y_true, y_prob, C, tune_auroc, n_train, n_tune, converged. Bootstrap it per
    (k, seed), or all at once with groups = k/seed so every run shares the subject resamples.
    `fitted`, if given, receives every fitted Probe under the key (k, seed).
    """
    y_all = check_labels(y)
    n = len(y_all)
    _rows(X, n, "X")
    sids = np.asarray(subject_ids)
    splits = np.asarray(split).astype(str)
    for a, name in ((sids, "subject_ids"), (splits, "split")):
        if a.shape != (n,):
            raise EvalInputError(f"{name} must have one value per label ({n:,}); got shape {a.shape}.")
    unknown = sorted(set(np.unique(splits)) - set(SPLITS))
    if unknown:
        raise EvalInputError(f"unknown split name(s) {unknown}; valid: {list(SPLITS)} (MEDS subject_splits).")
    pairs = pl.DataFrame({"s": sids, "split": splits}).unique()
    leaked = pairs.filter(pl.col("s").is_duplicated())
    if leaked.height:
        raise EvalInputError(
            f"{leaked['s'].n_unique():,} subjects have labels in more than one split (e.g. subject "
            f"{leaked['s'][0]}); splits must be by subject (DESIGN.md §3). Use metadata/subject_splits."
        )
    train, tune, held = (np.flatnonzero(splits == s) for s in ("train", "tuning", eval_split))
    for idx, name in ((train, "train"), (tune, "tuning"), (held, eval_split)):
        if len(idx) == 0:
            raise EvalInputError(
                f"no labels in the {name!r} split; splits present: {sorted(set(splits))}. The probe needs "
                "train (fit), tuning (choose C) and an evaluation split."
            )
    X = X.tocsr() if sp.issparse(X) else X
    n_min = min(int(y_all[train].sum()), int((~y_all[train]).sum()))

    frames = []
    for k in ks:
        kk = _k_value(k)
        if kk != K_ALL and kk > n_min:
            warnings.warn(
                f"skipping k={kk}: train holds only {n_min} labels of its smaller class", stacklevel=2
            )
            continue
        if kk == K_ALL:
            runs = [(None, train, tune)]
        else:
            tr_sets = few_shot_subsets(y_all[train], sids[train], kk, seeds)
            tu_sets = (
                few_shot_subsets(y_all[tune], sids[tune], kk, seeds, cap=True)
                if few_shot_tuning
                else [np.arange(len(tune))] * len(seeds)
            )
            runs = [(s, train[a], tune[b]) for s, a, b in zip(seeds, tr_sets, tu_sets, strict=True)]
        for seed, tr, tu in runs:
            probe = fit_probe(X[tr], y_all[tr], X[tu], y_all[tu], c_grid)
            if fitted is not None:
                fitted[(kk, seed)] = probe
            frames.append(
                pl.DataFrame(
                    {
                        "label_index": held,
                        "subject_id": sids[held],
                        "y_true": y_all[held],
                        "y_prob": probe.predict_proba(X[held]),
                    }
                ).with_columns(
                    pl.lit(kk, pl.Int64).alias("k"),
                    pl.lit(seed, pl.Int64).alias("seed"),
                    pl.lit(probe.C).alias("C"),
                    pl.lit(probe.tune_auroc).alias("tune_auroc"),
                    pl.lit(len(tr), pl.Int64).alias("n_train"),
                    pl.lit(len(tu), pl.Int64).alias("n_tune"),
                    pl.lit(probe.converged).alias("converged"),
                )
            )
    if not frames:
        raise EvalInputError(
            f"no k in {list(ks)} could be fit: train holds {n_min} labels of its smaller class."
        )
    cols = ["k", "seed", "label_index", "subject_id", "y_true", "y_prob"]
    return pl.concat(frames).select(*cols, "C", "tune_auroc", "n_train", "n_tune", "converged")
