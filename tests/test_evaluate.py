"""python -m ehrlong.evaluate end to end on two tiny runs of the synthetic cohort."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import polars as pl
import pytest
from test_train import CLI, SMALL, run_code, run_dirs, train

from ehrlong.errors import ConfigError

COHORT = "data.synthetic.n_subjects=120"
TASKS = ("family_history_mi", "diabetic_kidney", "lung_cancer", "acute_kidney_injury")


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


@pytest.fixture(scope="module")
def evaluated(two_runs):
    tmp, (mamba, transformer) = two_runs
    out = tmp / "evaluation"
    proc = evaluate(
        tmp,
        f"run={mamba}",
        f"run={transformer}",
        "k=all,4",
        "context_lengths=32",
        "seeds=2",
        "n_boot=200",
        f"out={out}",
        "progress=false",
        "predictions=true",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, (mamba, transformer), out


def test_evaluate_writes_stratified_results_comparisons_plots_and_mlflow(evaluated):
    tmp, (mamba, transformer), out = evaluated
    results = pl.read_parquet(out / "results.parquet")
    models = set(results["model"])
    # Two runs, each also at L=32 (context_lengths=), and one count baseline per context length.
    assert models == {
        f"mamba_1k@{mamba.name}",
        f"transformer_512@{transformer.name}",
        f"mamba_1k@{mamba.name}@L32",
        f"transformer_512@{transformer.name}@L32",
        "counts_L32",
        "counts_L64",
        "counts_L128",
    }
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
    pairs = set(comparisons.select("long", "short").unique().iter_rows())
    assert (f"mamba_1k@{mamba.name}", f"mamba_1k@{mamba.name}@L32") in pairs  # same weights, 128 vs 32 tokens
    assert (f"mamba_1k@{mamba.name}", f"transformer_512@{transformer.name}") in pairs  # 128 vs 64
    # Count baselines are compared among themselves only (what the extra tokens give counting).
    assert ("counts_L128", "counts_L32") in pairs and ("counts_L64", "counts_L32") in pairs
    assert all(long.startswith("counts") == short.startswith("counts") for long, short in pairs)
    # Only longer against shorter: the two runs' L=32 ablations are no context comparison.
    assert (f"mamba_1k@{mamba.name}@L32", f"transformer_512@{transformer.name}@L32") not in pairs
    lengths = {f"mamba_1k@{mamba.name}": 128, f"transformer_512@{transformer.name}": 64}
    lengths |= {f"{m}@L32": 32 for m in list(lengths)} | {f"counts_L{n}": n for n in (32, 64, 128)}
    assert all(lengths[long] > lengths[short] for long, short in pairs)
    assert comparisons["win_rate"].drop_nans().is_between(0, 1).all()

    for name in ("auroc_by_quartile.png", "auroc_vs_k.png", "perplexity_by_position.png", "summary.txt"):
        assert (out / name).is_file(), name
    summary = (out / "summary.txt").read_text()
    assert "held-out AUROC" in summary and "counts_L128" in summary and "family_history_mi" in summary
    # Each task's row ends with its held-out labels, positives and subjects, as results.parquet has them.
    overall_k = results.filter(
        (pl.col("stratum") == "all") & (pl.col("k") == -1) & (pl.col("metric") == "auroc")
    )
    for task, n, pos, subjects in overall_k.select("task", "n", "n_pos", "n_subjects").unique().iter_rows():
        row = next(x for x in summary.splitlines() if x.startswith(f"{task} "))
        assert row.endswith(f"  {n} ({pos}, {subjects})"), row
    # The long-vs-short AUROC differences are in the summary, as comparisons.parquet has them.
    overall = comparisons.filter(
        (pl.col("stratum") == "repetition_1") & pl.col("quartile").is_null() & (pl.col("metric") == "auroc")
    )
    assert overall.height == len(pairs) * 4  # every pair, every task
    for long, short, task, diff in overall.select("long", "short", "task", "difference").iter_rows():
        line = next(x for x in summary.splitlines() if x.startswith(f"  {long} vs {short}, {task}: "))
        assert line.endswith("n/a") if diff != diff else f"{diff:+.3f} [" in line

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    run = client.get_run((mamba / "mlflow_run_id").read_text().strip())
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    mine = results.filter((pl.col("model") == f"mamba_1k@{mamba.name}") & (pl.col("k") == -1))
    overall = mine.filter((pl.col("stratum") == "all") & pl.col("value").is_not_nan())
    for t, m, v, lo, hi in overall.select("task", "metric", "value", "ci_low", "ci_high").iter_rows():
        assert logged[f"eval/{t}/{m}"] == pytest.approx(v)
        assert logged[f"eval/{t}/{m}/ci_low"] == pytest.approx(lo)
        assert logged[f"eval/{t}/{m}/ci_high"] == pytest.approx(hi)
    quartiles = mine.filter((pl.col("stratum") != "all") & pl.col("value").is_not_nan())
    for t, m, st, q, v in quartiles.select("task", "metric", "stratum", "quartile", "value").iter_rows():
        assert logged[f"eval/{t}/{m}/{st}/q{q}"] == pytest.approx(v)
    # Nothing else: no few-shot rows, no NaN values.
    finite = mine.select(
        pl.sum_horizontal(pl.col("value", "ci_low", "ci_high").is_not_nan().fill_null(False))
    )
    assert len(logged) == finite.to_series().sum()
    # The k=all probe of every run and task is kept in the run directory for ehrlong.predict.
    preds = pl.read_parquet(out / "predictions.parquet")
    from ehrlong.evaluation.probes import load_probe

    for t, v in overall.filter(pl.col("metric") == "auroc").select("task", "value").iter_rows():
        probe, meta = load_probe(mamba / "probes" / f"{t}.json")
        assert (
            meta["task"] == t and meta["context_length"] == 128 and meta["held_out_auroc"] == pytest.approx(v)
        )
        fit = preds.filter(
            (pl.col("model") == f"mamba_1k@{mamba.name}") & (pl.col("task") == t) & (pl.col("k") == -1)
        )
        assert probe.C == fit["C"][0]
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


def test_signalcheck_scores_every_held_out_subject_and_prints_their_auroc(two_runs, tmp_path, meds_root):
    import re

    import yaml
    from sklearn.metrics import roc_auc_score

    from ehrlong.data.synthetic import TASKS as SYNTHETIC_TASKS

    tmp, (mamba, _) = two_runs
    out = tmp_path / "scores.parquet"
    code = CLI.format(module="ehrlong.evaluation.signalcheck")
    proc = run_code(tmp, code, f"run={mamba}", "short=16", "n_boot=50", f"out={out}", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = pl.read_parquet(out)
    (root,) = (tmp / "data" / "synthetic").iterdir()
    dials = pl.read_parquet(root / "metadata" / "subject_dials.parquet").filter(pl.col("split") == "held_out")
    assert set(scores["subject_id"]) == set(dials["subject_id"]) and scores.height == 4 * dials.height
    for name, task in SYNTHETIC_TASKS.items():
        t = scores.filter(pl.col("task") == name).join(dials, on="subject_id")
        assert (t["level"] == (t[f"{name}_level"] != task.levels[0])).all()
        assert ((t["long"] > 0) & (t["long"] < 1) & (t["short"] > 0) & (t["short"] < 1)).all()
        row = next(x for x in proc.stdout.splitlines() if x.startswith(f"{name} "))
        assert row.endswith(f"  {t.height} ({t['level'].sum()})"), row
        if t["level"].n_unique() == 1:
            assert row.count("n/a (one class)") == 3, row
        else:
            long, short = (float(v) for v in re.findall(r"(\d\.\d{3}) \[", row)[:2])
            assert long == pytest.approx(roc_auc_score(t["level"], t["long"]), abs=6e-4)
            assert short == pytest.approx(roc_auc_score(t["level"], t["short"]), abs=6e-4)

    # A run whose dataset has no latent levels: a clear error naming the missing file.
    moved = tmp_path / "run_on_meds"
    moved.mkdir()
    for f in ("model.ckpt", "tokenizer.json"):
        (moved / f).write_bytes((mamba / f).read_bytes())
    cfg = yaml.safe_load((mamba / "config.yaml").read_text())
    cfg["data"]["root"] = str(meds_root)
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_code(tmp, code, f"run={moved}", "progress=false")
    assert proc.returncode == 2 and "subject_dials.parquet" in proc.stderr and "Traceback" not in proc.stderr


# --- ehrlong.predict on the evaluated runs (it applies the probes evaluate saved) ---------------------


def predict(tmp, *args):
    return run_code(tmp, CLI.format(module="ehrlong.predict"), *args)


def _cohort(tmp):
    (root,) = (tmp / "data" / "synthetic").iterdir()
    return root


def test_predictions_follow_the_schema_flag_bad_rows_and_reproduce_evaluate(evaluated, tmp_path):
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    from ehrlong.evaluation.probes import load_probe
    from ehrlong.predict import PREDICTION_SCHEMA

    tmp, (mamba, _), out = evaluated
    root = _cohort(tmp)
    labels = pl.read_parquet(root / "labels" / "family_history_mi.parquet")
    extra = pl.DataFrame(
        {
            "subject_id": [10**12, labels["subject_id"][0]],
            "prediction_time": [labels["prediction_time"][0], None],
        },
        schema=labels.select("subject_id", "prediction_time").schema,
    ).with_columns(
        pl.col("prediction_time").fill_null(pl.datetime(1900, 1, 1)).cast(pl.Datetime("us")),
        pl.lit(True).alias("boolean_value"),
    )
    asked = pl.concat([labels.select(extra.columns), extra])
    asked.write_parquet(tmp_path / "labels.parquet")
    target = tmp_path / "preds" / "fh.parquet"
    proc = predict(
        tmp,
        f"run={mamba}",
        "task=family_history_mi",
        f"labels={tmp_path / 'labels.parquet'}",
        f"out={target}",
        "subjects_per_batch=7",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pq.read_schema(target).remove_metadata() == PREDICTION_SCHEMA
    got = pl.read_parquet(target)
    assert got.height == asked.height  # nothing dropped
    assert got.filter(pl.col("subject_id") == 10**12)["status"].to_list() == ["unknown_subject"]
    assert got.filter(pl.col("prediction_time") == dt_1900())["status"].to_list() == ["no_history"]
    bad = got.filter(pl.col("status").is_in(["unknown_subject", "no_history"]))
    assert (
        bad["predicted_boolean_probability"].is_null().all()
        and bad["predicted_boolean_value"].is_null().all()
    )
    summary = json.loads(target.with_suffix(".summary.json").read_text())
    assert summary["status_counts"]["unknown_subject"] == 1 and summary["status_counts"]["no_history"] == 1

    # The held-out AUROC recomputed by scikit-learn from the file equals what evaluate reported.
    splits = pl.read_parquet(root / "metadata" / "subject_splits.parquet")
    held = got.join(splits, on="subject_id").filter(
        (pl.col("split") == "held_out") & (pl.col("status") == "ok")
    )
    auroc = roc_auc_score(held["boolean_value"].to_numpy(), held["predicted_boolean_probability"].to_numpy())
    _, meta = load_probe(mamba / "probes" / "family_history_mi.json")
    results = pl.read_parquet(out / "results.parquet").filter(
        (pl.col("model") == f"mamba_1k@{mamba.name}")
        & (pl.col("task") == "family_history_mi")
        & (pl.col("k") == -1)
        & (pl.col("stratum") == "all")
        & (pl.col("metric") == "auroc")
    )
    assert held.height == results["n"][0] == meta["held_out_n"]
    assert auroc == pytest.approx(results["value"][0], abs=1e-9) == pytest.approx(meta["held_out_auroc"])


def dt_1900():
    import datetime as dt

    return dt.datetime(1900, 1, 1)


def test_predict_now_gives_every_held_out_subject_one_row_per_task(evaluated, tmp_path):
    tmp, (_, transformer), _ = evaluated
    out = tmp_path / "now"
    proc = predict(tmp, f"run={transformer}", f"out={out}", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    splits = pl.read_parquet(_cohort(tmp) / "metadata" / "subject_splits.parquet")
    held = set(splits.filter(pl.col("split") == "held_out")["subject_id"])
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["summary.json", *(f"{t}.parquet" for t in TASKS)])
    # "Now" is each subject's last timed event in the MEDS data, to the microsecond.
    events = pl.concat([pl.read_parquet(p) for p in (_cohort(tmp) / "data").rglob("*.parquet")])
    last = dict(events.group_by("subject_id").agg(pl.col("time").max()).iter_rows())
    for task in TASKS:
        got = pl.read_parquet(out / f"{task}.parquet")
        assert set(got["subject_id"]) == held and got["subject_id"].is_unique().all()
        assert all(t == last[s] for s, t in got.select("subject_id", "prediction_time").iter_rows())
        assert (got["status"] == "ok").all() and got["boolean_value"].is_null().all()
        p = got["predicted_boolean_probability"]
        assert p.is_between(0, 1).all() and (got["predicted_boolean_value"] == (p >= 0.5)).all()


def test_predict_bad_input_exits_2_and_leaves_no_output(evaluated, tmp_path):
    import shutil

    tmp, (mamba, _), _ = evaluated
    target = tmp_path / "p.parquet"
    pl.DataFrame({"subject_id": [1], "time": [None]}).write_parquet(tmp_path / "bad.parquet")
    proc = predict(
        tmp, f"run={mamba}", "task=lung_cancer", f"labels={tmp_path / 'bad.parquet'}", f"out={target}"
    )
    assert proc.returncode == 2 and "prediction_time" in proc.stderr and "bad.parquet" in proc.stderr
    proc = predict(tmp, f"run={mamba}", f"out={target}")  # one file, four tasks
    assert proc.returncode == 2 and "task=NAME" in proc.stderr
    bare = tmp_path / "bare"
    shutil.copytree(mamba, bare, ignore=shutil.ignore_patterns("probes"))
    proc = predict(tmp, f"run={bare}", f"out={target}")
    assert proc.returncode == 2 and "ehrlong.evaluate" in proc.stderr
    # A failure half-way (the second batch) leaves neither the output nor its .partial behind.
    code = (
        "import ehrlong.evaluation.representations as r\n"
        "_embed, calls = r.embed_windows, []\n"
        "def embed(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2: raise RuntimeError('disk full')\n"
        "    return _embed(*a, **k)\n"
        "r.embed_windows = embed\n" + CLI.format(module="ehrlong.predict").replace("; ", "\n")
    )
    proc = run_code(
        tmp, code, f"run={mamba}", "task=lung_cancer", "split=all", "subjects_per_batch=10", f"out={target}"
    )
    assert proc.returncode != 0 and "disk full" in proc.stderr
    assert not target.exists() and not target.with_name(target.name + ".partial").exists()


def test_predict_on_another_dataset_encodes_it_with_the_runs_vocabulary(evaluated, tmp_path):
    """A run applied to patients it never saw: no refit (ids would mean other codes), unknown codes
    counted as UNK, every held-out subject predicted."""
    import datetime as dt

    from ehrlong.config import SyntheticConfig
    from ehrlong.data.meds import read_splits
    from ehrlong.data.store import TokenStore, build_store
    from ehrlong.data.synthetic import generate
    from ehrlong.tokenizer import EventTokenizer

    tmp, (mamba, _), _ = evaluated
    other = tmp_path / "other"
    generate(SyntheticConfig(n_subjects=40, seed=7), other, progress=False)
    # One event with a code no training cohort has, for a held-out subject, inside its history.
    held = read_splits(other).filter(pl.col("split") == "held_out")["subject_id"].sort()
    shard = next(
        p
        for p in sorted((other / "data").rglob("*.parquet"))
        if pl.read_parquet(p)["subject_id"].is_in(held.to_list()).any()
    )
    events = pl.read_parquet(shard)
    subject = events.filter(pl.col("subject_id").is_in(held.to_list()))["subject_id"][0]
    first = events.filter((pl.col("subject_id") == subject) & pl.col("time").is_not_null())["time"].min()
    novel = events.filter((pl.col("subject_id") == subject) & (pl.col("time") == first)).head(1)
    novel = novel.with_columns(pl.lit("NEVER//SEEN").alias("code"), pl.col("time") + dt.timedelta(seconds=1))
    pl.concat([events, novel]).sort("subject_id", "time", nulls_last=False).write_parquet(shard)

    target = tmp_path / "other.parquet"
    proc = predict(
        tmp, f"run={mamba}", f"data={other}", "task=lung_cancer", f"out={target}", "progress=false"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = pl.read_parquet(target)
    assert sorted(got["subject_id"]) == held.to_list() and (got["status"] == "ok").all()
    summary = json.loads(target.with_suffix(".summary.json").read_text())
    run_tokenizer = EventTokenizer.load(mamba / "tokenizer.json")
    held_events = pl.concat([pl.read_parquet(p) for p in (other / "data").rglob("*.parquet")]).filter(
        pl.col("subject_id").is_in(held.to_list())
    )
    unknown = held_events.filter(~pl.col("code").is_in(run_tokenizer.codes))
    assert "NEVER//SEEN" in unknown["code"].to_list()
    assert summary["unknown_code_events"]["held_out"] == unknown.height
    used = TokenStore.open(summary["store"])
    assert used.tokenizer.hash == run_tokenizer.hash and used.meta["tokenizer"]["fitted_here"] is False
    # A refit on this cohort would have given another vocabulary: the case the run must not be fed.
    refit = build_store(other, "cehr", out=tmp_path / "refit", progress=False)
    assert refit.meta["tokenizer"]["hash"] != run_tokenizer.hash

    # A run directory whose tokenizer.json is not the checkpoint's is refused, naming both.
    import shutil

    swapped = tmp_path / "swapped"
    shutil.copytree(mamba, swapped)
    shutil.copyfile(tmp_path / "refit" / "tokenizer.json", swapped / "tokenizer.json")
    proc = predict(tmp, f"run={swapped}", "task=lung_cancer", f"out={tmp_path / 'x.parquet'}")
    assert proc.returncode == 2 and "tokenizer.json" in proc.stderr and "model.ckpt" in proc.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_incremental_update_equals_the_from_scratch_prediction(evaluated):
    """State after N tokens + M new tokens gives the prediction embed_windows + the probe give over N+M."""
    from ehrlong.data.store import TokenStore, ensure_store
    from ehrlong.evaluation.probes import load_probe
    from ehrlong.evaluation.representations import embed_windows, load_run
    from ehrlong.incremental import IncrementalPredictor

    tmp, (mamba, transformer), _ = evaluated
    run = load_run(mamba)
    store = TokenStore.open(ensure_store(_cohort(tmp), run.cfg.data.tokenizer, progress=False))
    probe, _ = load_probe(mamba / "probes" / "lung_cancer.json")
    predictor = IncrementalPredictor(run, {"lung_cancer": probe})
    s = int(store.offsets[3])
    tokens = np.asarray(store.tokens[s : s + 120], dtype=np.int64)  # within the run's context (128)
    for n in (100, 119, 5):  # m = 20, 1, 115 new tokens
        timeline = predictor.update(predictor.start(tokens[:n]), tokens[n:])
        assert timeline.n_tokens == 120
        scratch = embed_windows(run.module, store, np.array([[3, s, s + 120]]), progress=False)
        np.testing.assert_allclose(timeline.last_hidden.numpy(), scratch[0], atol=2e-5)
        assert predictor.predict(timeline)["lung_cancer"] == pytest.approx(
            probe.predict_proba(scratch)[0], abs=1e-5
        )
    with pytest.raises(ConfigError, match="backbone=mamba"):
        IncrementalPredictor(load_run(transformer), {})


def test_summary_flags_tasks_whose_ci_rests_on_few_cases():
    from types import SimpleNamespace

    from ehrlong.evaluate import THIN_CLASS, _summary

    def row(task, n, pos):
        return dict(
            model="m",
            task=task,
            k=-1,
            stratum="all",
            metric="auroc",
            value=0.7,
            ci_low=0.6,
            ci_high=0.8,
            n=n,
            n_pos=pos,
            n_subjects=10,
        )

    rows = [
        row("plenty", 200, 60),
        row("one_positive", 170, 1),
        row("few_negatives", 40, 40 - THIN_CLASS + 1),
    ]
    summary = _summary(pl.DataFrame(rows), [SimpleNamespace(name="m")])
    assert next(x for x in summary.splitlines() if x.startswith("plenty ")).endswith("  200 (60, 10)")
    flagged = next(x for x in summary.splitlines() if x.startswith("too few held-out cases"))
    assert "one_positive (1 positive, 169 negative)" in flagged
    assert f"few_negatives ({40 - THIN_CLASS + 1} positive, {THIN_CLASS - 1} negative)" in flagged
    assert "plenty" not in flagged
