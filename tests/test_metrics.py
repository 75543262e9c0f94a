"""Metrics and the subject-level bootstrap (ehrlong.evaluation.metrics): held to scikit-learn on fixed
arrays, and to a naive loop over replicated labels for the resampling and the per-resample quartiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from ehrlong.evaluation.metrics import (
    BOOTSTRAP_SCHEMA,
    METRICS,
    EvalInputError,
    _quantile_bins,
    bootstrap,
    paired_difference,
    resample_counts,
)

SKLEARN = {"auroc": roc_auc_score, "auprc": average_precision_score, "brier": brier_score_loss}

FIXED = [
    # (y, p): ties across classes, ties within a class, n = 2 and 3, all scores equal
    ([0, 1], [0.2, 0.8]),
    ([1, 0], [0.2, 0.8]),
    ([0, 1, 1], [0.5, 0.5, 0.9]),
    ([0, 1, 1, 0, 1, 0, 0, 1], [0.1, 0.4, 0.4, 0.4, 0.8, 0.8, 0.2, 0.9]),
    ([1, 1, 0, 0, 1], [0.3, 0.3, 0.3, 0.3, 0.3]),
    ([0, 0, 0, 1, 0, 1, 0, 0, 0, 0], [0.0, 0.1, 0.1, 0.2, 0.3, 0.3, 0.3, 0.7, 1.0, 1.0]),
]


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize(("y", "p"), FIXED)
def test_metrics_equal_sklearn_on_fixed_arrays(name, y, p):
    assert METRICS[name](np.array(y), np.array(p)) == pytest.approx(SKLEARN[name](y, p), abs=1e-12)


def test_metrics_equal_sklearn_on_random_arrays_with_many_ties():
    rng = np.random.default_rng(1)
    for n in (4, 7, 30, 300):
        y = rng.integers(0, 2, n)
        y[:2] = (0, 1)
        p = np.round(rng.random(n), 1)  # ~10 distinct scores: many ties across classes
        for name, ref in SKLEARN.items():
            assert METRICS[name](y, p) == pytest.approx(ref(y, p), abs=1e-12), (name, n)
    assert METRICS["auroc"](np.array([True, False]), np.array([0.3, 0.3])) == 0.5  # bool labels, full tie


def test_one_class_gives_nan_for_ranking_metrics_and_brier_stays_defined():
    for y in ([1, 1, 1], [0, 0, 0]):
        p = [0.2, 0.5, 0.9]
        assert math.isnan(METRICS["auroc"](y, p))
        assert math.isnan(METRICS["auprc"](y, p))
        assert METRICS["brier"](y, p) == pytest.approx(brier_score_loss(y, p))


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], "boolean or 0/1"),
        (["a", "b"], [0.1, 0.2], "boolean or 0/1"),
        ([0, 1, 1], [0.1, 0.2], "one value per label"),
        ([0, 1], [0.1, 1.5], r"probabilities in \[0, 1\]"),
        ([0, 1], [0.1, np.nan], r"probabilities in \[0, 1\]"),
    ],
)
def test_bad_metric_input_raises_value_error(y, p, match):
    with pytest.raises(ValueError, match=match):
        METRICS["auroc"](np.array(y), np.array(p))


def test_bad_bootstrap_arguments_raise():
    y, p = np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])
    with pytest.raises(EvalInputError, match="valid metrics"):
        bootstrap(y, p, np.arange(4), metrics=["auroc", "f1"], n_boot=10)
    with pytest.raises(EvalInputError, match="subject_ids"):
        bootstrap(y, p, np.arange(3), n_boot=10)
    with pytest.raises(EvalInputError, match="n_boot"):
        bootstrap(y, p, np.arange(4), n_boot=0)
    with pytest.raises(EvalInputError, match="n_quantiles"):
        bootstrap(y, p, np.arange(4), n_boot=10, strata_values=np.arange(4.0), n_quantiles=1)


# ---------------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------------


def test_resample_counts_draw_whole_subjects():
    sids = np.array([7, 7, 7, 3, 9, 9])
    counts, index = resample_counts(sids, n_boot=50, seed=4)
    assert counts.shape == (50, 3)
    assert (counts.sum(axis=1) == 3).all()  # S subjects drawn per resample
    w = counts[:, index]
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 4] == w[:, 5]).all()
    again, _ = resample_counts(sids, n_boot=50, seed=4)
    other, _ = resample_counts(sids, n_boot=50, seed=5)
    assert (again == counts).all() and (other != counts).any()


def _clustered(n_subjects=40, per_subject=25, seed=0):
    """Subjects with many labels of one outcome and near-identical scores: labels are not independent."""
    rng = np.random.default_rng(seed)
    y_subject = np.arange(n_subjects) % 2 == 0
    p_subject = np.clip(0.5 + 0.15 * (2 * y_subject - 1) + rng.normal(0, 0.2, n_subjects), 0, 1)
    sids = np.repeat(np.arange(n_subjects), per_subject)
    p = np.clip(p_subject[sids] + rng.normal(0, 0.01, len(sids)), 0, 1)
    return y_subject[sids], p, sids


def test_bootstrap_resamples_subjects_not_labels():
    y, p, sids = _clustered()
    by_subject = bootstrap(y, p, sids, metrics="auroc", n_boot=300, seed=0).row(0, named=True)
    by_label = bootstrap(y, p, np.arange(len(y)), metrics="auroc", n_boot=300, seed=0).row(0, named=True)
    width_subject = by_subject["ci_high"] - by_subject["ci_low"]
    width_label = by_label["ci_high"] - by_label["ci_low"]
    # 25 copies per subject: label resampling pretends 1,000 independent labels, ~5x too narrow.
    assert width_subject > 2.5 * width_label
    assert by_subject["value"] == by_label["value"] == pytest.approx(roc_auc_score(y, p))
    assert by_subject["n"] == 1000 and by_subject["n_subjects"] == 40 and by_subject["n_pos"] == 500


def test_bootstrap_ci_contains_point_and_is_reproducible_by_seed():
    rng = np.random.default_rng(2)
    n = 400
    y = rng.random(n) < 0.3
    p = np.clip(0.3 + 0.25 * y + rng.normal(0, 0.15, n), 0, 1)
    sids = rng.integers(0, 150, n)
    a = bootstrap(y, p, sids, n_boot=200, seed=11)
    assert a["metric"].to_list() == ["auroc", "auprc", "brier"] and a.schema == BOOTSTRAP_SCHEMA
    assert (a["ci_low"] < a["value"]).all() and (a["value"] < a["ci_high"]).all()
    assert (a["n_boot_valid"] == 200).all()
    for row in a.iter_rows(named=True):
        assert row["value"] == pytest.approx(SKLEARN[row["metric"]](y, p), abs=1e-12)
    assert a.equals(bootstrap(y, p, sids, n_boot=200, seed=11))
    assert not a["ci_low"].equals(bootstrap(y, p, sids, n_boot=200, seed=12)["ci_low"])


def _naive_replicates(y, p, sids, n_boot, seed, metric, strata=None, n_q=4, fixed_cuts=False):
    """Reference: replicate each label by its subject's draw count, then sklearn (per quartile: cut points
    from np.quantile on the replicated non-NaN values, or from the full data if fixed_cuts)."""
    counts, index = resample_counts(sids, n_boot, seed)
    qs = np.arange(1, n_q) / n_q
    ok = ~np.isnan(strata) if strata is not None else None
    full_cuts = None if strata is None else np.quantile(strata[ok], qs, method="inverted_cdf")
    out = []
    for b in range(n_boot):
        rep = np.repeat(np.arange(len(y)), counts[b, index])
        yr, pr = y[rep], p[rep]
        if strata is None:
            cells = [np.ones(len(rep), bool)]
        else:
            sr = strata[rep]
            okr = ~np.isnan(sr)
            cuts = full_cuts if fixed_cuts else np.quantile(sr[okr], qs, method="inverted_cdf")
            bins = np.searchsorted(cuts, sr, side="left")
            cells = [okr & (bins == q) for q in range(n_q)]
        vals = []
        for m in cells:
            if metric != "brier" and len(np.unique(yr[m])) < 2 or not m.any():
                vals.append(np.nan)
            else:
                vals.append(SKLEARN[metric](yr[m], pr[m]))
        out.append(vals)
    return np.array(out)


def test_bootstrap_counts_invalid_resamples_and_matches_naive_loop():
    # 6 subjects, only two positive: resamples that draw neither have no AUROC.
    y = np.array([1, 0, 0, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.4, 0.3, 0.6, 0.7, 0.2, 0.1, 0.5, 0.5])
    sids = np.array([0, 0, 1, 2, 3, 3, 4, 5, 5])
    n_boot = 400
    ref = _naive_replicates(y, p, sids, n_boot, seed=3, metric="auroc")[:, 0]
    row = bootstrap(y, p, sids, metrics="auroc", n_boot=n_boot, seed=3).row(0, named=True)
    n_valid = int((~np.isnan(ref)).sum())
    assert 0 < n_valid < n_boot  # the data does produce undefined resamples
    assert row["n_boot_valid"] == n_valid
    assert row["ci_low"] == pytest.approx(np.percentile(ref[~np.isnan(ref)], 2.5), abs=1e-12)
    assert row["ci_high"] == pytest.approx(np.percentile(ref[~np.isnan(ref)], 97.5), abs=1e-12)


def _stratified_case(seed=5, n_subjects=60):
    """Metric quality that depends on the stratum value, several labels per subject, some NaN strata."""
    rng = np.random.default_rng(seed)
    sids = np.repeat(np.arange(n_subjects), rng.integers(1, 5, n_subjects))
    n = len(sids)
    strata = rng.gamma(2.0, 1.0, n_subjects)[sids] + rng.normal(0, 0.3, n)
    strata[rng.random(n) < 0.08] = np.nan
    y = rng.random(n) < 0.4
    noise = 0.05 + 0.2 * np.nan_to_num(strata, nan=1.0)  # higher strata, worse predictions
    p = np.clip(0.4 + 0.3 * y + rng.normal(0, 1, n) * noise, 0, 1)
    return y, p, sids, strata


@pytest.mark.parametrize("metric", ["auroc", "brier"])
def test_quartile_cut_points_are_recomputed_inside_each_resample(metric):
    y, p, sids, strata = _stratified_case()
    n_boot = 120
    got = bootstrap(y, p, sids, metrics=metric, n_boot=n_boot, seed=9, strata_values=strata)
    bins = got.filter(got["stratum_quantile"].is_not_null()).sort("stratum_quantile")
    recomputed = _naive_replicates(y, p, sids, n_boot, 9, metric, strata)
    fixed = _naive_replicates(y, p, sids, n_boot, 9, metric, strata, fixed_cuts=True)
    for q, row in enumerate(bins.iter_rows(named=True)):
        ref = recomputed[:, q][~np.isnan(recomputed[:, q])]
        assert row["n_boot_valid"] == len(ref)
        assert row["ci_low"] == pytest.approx(np.percentile(ref, 2.5), abs=1e-12)
        assert row["ci_high"] == pytest.approx(np.percentile(ref, 97.5), abs=1e-12)
    # The reference is sensitive to the rule: cut points fixed from the full data give other CIs.
    fixed_low = [np.nanpercentile(fixed[:, q], 2.5) for q in range(4)]
    assert not np.allclose(bins["ci_low"].to_numpy(), fixed_low, atol=1e-6)


def test_per_resample_quartiles_hold_about_a_quarter_of_the_weight():
    rng = np.random.default_rng(0)
    values = np.sort(rng.random(400))  # distinct values: a bin can miss n/4 only by the boundary copies
    counts, index = resample_counts(np.arange(400), n_boot=50, seed=1)
    w = counts[:, index]
    bins = _quantile_bins(values, w, 4)
    for q in range(4):
        share = np.where(bins == q, w, 0).sum(axis=1)
        assert (np.abs(share - 100) <= w.max()).all()
    assert (np.diff(bins, axis=1) >= 0).all()  # bins ascend with the value
    full = _quantile_bins(values, np.ones((1, 400), dtype=np.int32), 4)[0]
    assert np.bincount(full).tolist() == [100, 100, 100, 100]
    assert (bins != full).any()  # resamples move the cut points


def test_tied_strata_values_share_a_bin_and_match_numpy_quantiles():
    values = np.array([1.0, 1, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8])
    bins = _quantile_bins(values, np.ones((1, 12), dtype=np.int32), 4)[0]
    cuts = np.quantile(values, [0.25, 0.5, 0.75], method="inverted_cdf")
    assert bins.tolist() == np.searchsorted(cuts, values, side="left").tolist()
    assert len(set(bins[:5])) == 1


def test_nan_strata_are_excluded_from_bins_and_counted():
    y, p, sids, strata = _stratified_case()
    n_missing = int(np.isnan(strata).sum())
    got = bootstrap(y, p, sids, metrics="auroc", n_boot=20, strata_values=strata)
    overall = got.filter(got["stratum_quantile"].is_null()).row(0, named=True)
    bins = got.filter(got["stratum_quantile"].is_not_null()).sort("stratum_quantile")
    assert n_missing > 0
    assert (got["n_missing_stratum"] == n_missing).all()
    assert overall["n"] == len(y) and overall["value"] == pytest.approx(roc_auc_score(y, p))
    assert bins["n"].sum() == len(y) - n_missing
    # Point estimate per bin: the labels between the full-data cut points.
    ok = ~np.isnan(strata)
    cuts = np.quantile(strata[ok], [0.25, 0.5, 0.75], method="inverted_cdf")
    member = np.searchsorted(cuts, strata, side="left")
    for q, row in enumerate(bins.iter_rows(named=True)):
        m = ok & (member == q)
        assert row["n"] == m.sum() and row["n_pos"] == y[m].sum()
        assert row["value"] == pytest.approx(roc_auc_score(y[m], p[m]), abs=1e-12)
        assert row["stratum_low"] == strata[m].min() and row["stratum_high"] == strata[m].max()
    # A group whose strata are all unknown: empty bins, NaN, no crash.
    groups = np.where(np.isnan(strata), "unknown", "known")
    got = bootstrap(y, p, sids, metrics="auroc", n_boot=20, strata_values=strata, groups=groups)
    unknown = got.filter(group="unknown", stratum_quantile=1).row(0, named=True)
    assert unknown["n"] == 0 and unknown["n_boot_valid"] == 0 and math.isnan(unknown["value"])


def test_groups_score_each_group_on_shared_resamples():
    y, p, sids, _ = _stratified_case()
    groups = np.where(np.arange(len(y)) % 3 == 0, "task_a", "task_b")
    got = bootstrap(y, p, sids, metrics=["auroc", "brier"], n_boot=50, groups=groups)
    assert got.height == 4 and sorted(set(got["group"])) == ["task_a", "task_b"]
    for row in got.iter_rows(named=True):
        m = groups == row["group"]
        assert row["value"] == pytest.approx(SKLEARN[row["metric"]](y[m], p[m]), abs=1e-12)
        assert row["n"] == m.sum()


# ---------------------------------------------------------------------------------------------------
# Paired comparison
# ---------------------------------------------------------------------------------------------------


def test_paired_difference_of_identical_predictions_is_exactly_zero():
    y, p, sids, strata = _stratified_case()
    got = paired_difference(y, p, p.copy(), sids, metric=["auroc", "brier"], n_boot=100, strata_values=strata)
    assert got.height == 2 * 5
    assert (got["difference"] == 0).all() and (got["ci_low"] == 0).all() and (got["ci_high"] == 0).all()
    assert (got["win_rate"] == 0.5).all()  # every resample a tie


def test_paired_difference_detects_a_clearly_better_model():
    rng = np.random.default_rng(7)
    n = 600
    sids = rng.integers(0, 250, n)
    y = rng.random(n) < 0.35
    good = np.clip(0.35 + 0.35 * y + rng.normal(0, 0.12, n), 0, 1)
    weak = np.clip(0.35 + 0.08 * y + rng.normal(0, 0.2, n), 0, 1)
    got = paired_difference(y, good, weak, sids, metric=["auroc", "brier"], n_boot=200, seed=0)
    auc, brier = got.row(0, named=True), got.row(1, named=True)
    assert auc["difference"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, weak))
    assert auc["ci_low"] > 0 and auc["win_rate"] > 0.95
    assert brier["ci_high"] < 0 and brier["win_rate"] > 0.95  # lower Brier wins
    flipped = paired_difference(y, weak, good, sids, metric="auroc", n_boot=200, seed=0).row(0, named=True)
    assert flipped["ci_high"] < 0 and flipped["win_rate"] == pytest.approx(1 - auc["win_rate"])


def test_paired_difference_per_quartile_uses_the_same_resamples_as_bootstrap():
    y, p, sids, strata = _stratified_case()
    q = np.clip(p + np.random.default_rng(0).normal(0, 0.1, len(p)), 0, 1)
    diff = paired_difference(y, p, q, sids, metric="brier", n_boot=60, seed=2, strata_values=strata)
    a = bootstrap(y, p, sids, metrics="brier", n_boot=60, seed=2, strata_values=strata)
    b = bootstrap(y, q, sids, metrics="brier", n_boot=60, seed=2, strata_values=strata)
    np.testing.assert_allclose(diff["value_a"], a["value"])
    np.testing.assert_allclose(diff["value_b"], b["value"])
    np.testing.assert_allclose(diff["difference"], a["value"] - b["value"])
    assert diff["stratum_quantile"].to_list() == [None, 1, 2, 3, 4]
