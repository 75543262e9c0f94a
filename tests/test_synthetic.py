"""The synthetic cohort (ehrlong.data.synthetic): real MEDS, reproducible, each dial moving its stratum
and only that one, labels consistent with the events and carried only by their intended signals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from ehrlong.config import SyntheticConfig
from ehrlong.data import synthetic
from ehrlong.data.__main__ import main as data_main
from ehrlong.data.meds import SPLITS, scan_events
from ehrlong.data.synthetic import (
    BASELINE_VISITS,
    CREATININE,
    DIALS,
    FAMILY_HISTORY_CHD,
    HBA1C,
    TASKS,
    TOBACCO,
    build_vocabulary,
    check_config,
    cohort_name,
    ensure_cohort,
    generate,
    generate_subject,
)
from ehrlong.data.validate import validate
from ehrlong.errors import ConfigError, DataError
from ehrlong.evaluation.strata import DIAL_OF_STRATUM, meds_strata, strata

CFG = SyntheticConfig(n_subjects=60, seed=3)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "cohort"
    generate(CFG, root, progress=False)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _events(root: Path) -> pl.DataFrame:
    return scan_events(root).collect()


# ---------------------------------------------------------------------------------------------------
# Output format
# ---------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path):
    cfg = SyntheticConfig(n_subjects=12, seed=5)
    generate(cfg, tmp_path / "a", progress=False)
    generate(cfg, tmp_path / "b", progress=False)
    generate(dataclasses.replace(cfg, seed=6), tmp_path / "c", progress=False)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    shards = [f for f in a if f.startswith("data/")]
    assert shards and all(a[f] != c.get(f) for f in shards)
    assert a["labels/lung_cancer.parquet"] != c["labels/lung_cancer.parquet"]


def test_output_is_valid_meds(cohort: Path):
    shards = sorted((cohort / "data").rglob("*.parquet"))
    assert {p.parent.name for p in shards} <= set(SPLITS)
    shard_of = {}
    for path in shards:
        table = pq.read_table(path)
        meds.DataSchema.validate(table)
        assert table.schema.field("text_value").type == meds.DataSchema.schema().field("text_value").type
        for sid in set(table["subject_id"].to_pylist()):
            assert sid not in shard_of, "a subject must live in one shard"
            shard_of[sid] = path.parent.name
    splits = pq.read_table(cohort / meds.subject_splits_filepath)
    meds.SubjectSplitSchema.validate(splits)
    assert dict(zip(splits["subject_id"].to_pylist(), splits["split"].to_pylist(), strict=True)) == shard_of
    codes = pq.read_table(cohort / meds.code_metadata_filepath)
    meds.CodeMetadataSchema.validate(codes)
    assert set(_events(cohort)["code"].unique()) <= set(codes["code"].to_pylist())
    dataset = json.loads((cohort / meds.dataset_metadata_filepath).read_text())
    meds.DatasetMetadataSchema.validate(dataset)
    assert "created_at" not in dataset  # no wall-clock time: the same seed gives the same bytes

    report = validate(cohort)
    assert report.warnings == [] and not report.was_unsorted
    assert report.n_subjects == CFG.n_subjects and report.n_static == CFG.n_subjects


def test_each_timeline_opens_with_static_sex_then_birth(cohort: Path):
    in_file_order = pl.concat([pl.read_parquet(p) for p in sorted((cohort / "data").rglob("*.parquet"))])
    firsts = in_file_order.group_by("subject_id", maintain_order=True).head(2)
    assert firsts["time"].is_null().to_list()[::2] == [True] * CFG.n_subjects
    assert set(firsts["code"].to_list()[::2]) <= {"SEX//F", "SEX//M"}
    assert firsts["code"].to_list()[1::2] == [meds.birth_code] * CFG.n_subjects


def test_content_looks_like_an_ehr(cohort: Path):
    events = _events(cohort)
    n = events.height
    assert events["text_value"].is_not_null().sum() / n > 0.4  # MIMIC-IV demo: 53%
    assert events["numeric_value"].is_not_null().sum() / n > 0.3  # MIMIC-IV demo: 44%
    codes = set(events["code"].unique())
    assert {"VISIT//OUTPATIENT", "VISIT//INPATIENT", "HOSPITAL_DISCHARGE", meds.death_code} <= codes
    assert any(c.startswith("DIAGNOSIS//ICD10CM//") for c in codes)
    assert any(c.startswith("MEDICATION//") for c in codes)
    per_timestamp = events.drop_nulls("time").group_by("subject_id", "time").len()["len"]
    assert per_timestamp.mean() > 5  # visits write many events at one time
    counts = np.sort(events["code"].value_counts()["count"].to_numpy())[::-1]
    assert 2000 <= len(build_vocabulary().codes) <= 10000
    assert counts[: len(counts) // 100].sum() / n > 0.2  # Zipf-like: the top 1% of codes ...
    assert np.mean(counts <= 2) > 0.1  # ... and a long tail of rare ones


def test_default_timelines_need_long_context(cohort: Path):
    dials = pl.read_parquet(cohort / "metadata" / "subject_dials.parquet")
    n_events = dials["n_events"]
    assert n_events.median() > 3000 and (n_events > 16_384).sum() >= 1
    for name, task in TASKS.items():
        if task.signal == "early":
            after = dials[f"{name}_events_after_signal"]
            assert after.median() > 2000 and (after > 1024).mean() >= 0.9
    assert dials["problem_codes_reused"].sum() == 0  # the vocabulary is large enough for fresh problems


def test_visits_shortens_timelines_and_keeps_the_signals_early():
    vocab = build_vocabulary()
    short = [generate_subject(SyntheticConfig(n_subjects=30, seed=5, visits=40), i, vocab) for i in range(30)]
    default = [generate_subject(SyntheticConfig(n_subjects=30, seed=5), i, vocab) for i in range(30)]
    assert {s.record["n_visits"] for s in short} <= set(range(37, 44))
    assert {s.record["n_visits"] for s in default} <= set(range(110, 131))
    assert np.median([len(s.codes) for s in short]) < 0.4 * np.median([len(s.codes) for s in default])
    for s in short:  # the prediction visit still follows the baseline visits by hundreds of events
        assert s.record["prediction_visit"] >= 40 - 3 - 15
        assert all(
            s.record[f"{name}_events_after_signal"] > 300 for name, t in TASKS.items() if t.signal == "early"
        )
    # Default cohorts keep their folder names; other visit counts are spelled out.
    assert cohort_name(SyntheticConfig()) == "n1000-seed0-cf0.5-irr0.5-prog0.5"
    assert cohort_name(SyntheticConfig(visits=40)) == "n1000-seed0-cf0.5-irr0.5-prog0.5-visits40"
    with pytest.raises(ConfigError, match="visits=19.*visits=20"):
        check_config(SyntheticConfig(visits=19))
    check_config(SyntheticConfig(visits=20))


# ---------------------------------------------------------------------------------------------------
# Dials
# ---------------------------------------------------------------------------------------------------


def _subjects(**dials: float) -> list[synthetic.Subject]:
    cfg = SyntheticConfig(n_subjects=40, seed=11, **dials)
    vocab = build_vocabulary()
    return [generate_subject(cfg, i, vocab) for i in range(cfg.n_subjects)]


def _strata(subjects: list[synthetic.Subject]) -> dict[str, np.ndarray]:
    offsets = np.cumsum([0] + [len(s.codes) for s in subjects])
    return strata(
        np.concatenate([s.codes for s in subjects]),
        np.concatenate([s.days for s in subjects]),
        offsets,
        before=np.array([s.prediction_day for s in subjects]),
        exclude=[build_vocabulary().index[meds.birth_code]],
    )


def _mean_gap(subject: synthetic.Subject) -> float:
    days = np.unique(subject.days[~np.isnan(subject.days)])[1:]  # the birth gap is not care
    return float(np.mean(np.diff(days)))


def test_copy_forward_raises_repetition_and_nothing_else():
    low, high = _subjects(copy_forward=0.2), _subjects(copy_forward=0.8)
    s_low, s_high = _strata(low), _strata(high)
    assert np.median(s_high["repetition"]) > np.median(s_low["repetition"]) + 0.1
    assert np.median(s_high["repetition_1"]) > np.median(s_low["repetition_1"]) + 0.1
    for a, b in zip(low, high, strict=True):  # copies replace fresh problems: same events, same times
        np.testing.assert_array_equal(a.days, b.days)
    np.testing.assert_array_equal(s_low["irregularity"], s_high["irregularity"])


def test_irregularity_spreads_gaps_at_the_same_mean_and_nothing_else():
    low, high = _subjects(irregularity=0.2), _subjects(irregularity=0.8)
    s_low, s_high = _strata(low), _strata(high)
    assert np.median(s_high["irregularity"]) > 1.5 * np.median(s_low["irregularity"])
    mean_low, mean_high = np.mean([_mean_gap(s) for s in low]), np.mean([_mean_gap(s) for s in high])
    assert mean_high == pytest.approx(mean_low, rel=0.02)
    for a, b in zip(low, high, strict=True):
        np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(s_low["repetition"], s_high["repetition"])


def test_progression_adds_events_and_nothing_else():
    low, high = _subjects(progression=0.2), _subjects(progression=0.8)
    s_low, s_high = _strata(low), _strata(high)
    assert np.all(s_high["event_count"] >= s_low["event_count"])
    assert np.median(s_high["event_count"] / s_low["event_count"]) > 1.5
    # More events, but from panels every subject records anyway: no new n-gram types, same timestamps.
    np.testing.assert_allclose(s_high["repetition"], s_low["repetition"])
    np.testing.assert_allclose(s_high["repetition_1"], s_low["repetition_1"])
    np.testing.assert_allclose(s_high["irregularity"], s_low["irregularity"])


def test_dial_at_zero_switches_copy_forward_off():
    vocab = build_vocabulary()
    problems = np.concatenate([vocab.general, vocab.complications])
    for subject in _subjects(copy_forward=0.0)[:10]:
        assert subject.dials.copy_forward == 0.0
        listed = subject.codes[np.isin(subject.codes, problems)]
        assert len(listed) > 100 and len(np.unique(listed)) == len(listed)  # no problem recorded twice


def test_dials_file_matches_measured_strata(cohort: Path):
    labels = pl.read_parquet(cohort / "labels" / "lung_cancer.parquet")
    dials = pl.read_parquet(cohort / "metadata" / "subject_dials.parquet")
    measured = meds_strata(scan_events(cohort, with_text=False), labels)
    measured = measured.rename(lambda c: c if c == "subject_id" else f"measured_{c}").join(
        dials, on="subject_id"
    )
    for dial in DIALS:  # per-subject values spread around the cohort setting
        assert measured[dial].median() == pytest.approx(getattr(CFG, dial), abs=0.05)
        assert measured[dial].quantile(0.9) - measured[dial].quantile(0.1) > 0.4
    for name, own in DIAL_OF_STRATUM.items():
        rho = {d: measured.select(pl.corr(f"measured_{name}", d, method="spearman")).item() for d in DIALS}
        assert rho[own] >= 0.8, (name, rho)
        assert all(abs(r) <= 0.3 for d, r in rho.items() if d != own), (name, rho)


# ---------------------------------------------------------------------------------------------------
# Labels and signals
# ---------------------------------------------------------------------------------------------------


def test_labels_follow_the_schema_and_the_events(cohort: Path):
    events = _events(cohort)
    spans = (
        events.drop_nulls("time")
        .group_by("subject_id")
        .agg(
            pl.col("time").filter(pl.col("code") != meds.birth_code).min().alias("first"),
            pl.col("time").max().alias("last"),
        )
    )
    tasks = json.loads((cohort / "labels" / "tasks.json").read_text())["tasks"]
    assert [t["name"] for t in tasks] == list(TASKS)
    assert (
        sum(t["signal"] == "early" for t in tasks) >= 3 and sum(t["signal"] == "recent" for t in tasks) >= 1
    )
    for task in tasks:
        table = pq.read_table(cohort / "labels" / f"{task['name']}.parquet")
        meds.LabelSchema.validate(table)
        labels = pl.from_arrow(table).join(spans, on="subject_id")
        assert labels.height == CFG.n_subjects == labels["subject_id"].n_unique()
        assert (labels["first"] < labels["prediction_time"]).all()
        assert (labels["prediction_time"] < labels["last"]).all()
        outcome = events.filter(pl.col("code") == task["outcome_code"]).join(labels, on="subject_id")
        assert (outcome["time"] > outcome["prediction_time"]).all()  # never at or before prediction time
        positive = set(outcome["subject_id"])
        assert set(labels.filter(pl.col("boolean_value"))["subject_id"]) == positive
        prevalence = labels["boolean_value"].mean()
        assert 0.1 <= prevalence <= 0.5 and task["prevalence"] == pytest.approx(prevalence)


def _before(subject: synthetic.Subject) -> dict[str, np.ndarray]:
    """The subject's events at or before its prediction time (and the static row), field by field."""
    keep = ~(subject.days > subject.prediction_day)
    return {k: getattr(subject, k)[keep] for k in ("codes", "days", "numeric", "text")}


def _with_latent(subject: synthetic.Subject, index: int, **fields) -> synthetic.Subject:
    """The same subject regenerated under a changed ground truth: `fields` update Latent's dicts."""
    latent = subject.latent
    for field, updates in fields.items():
        latent = dataclasses.replace(latent, **{field: {**getattr(latent, field), **updates}})
    return generate_subject(CFG, index, build_vocabulary(), latent=latent)


def _differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
    """Positions where two equally long histories differ in any field (NaN equals NaN)."""
    differ = np.zeros(len(a["codes"]), dtype=bool)
    for key, x in a.items():
        y = b[key]
        differ |= ~((x == y) | (np.isnan(x) & np.isnan(y))) if x.dtype.kind == "f" else x != y
    return np.flatnonzero(differ)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_outcomes_leave_no_trace_before_the_prediction_time(index: int):
    real = generate_subject(CFG, index, build_vocabulary())
    flipped = _with_latent(real, index, outcome={name: not y for name, y in real.latent.outcome.items()})
    assert flipped.latent.outcome != real.latent.outcome
    a, b = _before(real), _before(flipped)
    assert len(a["codes"]) == len(b["codes"]) and len(_differences(a, b)) == 0


@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_latent_level_shows_only_in_its_signal(index: int):
    vocab = build_vocabulary()
    idx = vocab.index
    real = generate_subject(CFG, index, vocab)
    signal_code = {
        "family_history_mi": FAMILY_HISTORY_CHD,
        "diabetic_kidney": HBA1C,
        "lung_cancer": TOBACCO,
        "acute_kidney_injury": CREATININE,
    }
    assert set(signal_code) == set(TASKS)
    for name, task in TASKS.items():
        level = real.latent.level[name]
        changed = _with_latent(real, index, level={name: (level + 1) % len(task.levels)})
        a, b = _before(real), _before(changed)
        if name == "family_history_mi":  # the marker is there or not; with it removed nothing differs
            a, b = (a, b) if level == 1 else (b, a)
            diff = np.flatnonzero(a["codes"] == idx[FAMILY_HISTORY_CHD])
            assert len(diff) == 1
            assert len(_differences({k: np.delete(v, diff) for k, v in a.items()}, b)) == 0
        else:
            diff = _differences(a, b)
            assert len(diff) >= 1 and np.all(a["codes"][diff] == idx[signal_code[name]])
        if task.signal == "recent":  # the latest creatinine at or before the prediction time, only
            assert diff.tolist() == [np.flatnonzero(a["codes"] == idx[CREATININE])[-1]]
        else:  # in the first visits, out of reach of a 1k context at the prediction time
            assert len(diff) <= BASELINE_VISITS and len(a["codes"]) - diff.max() > 1024


def test_rerecord_retakes_the_early_history_after_the_prediction_time_only():
    vocab = build_vocabulary()
    idx = vocab.index
    hba1c_sd = vocab.sd[idx[HBA1C]]
    family_history_seen = set()
    for index in range(6):
        plain = generate_subject(dataclasses.replace(CFG, visits=20), index, vocab)
        retaken = generate_subject(dataclasses.replace(CFG, visits=20, rerecord=1.0), index, vocab)
        a, b = _before(plain), _before(retaken)  # what any label sees: the same, event for event
        assert len(a["codes"]) == len(b["codes"]) and len(_differences(a, b)) == 0

        # Every visit after the prediction time adds the early signals at the subject's levels, nothing else.
        level = retaken.latent.level
        family_history_seen.add(level["family_history_mi"])
        signals = [HBA1C, TOBACCO] + ([FAMILY_HISTORY_CHD] if level["family_history_mi"] == 1 else [])
        n_after = retaken.record["n_visits"] - 1 - retaken.record["prediction_visit"]
        assert len(retaken.codes) - len(plain.codes) == n_after * len(signals)
        after = retaken.days > retaken.prediction_day
        for code in signals:
            assert np.sum(retaken.codes == idx[code]) == np.sum(plain.codes == idx[code]) + n_after
        tobacco = retaken.text[(retaken.codes == idx[TOBACCO]) & after]
        assert np.all(tobacco == vocab.text_offset[idx[TOBACCO]] + level["lung_cancer"])
        hba1c = retaken.numeric[(retaken.codes == idx[HBA1C]) & after]
        means = (vocab.mean[idx[HBA1C]], synthetic.HBA1C_HIGH[0])
        own, other = means[level["diabetic_kidney"]], means[1 - level["diabetic_kidney"]]
        assert abs(hba1c.mean() - own) < 4 * hba1c_sd / np.sqrt(n_after) < abs(hba1c.mean() - other)
    assert family_history_seen == {0, 1}

    assert cohort_name(SyntheticConfig(visits=20, rerecord=0.5)).endswith("-visits20-rerecord0.5")
    with pytest.raises(ConfigError, match="rerecord=1.5"):
        check_config(SyntheticConfig(rerecord=1.5))


# ---------------------------------------------------------------------------------------------------
# Writing, caching, command line
# ---------------------------------------------------------------------------------------------------


def test_refuses_to_overwrite_and_keeps_an_identical_cohort(tmp_path: Path):
    cfg = SyntheticConfig(n_subjects=4, seed=1)
    out = tmp_path / "cohort"
    assert generate(cfg, out, progress=False)["reused"] is False
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert generate(cfg, out, progress=False)["reused"] is True
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(DataError, match="will not be overwritten"):
        generate(dataclasses.replace(cfg, seed=2), out, progress=False)
    (out / "data" / "train" / "0.parquet").write_bytes(b"truncated")  # damaged: not identical any more
    with pytest.raises(DataError, match="will not be overwritten"):
        generate(cfg, out, progress=False)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(DataError, match="delete"):
        generate(cfg, foreign, progress=False)
    assert (foreign / "todo.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    generate(cfg, empty, progress=False)
    assert (empty / meds.dataset_metadata_filepath).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "empty", "notes"]  # no temp folders left


def test_a_cohort_recorded_before_a_config_field_existed_is_reused(tmp_path: Path):
    cfg = SyntheticConfig(n_subjects=3, seed=6)
    out = tmp_path / "cohort"
    generate(cfg, out, progress=False)
    meta_path = out / "metadata" / "synthetic.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["visits"]  # as written before `visits` was added (it then meant the default)
    meta_path.write_text(json.dumps(meta))
    assert generate(cfg, out, progress=False)["reused"]
    with pytest.raises(DataError, match="will not be overwritten"):
        generate(SyntheticConfig(n_subjects=3, seed=6, visits=40), out, progress=False)


def test_ensure_cohort_generates_once_under_the_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EHRLONG_DATA", str(tmp_path))
    cfg = SyntheticConfig(n_subjects=3, seed=4, copy_forward=0.25)
    root = ensure_cohort(cfg)
    assert root == tmp_path / "synthetic" / cohort_name(cfg)
    assert "cf0.25" in root.name and "seed4" in root.name
    stamp = (root / "metadata" / "synthetic.json").stat().st_mtime_ns
    assert ensure_cohort(cfg) == root
    assert (root / "metadata" / "synthetic.json").stat().st_mtime_ns == stamp


def test_subjects_do_not_depend_on_sharding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = SyntheticConfig(n_subjects=10, seed=2)
    generate(cfg, tmp_path / "wide", progress=False)
    monkeypatch.setattr(synthetic, "SHARD_SUBJECTS", 3)
    generate(cfg, tmp_path / "narrow", progress=False)
    assert len(list((tmp_path / "narrow" / "data").rglob("*.parquet"))) > len(
        list((tmp_path / "wide" / "data").rglob("*.parquet"))
    )
    wide, narrow = _events(tmp_path / "wide"), _events(tmp_path / "narrow")
    assert wide.sort("subject_id", maintain_order=True).equals(narrow.sort("subject_id", maintain_order=True))


def test_cli_writes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "cli"
    assert data_main(["synth", f"out={out}", "n_subjects=6", "seed=9"]) == 0
    printed = capsys.readouterr().out
    assert "6 subjects" in printed and str(out) in printed and "took" in printed
    assert all(name in printed for name in TASKS)
    with pytest.raises(ConfigError, match="copy_forward"):
        data_main(["synth", f"out={tmp_path / 'bad'}", "copy_forward=1.5"])
    with pytest.raises(ConfigError, match="out="):
        data_main(["synth", "n_subjects=6"])
