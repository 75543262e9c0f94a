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
# Many histories at once, from flat arrays + offsets (the token store layout)
# ---------------------------------------------------------------------------------------------------
#
# Evaluation asks for the strata of one subject at many prediction times (the MIMIC-IV demo's lab tasks
# have ~30 labels per patient). Copying the history once per cutoff costs labels x events; instead every
# quantity is a running count along the subject's time-ordered events, read off at each cutoff:
# - an n-gram type is distinct in a prefix once its first occurrence is in, repeated once its second is;
# - the gap std comes from running counts, sums and sums of squares of the gaps (shifted per subject).


def _subject_index(offsets: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def _dense(keys: np.ndarray) -> tuple[np.ndarray, int]:
    uniq, inverse = np.unique(keys, return_inverse=True)
    return inverse.astype(np.int64), len(uniq)


def _cumulative(flags: np.ndarray) -> np.ndarray:
    """cum[i] = sum of flags[:i] (length len(flags) + 1), so a half-open range [a, b) sums to cum[b] - cum[a]."""
    return np.concatenate([[0], np.cumsum(flags)])


def _occurrence_rank(gram: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """For each valid position, how many earlier positions hold the same gram id (-1 where invalid)."""
    rank = np.full(len(gram), -1, dtype=np.int64)
    pos = np.flatnonzero(valid)
    order = pos[np.argsort(gram[pos], kind="stable")]  # by gram, then by position
    sorted_gram = gram[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = sorted_gram[1:] != sorted_gram[:-1]
    first = np.maximum.accumulate(np.where(new, np.arange(len(order)), 0))
    rank[order] = np.arange(len(order)) - first
    return rank


def _repetition_at(
    codes: np.ndarray, subject: np.ndarray, start: np.ndarray, end: np.ndarray, orders: tuple[int, ...]
) -> np.ndarray:
    """RR_n of each prefix [start, end) of the flat arrays, shape [n_prefixes, len(orders)].

    n-grams are numbered by rolling: the id of the n-gram starting at p pairs the id of the (n-1)-gram at
    p with the code at p+n-1, re-densified each order, so keys stay below len(codes) * n_codes and never
    overflow int64. The first order's key includes the subject, which scopes every later one.
    """
    code_ids, n_codes = _dense(codes)
    gram, _ = _dense(subject * n_codes + code_ids)
    valid = np.ones(len(codes), dtype=bool)
    out = np.full((len(start), len(orders)), np.nan)
    for n in range(1, max(orders) + 1):
        if n > 1:
            gram = gram[:-1] * n_codes + code_ids[n - 1 :]
            valid = valid[:-1] & (subject[: len(gram)] == subject[n - 1 :])
            gram = np.where(valid, _dense(np.where(valid, gram, -1))[0], -1)
        if n not in orders:
            continue
        rank = _occurrence_rank(gram, valid)
        # Padded to len(codes) + 1: the last n - 1 positions start no n-gram.
        distinct, repeated = (np.pad(_cumulative(rank == r), (0, n - 1), mode="edge") for r in (0, 1))
        last = np.clip(end - n + 1, start, None)  # grams starting before `last` end inside the prefix
        d = distinct[last] - distinct[start]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, orders.index(n)] = np.where(
                d > 0, (repeated[last] - repeated[start]) / np.maximum(d, 1), np.nan
            )
    return out


def _gap_std_at(
    times: np.ndarray,
    subject: np.ndarray,
    n_subjects: int,
    start: np.ndarray,
    end: np.ndarray,
    distinct_times: bool,
) -> np.ndarray:
    """Std (ddof 0) of the gaps inside each prefix [start, end); static (NaN) times are first and skipped."""
    gap = np.full(len(times), np.nan)
    if len(times) > 1:
        same = (subject[1:] == subject[:-1]) & ~np.isnan(times[:-1])
        gap[1:] = np.where(same, times[1:] - times[:-1], np.nan)  # NaN unless both ends are timed
    has = ~np.isnan(gap) & ((gap > 0) if distinct_times else True)
    g = np.where(has, gap, 0.0)
    # Shift by each subject's first gap before squaring (the shifted-data variance): every prefix starts at
    # the subject's first event, so equal gaps give exactly 0, and the running sums do not cancel.
    idx = np.flatnonzero(has)
    first = np.zeros(n_subjects)
    first[subject[idx[::-1]]] = g[idx[::-1]]  # reversed: the earliest gap of a subject is written last
    x = np.where(has, g - first[subject], 0.0)
    n, s1, s2 = _cumulative(has), _cumulative(x), _cumulative(x * x)
    # A gap sits at its later event, so a prefix [start, end) holds the gaps at start+1 .. end-1.
    lo = np.minimum(start + 1, end)
    k = n[end] - n[lo]
    mean = (s1[end] - s1[lo]) / np.maximum(k, 1)
    var = np.maximum((s2[end] - s2[lo]) / np.maximum(k, 1) - mean**2, 0.0)
    return np.where(k >= 2, np.sqrt(var), np.nan)


def strata_at(
    codes: np.ndarray,
    times: np.ndarray,
    offsets: np.ndarray,
    cut_subject: np.ndarray,
    cut_time: np.ndarray,
    distinct_times: bool = True,
) -> dict[str, np.ndarray]:
    """All strata of many (subject, cutoff) pairs: subject i owns events offsets[i]:offsets[i+1].

    Events of a subject must be in MEDS order: static rows (NaN time) first, then ascending time; the
    n-grams run in that order. Cutoff j keeps subject cut_subject[j]'s static rows and events with
    time <= cut_time[j] (a representation may use events at the prediction time, DESIGN.md §3); a NaN
    cut_time keeps the whole history. Returns arrays of length n_cutoffs: event_count, repetition
    (geometric mean over n = 1..4), repetition_1 and irregularity; NaN where the kept history is too
    short (see the module docstring). Cost: O(events + cutoffs) after a sort, whatever the cutoffs per subject.
    """
    codes, times, offsets = np.asarray(codes), np.asarray(times, dtype=np.float64), np.asarray(offsets)
    cut_subject = np.asarray(cut_subject, dtype=np.int64)
    cut_time = np.asarray(cut_time, dtype=np.float64)
    n_subjects = len(offsets) - 1
    subject = _subject_index(offsets)
    key = np.where(np.isnan(times), -np.inf, times)
    if len(key) > 1 and np.any((subject[1:] == subject[:-1]) & (key[1:] < key[:-1])):
        i = int(np.flatnonzero((subject[1:] == subject[:-1]) & (key[1:] < key[:-1]))[0]) + 1
        raise ValueError(
            f"strata_at: events of subject index {subject[i]} are not in MEDS order (static rows first, then "
            f"ascending time): position {i} has time {times[i]} after {times[i - 1]}. Sort each subject's events "
            "by time (nulls first) as meds_strata does."
        )
    # Where each cutoff ends: events of its subject up to its time (ties included), by one merged sort.
    cut_key = np.where(np.isnan(cut_time), np.inf, cut_time)
    order = np.lexsort(
        (np.r_[np.zeros(len(key)), np.ones(len(cut_key))], np.r_[key, cut_key], np.r_[subject, cut_subject])
    )
    is_cut = order >= len(key)
    events_before = np.cumsum(~is_cut)[is_cut]  # events sorted before each cutoff, in merged order
    end = np.empty(len(cut_key), dtype=np.int64)
    end[order[is_cut] - len(key)] = events_before
    start = offsets[cut_subject]

    rr = _repetition_at(codes, subject, start, end, NGRAM_ORDERS)
    return {
        "event_count": end - start,
        "repetition": np.prod(rr, axis=1) ** (1 / len(NGRAM_ORDERS)),
        "repetition_1": rr[:, NGRAM_ORDERS.index(1)],
        "irregularity": _gap_std_at(times, subject, n_subjects, start, end, distinct_times),
    }


def strata(
    codes: np.ndarray,
    times: np.ndarray,
    offsets: np.ndarray,
    before: np.ndarray | None = None,
    exclude: np.ndarray | list[int] | None = None,
    distinct_times: bool = True,
) -> dict[str, np.ndarray]:
    """`strata_at` with one cutoff per subject: `before[i]` (None = whole histories), and `exclude`:
    codes left out of every stratum. Events in MEDS order, as for `strata_at`."""
    codes, times, offsets = np.asarray(codes), np.asarray(times, dtype=np.float64), np.asarray(offsets)
    if exclude is not None:
        keep = ~np.isin(codes, np.asarray(exclude))
        offsets = _cumulative(keep)[offsets]
        codes, times = codes[keep], times[keep]
    n_subjects = len(offsets) - 1
    cut = np.full(n_subjects, np.nan) if before is None else np.asarray(before, dtype=np.float64)
    return strata_at(codes, times, offsets, np.arange(n_subjects), cut, distinct_times)


# ---------------------------------------------------------------------------------------------------
# MEDS events
# ---------------------------------------------------------------------------------------------------


def meds_strata(
    events: pl.DataFrame | pl.LazyFrame,
    cutoffs: pl.DataFrame | None = None,
    exclude_codes: Sequence[str] = (meds.birth_code,),
    distinct_times: bool = True,
) -> pl.DataFrame:
    """Strata of MEDS events (subject_id, time, code) at each cutoff, on the history up to it.

    `cutoffs` (subject_id, prediction_time; e.g. a label file) gives one output row per cutoff row (a
    subject may have many), in their order; a subject without events gets event_count 0 and NaN strata.
    Without cutoffs: one row per subject with events, whole history. Each subject's events are put in MEDS
    order (static rows first, then by time; ties keep their given order). Static (null-time) rows count
    as events but have no gap. Times go to strata_at as float64 microseconds, exact below 2**53 us (the
    year 2255), so the cut at a prediction time is exact as in the token store (float64 days are not, at
    MIMIC-IV's shifted dates); irregularity comes back in days.
    """
    events = events.lazy().select("subject_id", "time", "code")
    if cutoffs is None:
        subjects = events.select(pl.col("subject_id").unique(maintain_order=True)).collect()
        subjects = subjects.with_columns(pl.lit(None, dtype=pl.Datetime("us")).alias("prediction_time"))
    else:
        subjects = cutoffs.select("subject_id", pl.col("prediction_time").cast(pl.Datetime("us")))
    wanted = np.unique(subjects["subject_id"].to_numpy())
    rows = (
        events.filter(~pl.col("code").is_in(list(exclude_codes)) & pl.col("subject_id").is_in(wanted))
        .sort("subject_id", "time", nulls_last=False, maintain_order=True)
        .select(
            "subject_id",
            pl.col("code").cast(pl.Categorical).to_physical().alias("code_id"),
            pl.col("time").dt.epoch("us").cast(pl.Float64).fill_null(float("nan")).alias("us"),
        )
        .collect()
    )
    offsets = np.searchsorted(rows["subject_id"].to_numpy(), np.r_[wanted, np.iinfo(np.int64).max])
    offsets[-1] = rows.height
    cut_time = subjects["prediction_time"].dt.epoch("us").cast(pl.Float64).fill_null(float("nan")).to_numpy()
    out = strata_at(
        rows["code_id"].to_numpy(),
        rows["us"].to_numpy(),
        offsets,
        np.searchsorted(wanted, subjects["subject_id"].to_numpy()),
        cut_time,
        distinct_times=distinct_times,
    )
    out["irregularity"] = out["irregularity"] / DAY_US  # a standard deviation scales with its unit
    return subjects.with_columns(**{name: out[name] for name in STRATA_COLUMNS})
