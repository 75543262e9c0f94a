"""EHR-specific strata: repetition, irregularity and timeline length of one subject's history.

Context Clues (Wornow et al., ICLR 2025, arXiv 2412.16178; research/anchor_context_clues.md §5) splits
test labels into quartiles by three properties of the raw event history before the prediction time,
and DESIGN.md §6 keeps them, each paired with one dial of the synthetic cohort (DIAL_OF_STRATUM):

- repetition (copy-forwarding): per n-gram order n, the share of *distinct* n-grams of consecutive codes
  that occur more than once, RR_n = |{types with count > 1}| / |{types}| (Bertoldi and Cettolo, AMTA 2014).
  The paper stratifies by RR_1; DESIGN.md §6 names n = 1..4, summarised here as their geometric mean.
  Too short for an order (fewer than n events): RR_n is NaN, and so is the geometric mean.
- irregularity: the standard deviation of the gaps (days) between consecutive *distinct* timestamps.
  The paper took gaps between consecutive raw events, so every event that shares its time with the one
  before adds a zero gap. We drop those zeros by default: events written with one timestamp are one care
  moment (about 11 per timestamp in the MIMIC-IV demo, research/proto_tokenize_aces.md), and with zeros
  counted the std shrinks as events per timestamp grow, mixing irregularity with coding density, which
  is the progression stratum's business. `distinct_times=False` gives the paper's version. Fewer than two
  gaps: NaN. Events with a NaN time (static rows) have no place in time and are left out of the gaps.
- event_count: the number of events, the per-subject proxy for disease progression.

Measure raw event codes (one per event), not tokenizer output: value bins and time tokens would change
the n-grams. Leave out events that are not care (MEDS_BIRTH, whose gap to the first visit is decades
and would swamp the gap std) with `exclude`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import meds
import numpy as np
import polars as pl

NGRAM_ORDERS = (1, 2, 3, 4)
STRATA_COLUMNS = ("event_count", "repetition", "repetition_1", "irregularity")
DAY_US = 86_400_000_000

# Each stratum and the synthetic-cohort dial meant to drive it (ehrlong.data.synthetic records the dials).
DIAL_OF_STRATUM = {"repetition": "copy_forward", "irregularity": "irregularity", "event_count": "progression"}


class Repetition(NamedTuple):
    rr_1: float  # the paper's stratifier
    rr_mean: float  # geometric mean of RR_n over n = 1..4 (DESIGN.md §6)


# ---------------------------------------------------------------------------------------------------
# One subject (the reference definitions)
# ---------------------------------------------------------------------------------------------------


def repetition(codes: np.ndarray, n: int = 1) -> float:
    """Share of distinct n-grams of consecutive codes that occur more than once; NaN if len < n."""
    codes = np.asarray(codes)
    if len(codes) < n:
        return float("nan")
    grams = np.lib.stride_tricks.sliding_window_view(codes, n)
    _, counts = np.unique(grams, axis=0, return_counts=True)
    return float(np.mean(counts > 1))


def repetition_score(codes: np.ndarray, orders: tuple[int, ...] = NGRAM_ORDERS) -> Repetition:
    """RR_1 and the geometric mean of RR_n over `orders` (NaN when the history is shorter than max order)."""
    rr = np.array([repetition(codes, n) for n in orders])
    return Repetition(rr_1=repetition(codes, 1), rr_mean=float(np.prod(rr) ** (1 / len(orders))))


def irregularity(times: np.ndarray, distinct_times: bool = True) -> float:
    """Std (ddof 0) of the gaps between consecutive (distinct) times; NaN with fewer than two gaps."""
    times = np.asarray(times, dtype=np.float64)
    times = np.sort(times[~np.isnan(times)])
    if distinct_times:
        times = np.unique(times)
    gaps = np.diff(times)
    return float(np.std(gaps)) if len(gaps) >= 2 else float("nan")


def event_count(codes: np.ndarray) -> int:
    return len(codes)


# ---------------------------------------------------------------------------------------------------
# Many subjects at once, from the token store layout (flat arrays + offsets)
# ---------------------------------------------------------------------------------------------------


def _subject_index(offsets: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def _dense(keys: np.ndarray) -> tuple[np.ndarray, int]:
    uniq, inverse = np.unique(keys, return_inverse=True)
    return inverse.astype(np.int64), len(uniq)


def _rr_by_subject(gram_ids: np.ndarray, subject: np.ndarray, n_subjects: int) -> np.ndarray:
    """RR per subject from n-gram ids scoped to one subject (ids need not be contiguous); NaN where none."""
    counts = np.bincount(gram_ids)
    owner = np.zeros(len(counts), dtype=np.int64)
    owner[gram_ids] = subject
    distinct = np.bincount(owner[counts > 0], minlength=n_subjects)
    repeated = np.bincount(owner[counts > 1], minlength=n_subjects)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(distinct > 0, repeated / np.maximum(distinct, 1), np.nan)


def _repetition_batch(
    codes: np.ndarray, subject: np.ndarray, n_subjects: int, orders: tuple[int, ...]
) -> np.ndarray:
    """RR_n for every subject and order, shape [n_subjects, len(orders)].

    n-grams are numbered by rolling: the id of the n-gram at position p pairs the id of the (n-1)-gram
    at p with the code at p+n-1, re-densified each order, so keys stay below len(codes) * n_codes and
    never overflow int64. The first order's key includes the subject, which scopes every later one.
    """
    code_ids, n_codes = _dense(codes)
    gram, _ = _dense(subject * n_codes + code_ids)
    valid = np.ones(len(codes), dtype=bool)
    out = np.full((n_subjects, len(orders)), np.nan)
    for n in range(1, max(orders) + 1):
        if n > 1:
            gram = gram[:-1] * n_codes + code_ids[n - 1 :]
            valid = valid[:-1] & (subject[: len(gram)] == subject[n - 1 :])
            gram = np.where(valid, _dense(np.where(valid, gram, -1))[0], -1)
        if n in orders:
            out[:, orders.index(n)] = _rr_by_subject(gram[valid], subject[: len(gram)][valid], n_subjects)
    return out


def _gap_std_batch(
    times: np.ndarray, subject: np.ndarray, n_subjects: int, distinct_times: bool
) -> np.ndarray:
    timed = ~np.isnan(times)
    times, subject = times[timed], subject[timed]
    order = np.lexsort((times, subject))
    times, subject = times[order], subject[order]
    if distinct_times:
        new = np.ones(len(times), dtype=bool)
        new[1:] = (subject[1:] != subject[:-1]) | (times[1:] != times[:-1])
        times, subject = times[new], subject[new]
    same = subject[1:] == subject[:-1]
    gaps, owner = np.diff(times)[same], subject[1:][same]
    n = np.bincount(owner, minlength=n_subjects)
    mean = np.bincount(owner, weights=gaps, minlength=n_subjects) / np.maximum(n, 1)
    sq = np.bincount(owner, weights=(gaps - mean[owner]) ** 2, minlength=n_subjects)
    return np.where(n >= 2, np.sqrt(sq / np.maximum(n, 1)), np.nan)


def strata(
    codes: np.ndarray,
    times: np.ndarray,
    offsets: np.ndarray,
    before: np.ndarray | None = None,
    exclude: np.ndarray | list[int] | None = None,
    distinct_times: bool = True,
) -> dict[str, np.ndarray]:
    """All strata for many subjects: subject i owns events offsets[i]:offsets[i+1] (in time order).

    `before[i]` cuts subject i's history at a time (same unit as `times`): events with time <= before[i]
    count, as a representation for a prediction time may use events at that time (DESIGN.md §3); events
    with a NaN time (static rows) always count. `exclude`: codes left out of every stratum.
    Returns arrays of length n_subjects: event_count, repetition (geometric mean over n = 1..4),
    repetition_1 and irregularity; NaN where the kept history is too short (see the module docstring).
    """
    codes, times, offsets = np.asarray(codes), np.asarray(times, dtype=np.float64), np.asarray(offsets)
    n_subjects = len(offsets) - 1
    subject = _subject_index(offsets)
    keep = np.ones(len(codes), dtype=bool)
    if before is not None:
        keep &= ~(times > np.asarray(before, dtype=np.float64)[subject])
    if exclude is not None:
        keep &= ~np.isin(codes, np.asarray(exclude))
    codes, times, subject = codes[keep], times[keep], subject[keep]

    rr = _repetition_batch(codes, subject, n_subjects, NGRAM_ORDERS)
    return {
        "event_count": np.bincount(subject, minlength=n_subjects),
        "repetition": np.prod(rr, axis=1) ** (1 / len(NGRAM_ORDERS)),
        "repetition_1": rr[:, NGRAM_ORDERS.index(1)],
        "irregularity": _gap_std_batch(times, subject, n_subjects, distinct_times),
    }


# ---------------------------------------------------------------------------------------------------
# MEDS events
# ---------------------------------------------------------------------------------------------------


def meds_strata(
    events: pl.DataFrame | pl.LazyFrame,
    cutoffs: pl.DataFrame | None = None,
    exclude_codes: Sequence[str] = (meds.birth_code,),
    distinct_times: bool = True,
) -> pl.DataFrame:
    """`strata` per subject of MEDS events (subject_id, time, code), in their order within a subject.

    `cutoffs` (subject_id, prediction_time; e.g. a label file) cuts each history at its prediction time
    and picks the subjects: one output row per cutoff row (a subject may have several, each gets its own
    copy of the history), a subject without events gets event_count 0 and NaN strata. Without cutoffs: every subject with events, whole history.
    Times become float days since 1970; static (null-time) rows count as events but have no gap.
    """
    events = events.lazy().select("subject_id", "time", "code")
    if cutoffs is None:
        subjects = events.select(pl.col("subject_id").unique(maintain_order=True)).collect()
        subjects = subjects.with_columns(pl.lit(None, dtype=pl.Datetime("us")).alias("prediction_time"))
    else:
        subjects = cutoffs.select("subject_id", pl.col("prediction_time").cast(pl.Datetime("us")))
    rows = (
        events.filter(~pl.col("code").is_in(list(exclude_codes)))
        .join(subjects.lazy().with_row_index("row"), on="subject_id", how="inner", maintain_order="left")
        .sort("row", maintain_order=True)  # stable: keeps each subject's events in their given order
        .select(
            "row",
            pl.col("code").cast(pl.Categorical).to_physical().alias("code_id"),
            (pl.col("time").dt.epoch("us").cast(pl.Float64) / DAY_US).fill_null(float("nan")).alias("day"),
        )
        .collect()
    )
    offsets = np.searchsorted(rows["row"].to_numpy(), np.arange(subjects.height + 1))
    before = subjects["prediction_time"].dt.epoch("us").cast(pl.Float64).to_numpy() / DAY_US
    out = strata(
        rows["code_id"].to_numpy(),
        rows["day"].to_numpy(),
        offsets,
        before=None if cutoffs is None else before,
        distinct_times=distinct_times,
    )
    return subjects.with_columns(**{name: out[name] for name in STRATA_COLUMNS})
