"""Probes, few-shot subsets and count features (ehrlong.evaluation.probes)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from ehrlong.evaluation.metrics import EvalInputError
from ehrlong.evaluation.probes import (
    C_GRID,
    K_ALL,
    K_SHOTS,
    count_features,
    count_features_flat,
    evaluate_probe,
    few_shot_subsets,
    fit_probe,
    load_probe,
    make_pipeline,
    save_probe,
)


def _problem(n=300, d=10, signal=1.5, seed=0):
    """Labels from a noisy linear score on the first three of d features (features on different scales)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 20, d)
    score = (
        X[:, 0] / np.abs(X[:, 0]).max()
        - X[:, 1] / np.abs(X[:, 1]).max()
        + 0.5 * X[:, 2] / np.abs(X[:, 2]).max()
    )
    y = score * signal + rng.normal(0, 0.3, n) > 0
    return X, y


def test_probe_learns_a_separable_problem():
    X, y = _problem(n=600, signal=4.0)
    probe = fit_probe(X[:300], y[:300], X[300:450], y[300:450])
    assert roc_auc_score(y[450:], probe.predict_proba(X[450:])) > 0.95
    assert probe.C in C_GRID and probe.converged


def test_c_is_chosen_on_tuning_auroc_and_the_model_is_fit_on_train_only():
    X, y = _problem(n=240, d=40, signal=0.8, seed=3)  # few labels, many features: C matters
    tr, tu = slice(0, 120), slice(120, 240)
    probe = fit_probe(X[tr], y[tr], X[tu], y[tu])
    manual = {}
    for C in C_GRID:
        pipe = make_pipeline(C).fit(X[tr], y[tr])
        manual[C] = roc_auc_score(y[tu], pipe.predict_proba(X[tu])[:, 1])
    best = max(manual.values())
    expected = min(C for C, a in manual.items() if a >= best - 1e-12)
    assert len(set(np.round(list(manual.values()), 6))) > 1  # the grid does discriminate here
    assert probe.C == expected and probe.tune_auroc == pytest.approx(best)
    assert probe.grid == pytest.approx(manual)
    refit = make_pipeline(expected).fit(X[tr], y[tr])
    np.testing.assert_allclose(probe.predict_proba(X[tu]), refit.predict_proba(X[tu])[:, 1])


def test_ties_in_tuning_auroc_go_to_the_smaller_c():
    # One feature: every C orders the tuning labels the same way, so every C ties.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 1))
    y = x[:, 0] + rng.normal(0, 0.5, 80) > 0
    probe = fit_probe(x[:40], y[:40], x[40:], y[40:])
    assert len(set(probe.grid.values())) == 1
    assert probe.C == min(C_GRID)


def test_probe_accepts_sparse_counts():
    X, y = _problem(n=200)
    counts = sp.csr_matrix(np.abs(np.round(X)))
    probe = fit_probe(counts[:100], y[:100], counts[100:], y[100:])
    assert probe.predict_proba(counts[100:]).shape == (100,)


def test_saved_probe_predicts_exactly_as_the_fitted_one(tmp_path):
    X, y = _problem(n=300, d=12)
    X[:, 5] = 0.0  # a feature never seen non-zero: MaxAbsScaler must keep it at scale 1, not divide by 0
    probe = fit_probe(X[:150], y[:150], X[150:220], y[150:220])
    save_probe(probe, tmp_path / "probes" / "task.json", {"task": "task", "n_train": 150})
    loaded, meta = load_probe(tmp_path / "probes" / "task.json")
    X_new = np.random.default_rng(9).normal(size=(50, 12)) * 30  # includes values outside the train range
    np.testing.assert_allclose(loaded.predict_proba(X_new), probe.predict_proba(X_new), rtol=1e-12)
    np.testing.assert_allclose(loaded.predict_proba(X[220:]), probe.predict_proba(X[220:]), rtol=1e-12)
    assert (loaded.C, loaded.tune_auroc, loaded.grid) == (probe.C, probe.tune_auroc, probe.grid)
    assert meta == {"task": "task", "n_train": 150}
    assert [p.name for p in (tmp_path / "probes").iterdir()] == ["task.json"]  # no temporary file left


def test_load_probe_names_the_file_on_bad_input(tmp_path):
    bad = tmp_path / "probe.json"
    bad.write_text('{"format": 1, "max_abs": [1, 2], "coef": [0.5]}')
    with pytest.raises(EvalInputError, match=r"probe\.json.*2 scales for 1 weights.*ehrlong\.evaluate"):
        load_probe(bad)
    bad.write_text("not json")
    with pytest.raises(EvalInputError, match="probe.json"):
        load_probe(bad)


def test_probe_rejects_one_class_and_bad_input():
    X, y = _problem(n=40)
    with pytest.raises(ValueError, match="one class only.*few_shot_subsets"):
        fit_probe(X[:20], np.ones(20, bool), X[20:], y[20:])
    with pytest.raises(ValueError, match="tuning labels hold one class"):
        fit_probe(X[:20], y[:20], X[20:], np.zeros(20, bool))
    with pytest.raises(ValueError, match="X_train must be a 2-D matrix with one row per label"):
        fit_probe(X[:19], y[:20], X[20:], y[20:])
    with pytest.raises(ValueError, match="boolean or 0/1"):
        fit_probe(X[:20], np.arange(20), X[20:], y[20:])
    with pytest.raises(ValueError, match="c_grid"):
        fit_probe(X[:20], y[:20], X[20:], y[20:], c_grid=[0.0, 1.0])


# ---------------------------------------------------------------------------------------------------
# Few-shot subsets
# ---------------------------------------------------------------------------------------------------


def _cohort(n_subjects=60, seed=0):
    rng = np.random.default_rng(seed)
    sids = np.repeat(np.arange(n_subjects) * 10, rng.integers(1, 6, n_subjects))
    y = rng.random(len(sids)) < 0.3
    return y, sids


def test_few_shot_subsets_have_k_of_each_class_and_are_reproducible():
    y, sids = _cohort()
    assert K_SHOTS == (1, 2, 4, 8, 16, 32, 64, 128, "all")
    for k in (1, 2, 8, 16):
        sets = few_shot_subsets(y, sids, k, seeds=(0, 1, 2))
        assert len(sets) == 3
        for idx in sets:
            assert y[idx].sum() == k and (~y[idx]).sum() == k and len(np.unique(idx)) == 2 * k
        again = few_shot_subsets(y, sids, k, seeds=(0, 1, 2))
        assert all((a == b).all() for a, b in zip(sets, again, strict=True))
        assert len({tuple(s) for s in sets}) == 3  # seeds differ
    all_sets = few_shot_subsets(y, sids, "all", seeds=(0, 1))
    assert all((s == np.arange(len(y))).all() for s in all_sets)


def test_few_shot_subsets_are_nested_in_k_and_spread_over_subjects():
    y, sids = _cohort()
    n_pos_subjects = len(np.unique(sids[y]))
    for seed in (0, 3):
        smaller = None
        for k in (1, 2, 4, 8, 16):
            idx = set(few_shot_subsets(y, sids, k, seeds=(seed,))[0])
            if smaller is not None:
                assert smaller <= idx  # the k-shot set is inside the 2k-shot set
            smaller = idx
            chosen = np.array(sorted(idx))
            for cls in (True, False):
                picked = chosen[y[chosen] == cls]
                # one label per subject until every subject of the class has given one
                assert len(np.unique(sids[picked])) == min(k, len(np.unique(sids[y == cls])))
    assert n_pos_subjects >= 16


def test_few_shot_k_above_the_available_labels_raises_or_caps():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    sids = np.arange(8)
    with pytest.raises(ValueError, match=r"k=4 .*3 positive.*Use k <= 3 or k='all'"):
        few_shot_subsets(y, sids, 4, seeds=(0,))
    capped = few_shot_subsets(y, sids, 4, seeds=(0,), cap=True)[0]
    assert y[capped].sum() == 3 and (~y[capped]).sum() == 4
    with pytest.raises(ValueError, match="positive integer or 'all'"):
        few_shot_subsets(y, sids, 0)
    with pytest.raises(ValueError, match="subject_ids"):
        few_shot_subsets(y, sids[:5], 1)


# ---------------------------------------------------------------------------------------------------
# Count features
# ---------------------------------------------------------------------------------------------------


def test_count_features_equal_a_manual_count():
    rng = np.random.default_rng(0)
    vocab = 12
    codes = [rng.integers(0, vocab, rng.integers(0, 30)) for _ in range(25)]
    codes[3] = np.array([], dtype=np.int64)  # a label with an empty window
    X = count_features(codes, vocab, exclude=[0])
    assert sp.issparse(X) and X.format == "csr" and X.shape == (25, vocab)
    manual = np.zeros((25, vocab))
    for i, c in enumerate(codes):
        for code in c:
            if code != 0:
                manual[i, code] += 1
    np.testing.assert_array_equal(X.toarray(), manual)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in codes])])
    flat = count_features_flat(np.concatenate(codes), offsets, vocab, exclude=[0])
    np.testing.assert_array_equal(flat.toarray(), manual)
    with pytest.raises(ValueError, match=r"\[0, vocab_size=5\)"):
        count_features(codes, 5)


# ---------------------------------------------------------------------------------------------------
# The k x seed loop
# ---------------------------------------------------------------------------------------------------


def _split_cohort(n_subjects=90, seed=1):
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, n_subjects)
    sids = np.repeat(np.arange(n_subjects) + 1000, per)
    split = np.array(["train", "tuning", "held_out"])[np.repeat(np.arange(n_subjects) % 3, per)]
    X, y = _problem(n=len(sids), d=6, signal=3.0, seed=seed)
    return X, y, sids, split


def test_evaluate_probe_returns_tidy_predictions_per_k_and_seed():
    X, y, sids, split = _split_cohort()
    held = np.flatnonzero(split == "held_out")
    n_small = min(y[split == "train"].sum(), (~y[split == "train"]).sum())
    assert 8 < n_small < 128
    with pytest.warns(UserWarning, match="skipping k=128"):
        out = evaluate_probe(X, y, sids, split, ks=(1, 8, 128, "all"), seeds=(0, 1))
    assert out.columns[:6] == ["k", "seed", "label_index", "subject_id", "y_true", "y_prob"]
    runs = out.select("k", "seed").unique(maintain_order=True).rows()
    assert runs == [(1, 0), (1, 1), (8, 0), (8, 1), (K_ALL, None)]
    assert out.height == len(runs) * len(held)
    one = out.filter(k=8, seed=1)
    assert one["label_index"].to_list() == held.tolist()
    assert (one["y_true"].to_numpy() == y[held]).all() and (one["subject_id"].to_numpy() == sids[held]).all()
    assert one["n_train"][0] == 16 and one["n_tune"][0] == 16  # k-shot tuning too
    # "all" equals fit_probe on the whole train and tuning splits.
    tr, tu = split == "train", split == "tuning"
    probe = fit_probe(X[tr], y[tr], X[tu], y[tu])
    full = out.filter(k=K_ALL)
    np.testing.assert_allclose(full["y_prob"].to_numpy(), probe.predict_proba(X[held]))
    assert full["C"][0] == probe.C and full["n_train"][0] == tr.sum()
    assert roc_auc_score(y[held], full["y_prob"].to_numpy()) > 0.9


def test_evaluate_probe_runs_the_count_baseline_and_checks_splits():
    rng = np.random.default_rng(2)
    _, y, sids, split = _split_cohort()
    # Positives record code 1 more often: counting alone can separate them.
    codes = [
        rng.choice(8, size=rng.integers(3, 15), p=[0.3, 0.2 + 0.3 * yi] + [(0.5 - 0.3 * yi) / 6] * 6)
        for yi in y
    ]
    out = evaluate_probe(count_features(codes, 8), y, sids, split, ks=("all",))
    assert roc_auc_score(out["y_true"], out["y_prob"]) > 0.8
    leaky = split.copy()
    first, second = np.flatnonzero(np.diff(sids) == 0)[0] + np.array([0, 1])  # two labels of one subject
    leaky[second] = "held_out" if split[first] != "held_out" else "train"
    with pytest.raises(EvalInputError, match="more than one split"):
        evaluate_probe(count_features(codes, 8), y, sids, leaky, ks=("all",))
    with pytest.raises(ValueError, match="unknown split"):
        evaluate_probe(count_features(codes, 8), y, sids, np.where(split == "tuning", "val", split))
