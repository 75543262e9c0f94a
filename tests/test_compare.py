"""python -m ehrlong.compare against a throwaway sqlite MLflow store holding fake training runs.

The store is built once (MLflow's sqlite migrations take seconds) and copied for every test that
writes to it. Fake runs carry the training tags and the eval/ metric names ehrlong.evaluate logs:

    mamba_4k                 mamba        4,096   both tasks
    mamba_16k                mamba       16,384   both tasks
    transformer_4k (old)     transformer  4,096   both tasks          <- replaced by the newer run
    transformer_4k (new)     transformer  4,096   first task only     <- newest: wins, second task "-"
    transformer_16k_yarn     transformer 16,384   both tasks          } two configs in one cell:
    transformer_16k_sliding  transformer 16,384   both, no strata     } a row each
    mamba_8k                 mamba        8,192   no eval metric      <- ignored, counted
    compare-auroc            kind=comparison, eval metric 0.99        <- never an input
    (experiment "other": one evaluated run that must not leak in; "empty": one run, no eval metric)

Runs carry a `size` tag (tiny/small), except the old transformer_4k run (trained before the tag existed).
Benchmark results (bench/ names ehrlong.benchmark logs) are in BENCH: the 16k_yarn run has none, mamba_8k
(never evaluated) has some, and mamba_4k's likelihood has no effective length ("none").
"""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import matplotlib.image
import mlflow
import numpy as np
import polars as pl
import pytest
from mlflow.entities import Metric

from ehrlong.compare import (
    CSV_COLUMNS,
    PROG,
    Args,
    _results,
    compare,
    main,
    parse_bench_key,
    parse_metric_key,
)
from ehrlong.config import parse
from ehrlong.errors import ConfigError, DataError, run_cli
from ehrlong.evaluate import STRATA

T1, T2 = "family_history_mi", "mortality_in_icu_first_24h"
T0 = 1_700_000_000_000  # ms
# config -> (backbone, context_length, {task: auroc}, start offset s, strata logged)
RUNS = {
    "mamba_4k": ("mamba", 4096, {T1: 0.70, T2: 0.60}, 1, True),
    "mamba_16k": ("mamba", 16384, {T1: 0.80, T2: 0.66}, 2, True),
    "transformer_4k@old": ("transformer", 4096, {T1: 0.50, T2: 0.50}, 3, True),
    "transformer_4k": ("transformer", 4096, {T1: 0.72}, 10, True),
    "transformer_16k_yarn": ("transformer", 16384, {T1: 0.74, T2: 0.61}, 4, True),
    "transformer_16k_sliding": ("transformer", 16384, {T1: 0.76, T2: 0.63}, 5, False),
}
SIZES = {"mamba_4k": "tiny", "mamba_16k": "small", "transformer_4k": "tiny", "mamba_8k": "tiny"}  # else small
NS, LK = "needle_single", "likelihood"
# config -> {task: ({length: mean score}, effective length or None = not logged)}
BENCH = {
    "mamba_4k": {NS: ({1024: 0.90, 4096: 0.80}, 4096), LK: ({1024: 0.30, 4096: 0.20}, None)},
    "mamba_16k": {NS: ({1024: 0.95, 4096: 0.91, 16384: 0.70}, 4096), LK: ({1024: 0.5, 4096: 0.45}, 16384)},
    "transformer_4k@old": {NS: ({1024: 0.111, 4096: 0.111}, 2048)},
    "transformer_4k": {NS: ({1024: 0.88, 4096: 0.60}, 1024)},
    "transformer_16k_sliding": {NS: ({1024: 0.93, 16384: 0.85}, 16384)},
    "no_eval": {NS: ({1024: 0.92, 4096: 0.90, 8192: 0.86}, 8192)},
}
EXPECTED_CELLS = {  # (row, context_length) -> the config whose run fills the cell
    ("mamba", "4096"): "mamba_4k",
    ("mamba", "16384"): "mamba_16k",
    ("transformer", "4096"): "transformer_4k",
    ("transformer_16k_yarn", "16384"): "transformer_16k_yarn",
    ("transformer_16k_sliding", "16384"): "transformer_16k_sliding",
}


def metric_values(auroc: dict[str, float], strata: bool) -> dict[str, float]:
    """Known values: auprc = auroc - 0.3, brier = (1 - auroc) / 4; CI [v - 0.05, v + 0.04]; quartile q of
    stratum s is v - 0.01 q - 0.001 s with CI +-0.1."""
    out = {}
    for task, a in auroc.items():
        for metric, v in (("auroc", a), ("auprc", a - 0.3), ("brier", (1 - a) / 4)):
            key = f"eval/{task}/{metric}"
            out |= {key: v, f"{key}/ci_low": v - 0.05, f"{key}/ci_high": v + 0.04}
            for s, stratum in enumerate(STRATA if strata else ()):
                for q in range(1, 5):
                    qv = v - 0.01 * q - 0.001 * s
                    k = f"{key}/{stratum}/q{q}"
                    out |= {k: qv, f"{k}/ci_low": qv - 0.1, f"{k}/ci_high": qv + 0.1}
    return out


def bench_values(results: dict) -> dict[str, float]:
    """bench/<task>/L<n> with CI [v - 0.05, v + 0.04], per depth v + 0.013 (never compared), and
    bench/<task>/effective_length when there is one, with effective_length_far a quarter of it."""
    out = {}
    for task, (scores, effective) in results.items():
        for n, v in scores.items():
            k = f"bench/{task}/L{n}"
            out |= {k: v, f"{k}/ci_low": v - 0.05, f"{k}/ci_high": v + 0.04}
            out |= {f"{k}/d0": v + 0.013, f"{k}/d0.5": v + 0.013}
        if effective is not None:
            out[f"bench/{task}/effective_length"] = float(effective)
            out[f"bench/{task}/effective_length_far"] = float(effective // 4)
    return out


def log_run(client, exp_id, name, tags, metrics, start_s):
    run = client.create_run(exp_id, start_time=T0 + 1000 * start_s, tags=tags, run_name=name)
    rid = run.info.run_id
    items = [Metric(k, v, T0, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(rid, metrics=items[i : i + 1000])
    client.set_terminated(rid)
    return rid


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """(db path, {config: run_id}) of the fake store; copy the db before writing to it."""
    root = tmp_path_factory.mktemp("store")
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    art = (root / "mlartifacts").as_uri()
    exp = client.create_experiment("ehrlong", artifact_location=art)
    ids = {}
    for name, (backbone, length, auroc, start, strata) in RUNS.items():
        config = name.split("@")[0]
        tags = {
            "backbone": backbone,
            "context_length": str(length),
            "config_name": config,
            "dataset": "synth",
        }
        if name != "transformer_4k@old":
            tags["size"] = SIZES.get(config, "small")
        metrics = metric_values(auroc, strata) | bench_values(BENCH.get(name, {}))
        ids[name] = log_run(client, exp, name, tags, metrics, start)
    tags = {"backbone": "mamba", "context_length": "8192", "config_name": "mamba_8k", "dataset": "synth"}
    metrics = {"val_loss": 5.0} | bench_values(BENCH["no_eval"])
    ids["no_eval"] = log_run(client, exp, "mamba_8k", {**tags, "size": "tiny"}, metrics, 6)
    poison = {"kind": "comparison", "backbone": "mamba", "context_length": "4096", "config_name": "mamba_4k"}
    metrics = {f"eval/{T1}/auroc": 0.99, f"bench/{NS}/effective_length": 99999.0, f"bench/{NS}/L4096": 0.999}
    ids["comparison"] = log_run(client, exp, "compare-auroc", poison, metrics, 100)
    other = client.create_experiment("other", artifact_location=art)
    log_run(client, other, "x", {**tags, "context_length": "4096"}, {f"eval/{T1}/auroc": 0.11}, 200)
    empty = client.create_experiment("empty", artifact_location=art)
    log_run(client, empty, "y", tags, {"val_loss": 5.0}, 1)
    return root / "mlflow.db", ids


@pytest.fixture
def store(template, tmp_path, monkeypatch):
    """A fresh copy of the store at tmp_path/runs/mlflow.db: (tracking uri, run ids)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("EHRLONG_RUNS", str(tmp_path / "runs"))
    (tmp_path / "runs").mkdir()
    db = tmp_path / "runs" / "mlflow.db"
    shutil.copyfile(template[0], db)
    return f"sqlite:///{db}", template[1]


@pytest.fixture(scope="module")
def first(template, tmp_path_factory):
    """One comparison with the defaults (auroc by context_length, every task), logged to MLflow."""
    tmp = tmp_path_factory.mktemp("first")
    shutil.copyfile(template[0], tmp / "mlflow.db")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return compare(Args(tracking_uri=uri, out=str(tmp / "out"))), uri, template[1]


def table_lines(text: str, task: str) -> dict[str, list[str]]:
    """{row label: cells} of one task's printed table."""
    lines = text.splitlines()
    rows = {}
    for line in lines[lines.index(task) + 2 :]:
        if not line.strip():
            break
        label, *cells = re.split(r"\s{2,}", line.strip())
        rows[label] = cells
    return rows


def test_metric_key_contract():
    assert parse_metric_key(f"eval/{T1}/auroc") == (T1, "auroc", "all", None, "value")
    assert parse_metric_key(f"eval/{T1}/brier/ci_high") == (T1, "brier", "all", None, "ci_high")
    assert parse_metric_key(f"eval/{T1}/auprc/repetition_1/q3") == (T1, "auprc", "repetition_1", 3, "value")
    assert parse_metric_key(f"eval/{T1}/auroc/event_count/q4/ci_low") == (
        T1,
        "auroc",
        "event_count",
        4,
        "ci_low",
    )
    for other in ("val_loss", "eval/x", f"eval/{T1}/auroc/repetition", f"eval/{T1}/auroc/repetition/qx"):
        assert parse_metric_key(other) is None


def test_table_holds_the_logged_values_and_the_newest_duplicate(first):
    result, _, ids = first
    sel = result.selection
    assert sel.columns == ["4096", "16384"]  # numeric order, not "16384" < "4096"
    assert sel.rows == ["mamba", "transformer", "transformer_16k_sliding", "transformer_16k_yarn"]
    assert {(r.row, r.column): r.run_id for r in sel.runs} == {k: ids[v] for k, v in EXPECTED_CELLS.items()}
    assert sel.ignored == {
        "comparison run(s) (tag kind=comparison)": 1,
        "run(s) without any eval metric (evaluate them: python -m ehrlong.evaluate run=runs/<config_name>/<timestamp>)": 1,
        "older run(s) of a config and context_length (the newest run of each is kept)": 1,
    }
    rows = table_lines(result.text, T1)
    assert rows["mamba"] == ["0.700 [0.65, 0.74]", "0.800 [0.75, 0.84]"]
    assert rows["transformer"] == ["0.720 [0.67, 0.76]", "-"]  # the newer run (0.72), not the old 0.50
    assert rows["transformer_16k_yarn"] == ["-", "0.740 [0.69, 0.78]"]
    assert rows["transformer_16k_sliding"] == ["-", "0.760 [0.71, 0.80]"]
    # The newest transformer_4k run has no second task: "-", not the older run's 0.50.
    assert table_lines(result.text, T2)["transformer"] == ["-", "-"]
    assert "0.500" not in result.text and "0.990" not in result.text and "0.110" not in result.text
    assert (
        "ignored 1 older run(s)" in result.text and "ignored 1 run(s) without any eval metric" in result.text
    )


def test_csv_has_one_row_per_value_with_run_ids(first):
    result, _, ids = first
    csv = pl.read_csv(result.out / "comparison.csv")
    assert tuple(csv.columns) == CSV_COLUMNS
    # Per run: tasks x (overall + 4 strata x 4 quartiles); the sliding run logged no strata.
    per_task = {cfg: (1 + 16 * RUNS[cfg][4]) for cfg in EXPECTED_CELLS.values()}
    expected = sum(per_task[cfg] * len(RUNS[cfg][2]) for cfg in per_task)
    assert csv.height == expected
    assert set(csv["metric"]) == {"auroc"}
    assert set(csv["run_id"]) == {ids[c] for c in EXPECTED_CELLS.values()}
    overall = csv.filter(pl.col("stratum") == "all")
    assert overall["quartile"].is_null().all()
    for (row, length), cfg in EXPECTED_CELLS.items():
        for task, auroc in RUNS[cfg][2].items():
            got = overall.filter(
                (pl.col("row") == row) & (pl.col("context_length") == int(length)) & (pl.col("task") == task)
            )
            assert got.height == 1
            assert got["value"][0] == pytest.approx(auroc)
            assert got["ci_low"][0] == pytest.approx(auroc - 0.05)
            assert got["ci_high"][0] == pytest.approx(auroc + 0.04)
            assert got["run_id"][0] == ids[cfg] and got["config_name"][0] == cfg
    q = csv.filter(
        (pl.col("row") == "mamba")
        & (pl.col("context_length") == 16384)
        & (pl.col("task") == T2)
        & (pl.col("stratum") == "irregularity")
        & (pl.col("quartile") == 3)
    )
    s = STRATA.index("irregularity")
    assert q["value"][0] == pytest.approx(0.66 - 0.03 - 0.001 * s)
    assert q["ci_high"][0] == pytest.approx(0.66 - 0.03 - 0.001 * s + 0.1)
    assert set(csv.filter(pl.col("stratum") != "all")["stratum"]) == set(STRATA)


def test_writes_nontrivial_pngs_and_summary_atomically(first):
    result, _, _ = first
    out = result.out
    assert sorted(p.name for p in out.iterdir()) == [
        "auroc_by_quartile.png",
        "auroc_vs_context_length.png",
        "comparison.csv",
        "summary.txt",
    ]
    assert not out.with_name(out.name + ".partial").exists()
    for name, min_size in (
        ("auroc_vs_context_length.png", (300, 500)),
        ("auroc_by_quartile.png", (900, 600)),
    ):
        img = matplotlib.image.imread(out / name)[..., :3]
        assert img.shape[0] >= min_size[0] and img.shape[1] >= min_size[1]
        ink = (img < 0.9).any(axis=-1).mean()  # share of non-white pixels: axes, lines, text
        assert 0.01 < ink < 0.6
        colours = np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)
        assert len(colours) > 20  # several coloured lines, not a blank or one-colour canvas
    assert (out / "summary.txt").read_text().strip() == result.text.strip()


def test_comparison_run_is_logged_and_never_read_back(first):
    result, uri, _ = first
    client = mlflow.MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["kind"] == "comparison"
    assert run.info.run_name == "compare-auroc" and run.info.status == "FINISHED"
    assert run.data.params == {
        "metric": "auroc",
        "by": "context_length",
        "tasks": f"{T1},{T2}",
        "n_runs": "5",
    }
    assert {a.path for a in client.list_artifacts(result.run_id)} == {
        "comparison.csv",
        "summary.txt",
        "auroc_vs_context_length.png",
        "auroc_by_quartile.png",
    }
    # A second comparison sees the first one as a comparison run, not as an input.
    second = compare(Args(tracking_uri=uri, out=str(result.out.parent / "again"), mlflow=False))
    assert second.selection.ignored["comparison run(s) (tag kind=comparison)"] == 2
    assert [r.run_id for r in second.selection.runs] == [r.run_id for r in result.selection.runs]
    assert second.table.equals(result.table)


def test_task_filter_other_metric_and_by_tag(store, tmp_path):
    uri, ids = store
    res = compare(Args(tracking_uri=uri, metric="brier", task=[T2], out=str(tmp_path / "b"), mlflow=False))
    assert res.selection.tasks == [T2]
    assert set(res.table["task"]) == {T2}
    assert set(res.table["metric"]) == {"brier"}
    # transformer_4k's newest run has no T2 value: it is not eligible, so the older run fills the cell.
    assert {(r.row, r.column): r.run_id for r in res.selection.runs}[("transformer", "4096")] == ids[
        "transformer_4k@old"
    ]
    assert table_lines(res.text, T2)["mamba"] == ["0.100 [0.050, 0.140]", "0.085 [0.035, 0.125]"]
    assert "lower is better" in res.text
    assert (tmp_path / "b" / "brier_vs_context_length.png").is_file()

    res = compare(Args(tracking_uri=uri, by="config_name", task=[T1], out=str(tmp_path / "c"), mlflow=False))
    assert res.selection.rows == ["mamba", "transformer"]
    # Natural order: mamba_4k before mamba_16k.
    assert res.selection.columns == [
        "mamba_4k",
        "mamba_16k",
        "transformer_4k",
        "transformer_16k_sliding",
        "transformer_16k_yarn",
    ]
    by_cell = {(r.row, r.column): r.run_id for r in res.selection.runs}
    assert by_cell[("transformer", "transformer_4k")] == ids["transformer_4k"]


def test_by_size_tag(store, tmp_path):
    uri, ids = store
    res = compare(Args(tracking_uri=uri, by="size", task=[T1], out=str(tmp_path / "s"), mlflow=False))
    sel = res.selection
    assert sel.columns == ["tiny", "small"]  # model size order, not alphabetical
    # yarn and sliding are both small transformers: a row each; the old run has no size tag.
    assert sel.rows == ["mamba", "transformer", "transformer_16k_sliding", "transformer_16k_yarn"]
    assert {(r.row, r.column): r.run_id for r in sel.runs} == {
        ("mamba", "tiny"): ids["mamba_4k"],
        ("mamba", "small"): ids["mamba_16k"],
        ("transformer", "tiny"): ids["transformer_4k"],
        ("transformer_16k_sliding", "small"): ids["transformer_16k_sliding"],
        ("transformer_16k_yarn", "small"): ids["transformer_16k_yarn"],
    }
    assert sel.ignored["run(s) without a 'size' tag"] == 1
    rows = table_lines(res.text, T1)
    assert rows["mamba"] == ["0.700 [0.65, 0.74]", "0.800 [0.75, 0.84]"]
    assert rows["transformer"] == ["0.720 [0.67, 0.76]", "-"]
    csv = pl.read_csv(res.out / "comparison.csv")
    overall = csv.filter(pl.col("stratum") == "all")
    assert dict(zip(overall["config_name"], overall["size"], strict=True)) == {
        "mamba_4k": "tiny",
        "mamba_16k": "small",
        "transformer_4k": "tiny",
        "transformer_16k_yarn": "small",
        "transformer_16k_sliding": "small",
    }
    assert (res.out / "auroc_vs_size.png").is_file() and (res.out / "auroc_by_quartile.png").is_file()


def test_bench_key_contract():
    assert parse_bench_key(f"bench/{NS}/effective_length") == (NS, "effective_length", None, "value")
    far = (NS, "effective_length_far", None, "value")
    assert parse_bench_key(f"bench/{NS}/effective_length_far") == far
    assert parse_bench_key(f"bench/{NS}/L4096") == (NS, "score", 4096, "value")
    assert parse_bench_key(f"bench/{NS}/L4096/ci_low") == (NS, "score", 4096, "ci_low")
    assert parse_bench_key(f"bench/{NS}/L4096/d0.25") == (NS, "depth", 4096, "value")
    for other in (
        f"eval/{NS}/auroc",
        "bench/x",
        f"bench/{NS}/Lx",
        f"bench/{NS}/L4096/q1",
        f"bench/{NS}/L4/d0/x",
    ):
        assert parse_bench_key(other) is None


def test_effective_length_table(store, tmp_path):
    uri, ids = store
    res = compare(Args(tracking_uri=uri, metric="effective_length", out=str(tmp_path / "e")))
    sel = res.selection
    assert sel.tasks == [LK, NS]
    assert sel.columns == ["4096", "8192", "16384"]
    # yarn has no bench metric, so sliding is the only transformer at 16,384: no split row.
    assert sel.rows == ["mamba", "transformer"]
    assert {(r.row, r.column): r.run_id for r in sel.runs} == {
        ("mamba", "4096"): ids["mamba_4k"],
        ("mamba", "8192"): ids["no_eval"],  # never evaluated, but benchmarked
        ("mamba", "16384"): ids["mamba_16k"],
        ("transformer", "4096"): ids["transformer_4k"],
        ("transformer", "16384"): ids["transformer_16k_sliding"],
    }
    assert sel.ignored == {
        "comparison run(s) (tag kind=comparison)": 1,
        "run(s) without any bench metric (benchmark them: python -m ehrlong.benchmark run=runs/<config_name>/<timestamp>)": 1,
        "older run(s) of a config and context_length (the newest run of each is kept)": 1,
    }
    ns = table_lines(res.text, NS)
    assert ns["mamba"] == ["4096", "8192", "4096"]
    assert ns["transformer"] == ["1024", "-", "16384"]  # the newer run's 1024, not the old 2048
    lk = table_lines(res.text, LK)
    assert lk["mamba"] == ["none", "-", "16384"]  # benchmarked without an effective length; not benchmarked
    assert lk["transformer"] == ["-", "-", "-"]
    assert (
        "lengths tested differ between runs" in res.text
        and "transformer, context_length=16384: 1024, 16384" in res.text
    )
    assert "99999" not in res.text and "2048" not in res.text and "no stratified plot" in res.text

    csv = pl.read_csv(res.out / "comparison.csv")
    assert set(csv["metric"]) == {"effective_length"} and set(csv["stratum"]) == {"all"}
    assert csv["ci_low"].is_null().all()
    got = {(t, c): v for t, c, v in csv.select("task", "config_name", "value").iter_rows()}
    assert got == {
        (LK, "mamba_4k"): None,
        (NS, "mamba_4k"): 4096,
        (NS, "mamba_8k"): 8192,
        (NS, "transformer_4k"): 1024,
        (LK, "mamba_16k"): 16384,
        (NS, "mamba_16k"): 4096,
        (NS, "transformer_16k_sliding"): 16384,
    }
    assert sorted(p.name for p in res.out.iterdir()) == [
        "comparison.csv",
        "effective_length_vs_context_length.png",
        "summary.txt",
    ]
    img = matplotlib.image.imread(res.out / "effective_length_vs_context_length.png")[..., :3]
    assert 0.01 < (img < 0.9).any(axis=-1).mean() < 0.6
    run = mlflow.MlflowClient(uri).get_run(res.run_id)
    assert run.info.run_name == "compare-effective_length" and run.data.tags["kind"] == "comparison"


def test_effective_length_without_depth_one_is_read_from_its_own_key(store, tmp_path):
    uri, _ = store
    plain = compare(Args(tracking_uri=uri, metric="effective_length", out=str(tmp_path / "e"), mlflow=False))
    far = compare(
        Args(tracking_uri=uri, metric="effective_length_far", out=str(tmp_path / "f"), mlflow=False)
    )
    assert far.selection.rows == plain.selection.rows and far.selection.columns == plain.selection.columns
    for task in (NS, LK):
        for row, cells in table_lines(plain.text, task).items():
            want = [c if c in ("-", "none") else str(int(c) // 4) for c in cells]
            assert table_lines(far.text, task)[row] == want, (task, row)
    assert "depths below 1" in far.text and "effective_length_far_vs_context_length.png" in {
        p.name for p in far.out.iterdir()
    }


def test_runs_benchmarked_before_the_far_rule_have_no_far_value():
    """A run whose benchmark logged no effective_length_far at all (an older ehrlong) has no such result,
    shown as '-'; 'none' means benchmarked under the rule with no effective length."""

    def run(metrics):
        info = SimpleNamespace(run_id="r", run_name="r", start_time=0)
        return SimpleNamespace(info=info, data=SimpleNamespace(metrics=metrics, tags={}))

    old = {f"bench/{NS}/L1024": 0.9, f"bench/{NS}/L4096": 0.5, f"bench/{NS}/effective_length": 1024.0}
    res, found = _results(run(old), "effective_length_far", None)
    assert found and res.values == {}
    assert _results(run(old), "effective_length", None)[0].values == {(NS, "all", None): {"value": 1024.0}}
    new = old | {f"bench/{LK}/L1024": 0.1, f"bench/{LK}/effective_length_far": 1024.0}
    res, _ = _results(run(new), "effective_length_far", None)
    assert res.values == {(NS, "all", None): {"value": None}, (LK, "all", None): {"value": 1024.0}}


def test_lengths_tested_come_from_the_last_benchmark():
    """A run benchmarked at 1024, 4096, 8192 and later at 1024, 4096 only still holds the L8192 score:
    the tag of the last benchmark, not the metric keys, says which lengths its effective length is over."""
    scores = {f"bench/{NS}/L1024": 0.9, f"bench/{NS}/L4096": 0.5, f"bench/{NS}/L8192": 0.4}
    info = SimpleNamespace(run_id="r", run_name="r", start_time=0)
    tagged = SimpleNamespace(
        info=info, data=SimpleNamespace(metrics=scores, tags={f"bench/{NS}/lengths": "1024,4096"})
    )
    assert _results(tagged, "effective_length", None)[0].lengths == {NS: [1024, 4096]}
    untagged = SimpleNamespace(info=info, data=SimpleNamespace(metrics=scores, tags={}))  # an older ehrlong
    assert _results(untagged, "effective_length", None)[0].lengths == {NS: [1024, 4096, 8192]}


def test_bench_score_at_one_length(store, tmp_path):
    uri, ids = store
    args = parse(
        Args, [f"tracking_uri={uri}", "metric=bench_score", "length=4096", "mlflow=false"], prog=PROG
    )
    args.out = str(tmp_path / "s")
    res = compare(args)
    sel = res.selection
    assert sel.columns == ["4096", "8192", "16384"] and sel.tasks == [LK, NS]
    # sliding was benchmarked at 1,024 and 16,384 only.
    assert ids["transformer_16k_sliding"] not in {r.run_id for r in sel.runs}
    assert sel.ignored["run(s) without bench_score_L4096 for the compared task(s)"] == 1
    ns = table_lines(res.text, NS)
    assert ns["mamba"] == ["0.800 [0.75, 0.84]", "0.900 [0.85, 0.94]", "0.910 [0.86, 0.95]"]
    assert ns["transformer"] == ["0.600 [0.55, 0.64]", "-", "-"]
    assert table_lines(res.text, LK)["mamba"] == ["0.200 [0.15, 0.24]", "-", "0.450 [0.40, 0.49]"]
    assert (
        "0.813" not in res.text and "0.999" not in res.text and "0.111" not in res.text
    )  # depth, poison, old
    assert "score at 4096 tokens" in res.text
    csv = pl.read_csv(res.out / "comparison.csv")
    assert set(csv["metric"]) == {"bench_score_L4096"}
    row = csv.filter((pl.col("task") == NS) & (pl.col("config_name") == "mamba_8k"))
    assert row.select("value", "ci_low", "ci_high").row(0) == pytest.approx((0.90, 0.85, 0.94))
    assert (res.out / "bench_score_L4096_vs_context_length.png").is_file()
    assert not (res.out / "bench_score_by_quartile.png").exists()


def test_defaults_read_the_local_store_and_write_under_runs(store, tmp_path, capsys):
    uri, _ = store
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["mlflow=false"])
    assert e.value.code == 0
    (out,) = (tmp_path / "runs" / "comparisons").iterdir()
    assert pl.read_csv(out / "comparison.csv").height > 0
    assert uri in capsys.readouterr().out


def test_mlflow_tracking_uri_is_honoured(store, tmp_path, monkeypatch):
    uri, _ = store
    monkeypatch.setenv("EHRLONG_RUNS", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    res = compare(Args(mlflow=False))
    assert res.out.parent == tmp_path / "elsewhere" / "comparisons"
    assert len(res.selection.runs) == 5


@pytest.mark.parametrize(
    "args, error, needles",
    [
        (dict(experiment="nope"), ConfigError, ["'nope'", "ehrlong", "other", "empty"]),
        (dict(experiment="empty"), DataError, ["'empty'", "python -m ehrlong.evaluate run="]),
        (dict(metric="accuracy"), ConfigError, ["'accuracy'", "auroc", "auprc", "brier", "effective_length"]),
        (dict(by="sizes"), ConfigError, ["'sizes'", "backbone, context_length, config_name, dataset, size"]),
        (dict(metric="accuracy"), ConfigError, ["bench_score with length=N"]),
        (dict(metric="bench_score"), ConfigError, ["bench_score needs length=N"]),
        (dict(metric="auroc", length=4096), ConfigError, ["length=4096", "only metric=bench_score"]),
        (dict(metric="bench_score", length=2048), ConfigError, ["length=2048", "1024, 4096, 8192, 16384"]),
        (dict(metric="effective_length", task=[T1]), ConfigError, [T1, "likelihood, needle_single"]),
        (
            dict(experiment="empty", metric="effective_length"),
            DataError,
            ["python -m ehrlong.benchmark run="],
        ),
        (dict(task=["sepsis"]), ConfigError, ["sepsis", T1, T2]),
    ],
)
def test_errors_name_the_value_and_leave_nothing(store, tmp_path, args, error, needles):
    uri, _ = store
    with pytest.raises(error) as e:
        compare(Args(tracking_uri=uri, out=str(tmp_path / "out"), **args))
    for needle in needles:
        assert needle in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("ehrlong").experiment_id], "tags.kind = 'comparison'"
    )
    assert len(runs) == 1  # only the seeded one: a failed comparison logs no run


def test_cli_exits_2_with_the_message(store, capsys):
    uri, _ = store
    with pytest.raises(SystemExit) as e:
        run_cli(main, [f"tracking_uri={uri}", "metric=f1"])
    assert e.value.code == 2
    assert "metric='f1'" in capsys.readouterr().err


def test_missing_store_is_not_created(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(ConfigError, match="no MLflow store"):
        compare(Args(tracking_uri=f"sqlite:///{db}"))
    assert not db.exists()


def test_failure_while_writing_leaves_no_folder_and_no_run(store, tmp_path, monkeypatch):
    import ehrlong.compare as compare_mod

    uri, _ = store

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(compare_mod, "plot_strata", broken)
    with pytest.raises(RuntimeError):
        compare(Args(tracking_uri=uri, out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("ehrlong").experiment_id
    assert len(client.search_runs([exp], "tags.kind = 'comparison'")) == 1


def test_out_refuses_a_folder_that_is_not_a_comparison(store, tmp_path):
    uri, _ = store
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="precious"):
        compare(Args(tracking_uri=uri, out=str(keep), mlflow=False))
    assert (keep / "notes.txt").read_text() == "mine"
