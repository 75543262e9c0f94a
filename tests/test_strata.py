"""EHR strata (ehrlong.evaluation.strata): known answers on hand-made sequences, and the batch path
held to the one-subject reference definitions."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import polars as pl
import pytest

from ehrlong.evaluation.strata import (
    irregularity,
    meds_strata,
    repetition,
    repetition_score,
    strata,
    strata_at,
)

A, B, C = 0, 1, 2


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([A, B, A, B], [1.0, 1 / 2, 0.0, 0.0]),  # AB twice, BA once; ABA and BAB once each
        ([A, B, C, A, B, C], [1.0, 2 / 3, 1 / 3, 0.0]),  # AB, BC repeat, CA not; ABC repeats
        ([A] * 6, [1.0, 1.0, 1.0, 1.0]),
        ([A, B, C, 3, 4], [0.0, 0.0, 0.0, 0.0]),
        ([A, A, B], [0.5, 0.0, 0.0, math.nan]),  # no 4-gram in three events
    ],
)
def test_repetition_known_answers(codes, expected):
    got = [repetition(np.array(codes), n) for n in (1, 2, 3, 4)]
    np.testing.assert_allclose(got, expected)


def test_repetition_score_is_rr1_and_geometric_mean():
    # ABCABCA: RR_1 = RR_2 = 1, RR_3 = 2/3 (CAB once), RR_4 = 1/3 (only ABCA twice)
    score = repetition_score(np.array([A, B, C, A, B, C, A]))
    assert score.rr_1 == 1.0
    assert score.rr_mean == pytest.approx((1 * 1 * 2 / 3 * 1 / 3) ** 0.25)
    assert math.isnan(repetition_score(np.array([A, B, A])).rr_mean)  # too short for 4-grams
    assert math.isnan(repetition_score(np.array([], dtype=int)).rr_1)


def test_irregularity_known_answers():
    assert irregularity(np.arange(10.0) * 7) == 0.0  # constant gaps
    assert irregularity(np.array([0.0, 1.0, 3.0])) == pytest.approx(0.5)  # gaps 1, 2
    # Events sharing a timestamp add no gap by default; the paper's raw-event version counts zeros.
    shared = np.array([0.0, 0.0, 1.0, 1.0, 3.0])
    assert irregularity(shared) == pytest.approx(0.5)
    assert irregularity(shared, distinct_times=False) == pytest.approx(np.std([0.0, 1.0, 0.0, 2.0]))
    assert irregularity(np.array([np.nan, 0.0, 1.0, 3.0])) == pytest.approx(0.5)  # static row: no time
    assert math.isnan(irregularity(np.array([2.0, 5.0])))  # one gap
    assert math.isnan(irregularity(np.array([4.0, 4.0, 4.0])))


def _random_store(rng: np.random.Generator, n_subjects: int, max_code: int):
    lengths = rng.integers(0, 60, n_subjects)
    lengths[:2] = [0, 1]  # an empty subject and a one-event subject
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    codes = rng.integers(0, max_code, offsets[-1])
    codes[rng.random(offsets[-1]) < 0.5] %= 4  # plenty of repeats
    # MEDS order: a few static rows (NaN time) first, then ascending times with ties.
    times = np.concatenate(
        [
            np.r_[np.full(n // 10, np.nan), np.sort(rng.integers(0, 30, n - n // 10))].astype(float)
            for n in lengths
        ]
    )
    return codes, times, offsets


def _reference(codes, times, keep):
    c, t = codes[keep], times[keep]
    score = repetition_score(c)
    return len(c), score.rr_1, score.rr_mean, irregularity(t)


@pytest.mark.parametrize("max_code", [12, 2**40])  # 2**40: keys that would overflow a naive packing
def test_batch_matches_reference(max_code):
    rng = np.random.default_rng(0)
    codes, times, offsets = _random_store(rng, 40, max_code)
    before = rng.uniform(5, 35, 40)
    exclude = [3]
    got = strata(codes, times, offsets, before=before, exclude=exclude)
    for i in range(40):
        c, t = codes[offsets[i] : offsets[i + 1]], times[offsets[i] : offsets[i + 1]]
        count, rr_1, rr_mean, irr = _reference(c, t, ~(t > before[i]) & (c != 3))
        assert got["event_count"][i] == count
        np.testing.assert_equal(got["repetition_1"][i], rr_1)
        np.testing.assert_allclose(got["repetition"][i], rr_mean, equal_nan=True)
        np.testing.assert_allclose(got["irregularity"][i], irr, equal_nan=True)


def test_many_cutoffs_per_subject_match_reference():
    """strata_at reads every cutoff off running counts; each must equal the strata of its own prefix,
    including cutoffs before the first event, on a tie, after the last event and NaN (whole history)."""
    rng = np.random.default_rng(1)
    codes, times, offsets = _random_store(rng, 30, 9)
    cut_subject = rng.integers(0, 30, 400)
    cut_time = rng.integers(-2, 33, 400).astype(float)  # integer days: many cutoffs land on event ties
    cut_time[::17] = np.nan
    got = strata_at(codes, times, offsets, cut_subject, cut_time)
    for j, (i, cut) in enumerate(zip(cut_subject, cut_time, strict=True)):
        c, t = codes[offsets[i] : offsets[i + 1]], times[offsets[i] : offsets[i + 1]]
        count, rr_1, rr_mean, irr = _reference(c, t, np.ones(len(c), bool) if np.isnan(cut) else ~(t > cut))
        assert got["event_count"][j] == count
        np.testing.assert_equal(got["repetition_1"][j], rr_1)
        np.testing.assert_allclose(got["repetition"][j], rr_mean, equal_nan=True)
        np.testing.assert_allclose(got["irregularity"][j], irr, equal_nan=True, rtol=1e-9, atol=1e-9)


def test_irregularity_of_large_day_counts_does_not_cancel():
    """Days since 1970 are ~2e4; a naive running sum of squares would lose the small gap spread."""
    times = 20_000.0 + np.cumsum(np.r_[0.0, np.tile([1.0, 1.0 + 1e-6], 50)])
    got = strata_at(np.zeros(len(times), dtype=np.int64), times, np.array([0, len(times)]), [0], [np.nan])
    np.testing.assert_allclose(got["irregularity"][0], irregularity(times), rtol=1e-6)


def test_out_of_order_events_are_refused():
    with pytest.raises(ValueError, match="not in MEDS order"):
        strata_at(np.array([1, 2]), np.array([2.0, 1.0]), np.array([0, 2]), [0], [np.nan])


def test_batch_cutoff_is_inclusive_and_keeps_static_rows():
    codes = np.array([7, A, B, A, B])
    times = np.array([np.nan, 1.0, 2.0, 3.0, 4.0])
    out = strata(codes, times, np.array([0, 5]), before=np.array([3.0]))
    assert out["event_count"][0] == 4  # static row + the events at days 1, 2 and 3 (the cutoff itself)
    assert out["repetition_1"][0] == pytest.approx(1 / 3)  # 7, A (twice), B (once)
    assert out["irregularity"][0] == 0.0  # gaps of 1 day between days 1, 2 and 3


def _meds_frame(rows):
    return pl.DataFrame(
        rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String}, orient="row"
    )


def test_meds_strata_matches_arrays_and_excludes_birth():
    day = dt.datetime(2000, 1, 1)
    events = _meds_frame(
        [
            (1, None, "SEX//F"),
            (1, dt.datetime(1950, 1, 1), "MEDS_BIRTH"),
            (1, day, "A"),
            (1, day, "B"),
            (1, day + dt.timedelta(days=1), "A"),
            (1, day + dt.timedelta(days=3), "B"),
            (1, day + dt.timedelta(days=10), "A"),
            (2, day, "A"),
        ]
    )
    cutoffs = pl.DataFrame(
        {"subject_id": [1, 3], "prediction_time": [day + dt.timedelta(days=3), day]},
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")},
    )
    out = meds_strata(events, cutoffs)
    assert out["subject_id"].to_list() == [1, 3]  # one row per cutoff; subject 2 is not asked for
    first = out.row(0, named=True)
    assert first["event_count"] == 5  # SEX, A, B, A, B: birth excluded, day 10 after the cutoff
    assert first["repetition_1"] == pytest.approx(repetition(np.array([9, A, B, A, B]), 1))
    assert first["irregularity"] == pytest.approx(np.std([1.0, 2.0]))  # the decades-long birth gap is out
    assert out.row(1, named=True)["event_count"] == 0

    whole = meds_strata(events)
    assert whole["subject_id"].to_list() == [1, 2]
    assert whole["event_count"].to_list() == [6, 1]


def test_meds_strata_cut_is_exact_to_the_microsecond():
    # At MIMIC-IV's shifted dates float64 days cannot tell some t from t + 1 us: find such a t.
    us, day = dt.timedelta(microseconds=1), 86_400_000_000
    t = dt.datetime(2180, 5, 17, 8, 30)
    while ((t + us) - dt.datetime(1970, 1, 1)) // us / day != (t - dt.datetime(1970, 1, 1)) // us / day:
        t += us
    events = _meds_frame([(1, t - dt.timedelta(days=2), "A"), (1, t, "B"), (1, t + us, "C")])
    cutoffs = pl.DataFrame(
        {"subject_id": [1, 1], "prediction_time": [t, t + us]},
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")},
    )
    out = meds_strata(events, cutoffs)
    assert out["event_count"].to_list() == [2, 3]
    assert out["irregularity"].to_list()[0] != out["irregularity"].to_list()[0]  # NaN: one gap only
    assert out["irregularity"].to_list()[1] == pytest.approx(np.std([2.0, 1 / day]))
