"""python -m ehrlong.evaluate end to end on two tiny runs of the synthetic cohort."""

from __future__ import annotations

import mlflow
import polars as pl
import pytest
from test_train import CLI, SMALL, run_code, run_dirs, train

COHORT = "data.synthetic.n_subjects=120"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    for preset, length in (("mamba_1k", 128), ("transformer_512", 64)):
        proc = train(
            tmp, f"config={preset}", "trainer.max_steps=2", *SMALL, COHORT, f"context_length={length}"
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, [run_dirs(tmp, "mamba_1k")[0], run_dirs(tmp, "transformer_512")[0]]


def evaluate(tmp, *args):
    return run_code(tmp, CLI.format(module="ehrlong.evaluate"), *args)


def test_evaluate_writes_stratified_results_comparisons_plots_and_mlflow(two_runs):
    tmp, (mamba, transformer) = two_runs
    out = tmp / "evaluation"
    proc = evaluate(
        tmp,
        f"run={mamba}",
        f"run={transformer}",
        "k=all,4",
        "seeds=2",
        "n_boot=200",
        f"out={out}",
        "progress=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = pl.read_parquet(out / "results.parquet")
    models = set(results["model"])
    assert len(models) == 4  # two runs + one count baseline per context length (128, 64)
    assert {m for m in models if m.startswith("counts")} == {"counts_L64", "counts_L128"}
    assert set(results["task"]) == {
        "family_history_mi",
        "diabetic_kidney",
        "lung_cancer",
        "acute_kidney_injury",
    }
    assert set(results["k"]) == {-1, 4}
    assert set(results["metric"]) == {"auroc", "auprc", "brier"}
    # k=all once (no seed), k=4 per seed.
    assert results.filter(pl.col("k") == -1)["seed"].is_null().all()
    assert set(results.filter(pl.col("k") == 4)["seed"]) == {0, 1}
    # Every stratum has its four quartiles; the overall rows carry quartile null.
    strata = results.filter(pl.col("stratum") != "all")
    assert set(strata["stratum"]) == {"repetition_1", "repetition", "irregularity", "event_count"}
    assert set(strata["quartile"]) == {1, 2, 3, 4}
    overall = results.filter((pl.col("stratum") == "all") & pl.col("value").is_not_nan())
    assert overall["quartile"].is_null().all()
    assert (
        (overall["ci_low"] <= overall["value"] + 1e-9) & (overall["value"] <= overall["ci_high"] + 1e-9)
    ).all()
    # The quartiles partition the labels of their (model, task, k, seed).
    q = strata.filter((pl.col("metric") == "brier") & (pl.col("stratum") == "event_count"))
    n_q = q.group_by("model", "task", "k", "seed").agg(pl.col("n").sum())
    n_all = results.filter((pl.col("metric") == "brier") & (pl.col("stratum") == "all")).select(
        "model", "task", "k", "seed", pl.col("n").alias("n_all")
    )
    joined = n_q.join(n_all, on=["model", "task", "k", "seed"], nulls_equal=True)
    assert joined.height > 0 and (joined["n"] <= joined["n_all"]).all()

    comparisons = pl.read_parquet(out / "comparisons.parquet")
    assert set(comparisons["long"]) == {f"mamba_1k@{mamba.name}"}
    assert comparisons["win_rate"].drop_nans().is_between(0, 1).all()

    for name in ("auroc_by_quartile.png", "auroc_vs_k.png", "perplexity_by_position.png", "summary.txt"):
        assert (out / name).is_file(), name
    summary = (out / "summary.txt").read_text()
    assert "held-out AUROC" in summary and "counts_L128" in summary and "family_history_mi" in summary

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    run = client.get_run((mamba / "mlflow_run_id").read_text().strip())
    logged = {k for k in run.data.metrics if k.startswith("eval/")}
    expected = results.filter(
        (pl.col("model") == f"mamba_1k@{mamba.name}") & (pl.col("k") == -1) & (pl.col("stratum") == "all")
    ).filter(pl.col("value").is_not_nan())
    assert logged == {f"eval/{t}/{m}" for t, m in expected.select("task", "metric").iter_rows()}
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation/evaluation")]
    assert any(a.endswith("results.csv") for a in artifacts)


def test_bad_input_exits_2_and_writes_nothing(two_runs, tmp_path):
    tmp, (mamba, _) = two_runs
    out = tmp_path / "never"
    proc = evaluate(tmp, f"run={tmp / 'no-such-run'}", f"out={out}")
    assert proc.returncode == 2 and "no-such-run" in proc.stderr and "Traceback" not in proc.stderr
    proc = evaluate(tmp, f"run={mamba}", "tasks=sepsis", f"out={out}")
    assert proc.returncode == 2 and "family_history_mi" in proc.stderr  # lists the valid tasks
    proc = evaluate(tmp, f"run={mamba}", "k=0", f"out={out}")
    assert proc.returncode == 2 and "k=" in proc.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
