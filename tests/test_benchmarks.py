"""Long-context benchmark adapters (ehrlong.benchmarks) and `python -m ehrlong.benchmark`.

Task tests run on a hand-built in-memory token store (30 subjects of 5-400 tokens over 400 codes, so
haystacks longer than a timeline must concatenate); the CLI runs end to end on a tiny trained run.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import torch
from test_train import CLI, SMALL, run_code, run_dirs, train

from ehrlong.benchmarks import (
    SUITES,
    TASKS,
    Blind,
    Haystack,
    Oracle,
    ProbeTokens,
    RunModel,
    aggregate,
    depth_index,
    effective_length,
    make_samples,
    resolve_tasks,
    score_samples,
)
from ehrlong.benchmarks.report import by_length, effective_table, far_rows, summary
from ehrlong.data.meds import SPLITS
from ehrlong.data.store import TokenStore
from ehrlong.errors import ConfigError, DataError
from ehrlong.tokenizer import EOS_ID, EventTokenizer, TokenizerRecipe

N_CODES = 400


def fake_store(lengths=None, seed: int = 0) -> TokenStore:
    """30 subjects (ids 100..129) of 5-400 tokens of random codes, sorted times; split = index % 3."""
    tok = EventTokenizer(
        TokenizerRecipe(), [f"C{i:03d}" for i in range(N_CODES)], [None] * N_CODES, [[]] * N_CODES
    )
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 400, 30) if lengths is None else np.asarray(lengths)
    first = tok.first_code_id
    tokens = np.concatenate([rng.integers(first, first + N_CODES, n) for n in lengths]).astype(np.int32)
    days = np.concatenate(
        [np.sort(rng.uniform(0, 900, n)) + 20_000 + 1_000 * i for i, n in enumerate(lengths)]
    )
    times = (days * 86_400_000_000).astype(np.int64)  # microseconds since the epoch, as a store keeps them
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays = {
        "tokens": tokens,
        "times_us": times,
        "offsets": offsets,
        "subject_ids": np.arange(100, 100 + len(lengths), dtype=np.int64),
        "splits": (np.arange(len(lengths)) % 3).astype(np.int8),
    }
    store = TokenStore(Path("in-memory"), arrays, {})
    store._tokenizer = tok
    return store


@pytest.fixture(scope="module")
def store():
    return fake_store()


@pytest.fixture(scope="module")
def hay(store):
    return Haystack(store, "held_out")


def cells(task, hay, length, n, depths=(0.0, 0.5, 1.0), seed=0):
    return [s for d in depths for s in make_samples(task, hay, length, d, n // len(depths), seed)]


def scores(rows, key="score"):
    return np.array([r[key] for r in rows])


# --- every task: oracle 100%, position-blind baselines at chance -------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_oracle_is_perfect_and_blind_models_are_at_chance(name, hay, store):
    task = TASKS[name]
    V = store.tokenizer.vocab_size
    samples = cells(task, hay, 192, 450)
    oracle = score_samples(Oracle(samples, V), samples)
    # Two position-blind baselines: seeded random logits, and the train unigram prior ("the most
    # frequent candidate"). Neither looks at the haystack or the position.
    unigram = np.log(hay.train_counts + 1.0)
    blinds = [score_samples(Blind(V, seed=3), samples), score_samples(Blind(V, prior=unigram), samples)]
    chance = task.chance(ProbeTokens.of(store.tokenizer))
    if task.trainable:
        assert scores(oracle).mean() == 1.0 and scores(oracle, "score_vocab").mean() == 1.0
        for rows in blinds:
            # Binomial tolerance: 4 standard errors of a share `chance` over n samples (recall@k is less
            # variable than a single 0/1 draw, so this is conservative for it).
            tol = 4 * math.sqrt(chance * (1 - chance) / len(samples))
            assert abs(scores(rows).mean() - chance) <= tol, (scores(rows).mean(), chance, tol)
    else:
        assert chance == 0.0
        for rows in blinds:  # the same logits at the earlier and the later position: no gain at all
            assert np.abs(scores(rows)).max() < 1e-9
        if name == "copy_forward":
            assert scores(oracle, "copy_accuracy").mean() == 1.0 and scores(oracle, "ce_copy").max() < 1e-6
            assert scores(oracle).min() == pytest.approx(math.log(V), rel=1e-6)  # all of the first CE
        else:
            assert scores(oracle, "hit").mean() == 1.0 and scores(oracle).min() > 0


def test_retrieval_is_argmax_over_candidates_and_vocab_score_is_stricter(hay, store):
    task = TASKS["needle_single"]
    samples = make_samples(task, hay, 128, 0.5, 20)
    V = store.tokenizer.vocab_size
    oracle = Oracle(samples, V)
    code = store.tokenizer.first_code_id

    def loud_code(tokens, times, mask):  # right among the values, but a code beats them all
        logits = oracle(tokens, times, mask)
        logits[..., code] = 100.0
        return logits

    rows = score_samples(loud_code, samples)
    assert scores(rows).mean() == 1.0 and scores(rows, "score_vocab").mean() == 0.0


# --- sample generation: determinism, depth placement, provenance ----------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_samples_are_deterministic_per_seed_and_share_the_haystack_across_depths(name, hay):
    task = TASKS[name]
    a = make_samples(task, hay, 256, 0.25, 6, seed=7)
    b = make_samples(task, hay, 256, 0.25, 6, seed=7)
    c = make_samples(task, hay, 256, 0.25, 6, seed=8)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.times, y.times)
        assert all(np.array_equal(p, q) for p, q in zip(x.answers, y.answers, strict=True))
        assert x.meta == y.meta
    assert any(not np.array_equal(x.tokens, z.tokens) for x, z in zip(a, c, strict=True))
    # Kamradt-style grid: one sample index has the same haystack at every depth.
    deep = make_samples(task, hay, 256, 1.0, 6, seed=7)
    for x, y in zip(a, deep, strict=True):
        assert np.array_equal(x.tokens[~x.inserted], y.tokens[~y.inserted])
    # Scores are deterministic too (same samples through the same model).
    model = Blind(hay.tokenizer.vocab_size, seed=1)
    assert score_samples(model, a) == score_samples(model, b)


def _check_semantics(s, probes):
    """What each task claims it planted is where it says, and the answer follows from the tokens."""
    t = s.tokens
    start = s.meta["target_start"]
    name = s.task.name
    if name in ("needle_single", "needle_multikey"):
        assert t[start] == t[-1] and t[start + 1] == s.answers[0][0] and s.answers[0][0] in probes.values
    elif name == "needle_multivalue":
        block = t[start : start + 2 * s.task.n]
        assert (block[::2] == t[-1]).all() and set(block[1::2]) == set(s.answers[0])
    elif name == "needle_multiquery":
        pairs = dict(zip(t[start : start + 8 : 2], t[start + 1 : start + 8 : 2], strict=True))
        for p, a in zip(s.answer_positions, s.answers, strict=True):
            assert pairs[t[p]] == a[0]
    elif name.startswith("variable_tracking"):
        hops = s.meta["hop_starts"]
        assert list(hops) == sorted(hops) and t[hops[0] + 1] == s.answers[0][0]
        for h in range(1, len(hops)):
            assert t[hops[h] + 1] == t[hops[h - 1]]  # X_{h+1} = X_h
        assert t[hops[-1]] == t[-1]  # the query is the chain's last variable
    elif name == "frequent_codes":
        counts = {int(c): int((t == c).sum()) for c in s.candidates}
        top = sorted(counts, key=counts.get, reverse=True)[: s.task.k]
        assert set(top) == set(s.answers[0].tolist())
        assert min(counts[c] for c in top) > max(v for c, v in counts.items() if c not in top)
        assert not np.isin(s.candidates, t[~s.inserted]).any()  # absent from the haystack itself
        assert t[-1] == probes.marker
    elif name == "copy_forward":
        m = s.task.block
        assert np.array_equal(t[-m:], t[start : start + m])
    elif name == "likelihood":
        code = s.meta["code"]
        assert t[start] == code and (t == code).sum() == 1 and s.answers[0][0] == code
        diff = np.flatnonzero(t != s.control_tokens)
        assert diff.tolist() == [start] and s.control_tokens[start] == s.meta["control_code"] != code


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_target_sits_at_the_requested_depth_and_times_never_decrease(name, depth, hay, store):
    task = TASKS[name]
    probes = ProbeTokens.of(store.tokenizer)
    for s in make_samples(task, hay, 160, depth, 4, seed=2):
        assert len(s.tokens) == len(s.times) == len(s.inserted) == 160
        assert (np.diff(s.times) >= 0).all()
        H = int((~s.inserted).sum())
        start = s.meta["target_start"]
        before = int((~s.inserted[:start]).sum())  # haystack tokens before the target
        if name == "copy_forward":  # depth of the range the block can start in: [0, H - block]
            H -= s.task.block
        assert before == depth_index(depth, H) and abs(before - depth * H) <= 1
        if name != "copy_forward":
            assert s.inserted[start]
        # Answer positions predict the next token: they lie inside the sequence, after the target.
        assert (s.answer_positions >= start).all() and (s.answer_positions < 160).all()
        _check_semantics(s, probes)


@pytest.mark.parametrize("name", list(TASKS))
def test_haystacks_come_from_the_given_store_and_split_only(name, hay, store):
    tokens, offsets = np.asarray(store.tokens), store.offsets
    held_out = set(np.asarray(store.subject_ids)[np.asarray(store.splits) == SPLITS.index("held_out")])
    n_concat = 0
    for s in make_samples(TASKS[name], hay, 640, 0.5, 5, seed=4):
        haystack = s.tokens[~s.inserted]
        pieces = s.meta["pieces"]
        n_concat += len(pieces) > 1
        assert s.meta["n_separators"] == len(pieces) - 1 == int((haystack == EOS_ID).sum())
        # Cut at the separators, every piece is exactly store tokens [start, end) of its subject.
        cuts = np.flatnonzero(haystack == EOS_ID)
        parts = np.split(haystack, cuts)
        parts = [parts[0]] + [p[1:] for p in parts[1:]]
        for (sid, a, b), part in zip(pieces, parts, strict=True):
            assert sid in held_out
            i = int(sid) - 100
            assert np.array_equal(part, tokens[offsets[i] + a : offsets[i] + b])
        assert s.meta["subject_ids"] == [p[0] for p in pieces]
    assert n_concat > 0  # 640 tokens is longer than any timeline here: concatenation was exercised


def test_short_split_reuses_subjects_and_says_so():
    small = fake_store(lengths=[30] * 6)  # held_out: 2 subjects, 60 tokens
    hay = Haystack(small, "held_out")
    (s,) = make_samples(TASKS["needle_single"], hay, 200, 0.5, 1)
    assert s.meta["repeated_subjects"] > 0 and s.meta["n_subjects"] > 2
    assert (np.diff(s.times) >= 0).all()
    with pytest.raises(DataError, match="held_out split"):  # no subject with tokens: named, not skipped
        Haystack(fake_store(lengths=[30, 30, 0]), "held_out")


def test_long_timeline_gives_one_window_without_separator(hay, store):
    lengths = np.diff(store.offsets)
    longest = int(lengths[hay.subjects].max())
    single = 0
    for s in make_samples(TASKS["needle_single"], hay, 40, 0.5, 20, seed=5):
        if s.meta["n_subjects"] == 1:
            sid, a, b = s.meta["pieces"][0]
            assert b - a == 37 and EOS_ID not in s.tokens
            single += 1
    assert longest > 40 and single > 0


# --- effective length --------------------------------------------------------------------------------


def test_effective_length_rule():
    # Monotone: 16k is the last length at >= 85.6% of the 1k score.
    e = effective_length([1024, 4096, 16384, 65536], [1.0, 0.9, 0.86, 0.5])
    assert e.effective_length == 16384 and e.longest_passing == 16384 and e.threshold == pytest.approx(0.856)
    # Exactly at the threshold passes (>=); input order does not matter.
    assert effective_length([4096, 1024], [0.428, 0.5]).effective_length == 4096
    # Non-monotone: a recovery after a drop does not extend it; longest_passing reports the recovery.
    e = effective_length([1024, 4096, 16384], [1.0, 0.5, 0.95])
    assert e.effective_length == 1024 and e.longest_passing == 16384 and "non-monotone" in e.note
    # A NaN (unmeasured) length stops it like a failing one.
    assert effective_length([1, 2, 3], [1.0, math.nan, 1.0]).effective_length == 1
    # The shortest length is the reference: it passes unless it is not above chance.
    e = effective_length([1024, 4096], [0.03, 0.5], chance=1 / 32)
    assert e.effective_length is None and "chance" in e.note
    assert effective_length([1024, 4096], [0.0, 0.0]).effective_length is None  # loss drop 0 = chance
    assert effective_length([1024, 4096], [0.2, 0.01], chance=1 / 32).effective_length == 1024
    # ... and a reference that is above chance only by noise (its 95% CI reaches chance) keeps nothing.
    assert effective_length([1024, 4096], [0.05, 0.05], chance=1 / 32, ci_low=0.01).effective_length is None
    assert effective_length([1024, 4096], [0.5, 0.45], chance=1 / 32, ci_low=0.4).effective_length == 4096
    assert effective_length([2048], [0.7]).effective_length == 2048
    assert effective_length([1, 2, 3], [0.9, 0.95, 1.0]).effective_length == 3


def _rows(score_of, lengths=(1024, 4096, 16384), depths=(0.0, 0.5, 1.0), n=8):
    """Per-sample rows of one retrieval task whose sample scores 1 where score_of(length, depth, i)."""
    return [
        {
            "task": "needle_single",
            "metric": "accuracy",
            "length": length,
            "depth": depth,
            "index": i,
            "score": float(score_of(length, depth, i)),
            "n_subjects": 1,
            "n_separators": 0,
            "repeated_subjects": 0,
            "subject_indices": [0],
        }
        for length in lengths
        for depth in depths
        for i in range(n)
    ]


@pytest.mark.parametrize(
    "name, score_of, plain, far",
    [
        # Only the target right before the query is found: the same mean at every length, so the plain
        # rule calls every length effective; without depth 1 nothing is above chance.
        ("recency only", lambda n, d, i: d == 1.0, 16384, None),
        ("retrieves everywhere", lambda n, d, i: True, 16384, 16384),
        ("far retrieval fails beyond 1k", lambda n, d, i: d == 1.0 or n == 1024, 1024, 1024),
        # Far targets hold up to 4k, then only depth 1 is left: the plain mean (1/3 of 1k's) fails too.
        ("far retrieval holds to 4k", lambda n, d, i: d == 1.0 or n <= 4096, 4096, 4096),
    ],
)
def test_effective_length_without_depth_one_ignores_recency(name, score_of, plain, far):
    rows = _rows(score_of)
    chance = {"needle_single": 1 / 32}
    table = effective_table(by_length(rows, chance), by_length(far_rows(rows), chance))
    row = table.row(0, named=True)
    assert (row["effective_length"], row["effective_length_far"]) == (plain, far), name
    assert "without depth 1" in summary(aggregate(rows, chance), by_length(rows, chance), table, [])
    assert {r["depth"] for r in far_rows(rows)} == {0.0, 0.5}


def test_registries_list_valid_names():
    assert [t.name for t in resolve_tasks("ruler")] == SUITES["ruler"]
    assert set(SUITES["all"]) == set(TASKS) and set(SUITES["ruler"]) | set(SUITES["ehr"]) <= set(TASKS)
    with pytest.raises(ConfigError, match="needle_single") as e:
        resolve_tasks("ruler", ["needle"])
    assert "'needle'" in str(e.value)
    with pytest.raises(ConfigError, match="ruler") as e:
        resolve_tasks("longbench")
    assert "'longbench'" in str(e.value)
    with pytest.raises(ConfigError, match=">= 6"):
        make_samples(TASKS["needle_single"], None, 5, 0.5, 1)


# --- a tiny trained run: the model path, the fine-tune and the CLI -------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    proc = train(tmp, "config=mamba_1k", "trainer.max_steps=2", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, run_dirs(tmp, "mamba_1k")[0]


@pytest.fixture(scope="module")
def loaded(trained):
    """The trained run and its own token store (the synthetic cohort the run was trained on)."""
    from ehrlong.evaluation.representations import data_root, load_run, store_for_run

    tmp, run_dir = trained
    with pytest.MonkeyPatch.context() as mp:
        for key, sub in (("EHRLONG_DATA", "data"), ("EHRLONG_CACHE", "cache"), ("EHRLONG_RUNS", "runs")):
            mp.setenv(key, str(tmp / sub))
        run = load_run(run_dir)
        return run, store_for_run(run, data_root(None, [run]))


def test_run_model_applies_the_head_only_where_scored_and_matches_full_logits(loaded):
    run, store = loaded
    samples = make_samples(TASKS["copy_forward"], Haystack(store, "held_out"), 96, 0.5, 3)

    def full(tokens, times, mask):
        return run.module.head(run.module.backbone(tokens=tokens, times=times, mask=mask))

    a = score_samples(RunModel(run.module), samples)
    b = score_samples(full, samples)
    c = score_samples(run.module, samples)  # an EHRLitModule is taken as it is
    for x, y, z in zip(a, b, c, strict=True):
        assert x["score"] == pytest.approx(y["score"], abs=1e-4) and x == z
        assert x["ce_first"] > 0 and x["ce_copy"] > 0


def test_finetune_trains_a_copy_on_answer_positions_deterministically(loaded):
    from ehrlong.benchmarks.finetune import answer_loss, finetune

    run, store = loaded
    before = {k: v.clone() for k, v in run.module.state_dict().items()}
    hay = Haystack(store, "train")
    tasks = [TASKS["needle_single"], TASKS["frequent_codes"]]
    one = finetune(run.module, tasks, hay, 128, steps=3, tokens_per_step=512, seed=0, progress=False)
    two = finetune(run.module, tasks, hay, 128, steps=3, tokens_per_step=512, seed=0, progress=False)
    assert one.losses == two.losses and one.tasks == ["needle_single", "frequent_codes", "needle_single"]
    assert all(52 <= n <= 128 for n in one.lengths)  # within the run's context length
    for k, v in run.module.state_dict().items():
        assert torch.equal(v, before[k]), k  # the run's own weights are untouched
    assert any(not torch.equal(v, before[k]) for k, v in one.module.state_dict().items())
    # The loss is the CE at the answer position only: equal to the one read off the full logits.
    samples = make_samples(TASKS["needle_single"], hay, 100, 0.3, 2)
    with torch.no_grad():
        loss = answer_loss(RunModel(run.module), samples)
        ce = []
        for s in samples:
            x = torch.as_tensor(s.tokens)[None]
            t = torch.as_tensor(s.times, dtype=torch.float32)[None]
            logits = run.module.head(run.module.backbone(tokens=x, times=t, mask=torch.ones_like(x).bool()))
            ce.append(-torch.log_softmax(logits[0, -1], -1)[int(s.answers[0][0])])
    assert float(loss) == pytest.approx(float(torch.stack(ce).mean()), rel=1e-4)


def bench(tmp, *args):
    return run_code(tmp, CLI.format(module="ehrlong.benchmark"), *args)


def test_cli_end_to_end(trained):
    tmp, run_dir = trained
    ckpt_hash = hashlib.sha256((run_dir / "model.ckpt").read_bytes()).hexdigest()
    out = tmp / "bench-out"
    proc = bench(
        tmp,
        f"run={run_dir}",
        "suite=all",
        "lengths=96,192",
        "depths=0,1",
        "samples=4",
        "finetune_steps=2",
        "finetune_tokens=512",
        "finetune_max_length=96",  # below the run's context: train short, test at 96 and 192
        "seed=3",
        f"out={out}",
        "progress=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = pl.read_csv(out / "results.csv")
    assert results.height == len(TASKS) * 2 * 2 and (results["n"] == 4).all()
    assert set(results["task"]) == set(TASKS) and set(results["length"]) == {96, 192}
    for col in (
        "run",
        "task",
        "metric",
        "length",
        "depth",
        "score",
        "n",
        "ci_low",
        "ci_high",
        "chance",
        "mean_subjects",
        "share_concatenated",
        "finetuned",
    ):
        assert col in results.columns, col
    ok = results.filter(pl.col("ci_low").is_not_null() & pl.col("ci_low").is_not_nan())
    assert ((ok["ci_low"] <= ok["score"] + 1e-9) & (ok["score"] <= ok["ci_high"] + 1e-9)).all()
    trainable = {n for n, t in TASKS.items() if t.trainable}
    assert set(results.filter(pl.col("finetuned"))["task"]) == trainable
    per_sample = pl.read_parquet(out / "per_sample.parquet")
    assert per_sample.height == results["n"].sum() and "subject_indices" in per_sample.columns
    assert "subject_ids" not in per_sample.columns  # no subject identifier on disk (issue 8, privacy)

    effective = pl.read_csv(out / "effective_length.csv")
    assert set(effective["task"]) == set(TASKS) | {"retrieval_mean"}
    assert effective["rule"][0].count("85.6") >= 2 and "Llama-2-7B" in effective["rule"][0]
    for name in [*(f"heatmap_{t}" for t in TASKS), "heatmaps"]:  # one per task, and all in one
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.txt").read_text()
    assert "Llama-2-7B" in summary and "needle_single" in summary and "192" in summary
    assert "beyond the training context: 192" in summary

    # Fine-tuned weights live in the output folder; the run's checkpoint is untouched.
    tuned = torch.load(out / "finetuned.ckpt", weights_only=True)
    base = torch.load(run_dir / "model.ckpt", weights_only=True)["state_dict"]
    assert tuned["base_run"] == str(run_dir) and set(tuned["tasks"]) == trainable
    assert any(not torch.equal(tuned["state_dict"][k], base[k]) for k in base)
    assert hashlib.sha256((run_dir / "model.ckpt").read_bytes()).hexdigest() == ckpt_hash
    tune_log = json.loads((out / "finetune.json").read_text())
    assert len(tune_log["loss"]) == 2 and tune_log["max_length"] == 96
    assert max(tune_log["length"]) <= 96 and "lengths <= 96)" in summary

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    logged = client.get_run((run_dir / "mlflow_run_id").read_text().strip()).data.metrics
    by_length = pl.read_csv(out / "by_length.csv")
    for task, length, score in by_length.select("task", "length", "score").iter_rows():
        assert logged[f"bench/{task}/L{length}"] == pytest.approx(score)
    tags = client.get_run((run_dir / "mlflow_run_id").read_text().strip()).data.tags
    for task, lengths in by_length.group_by("task").agg(pl.col("length").unique().sort()).iter_rows():
        assert tags[f"bench/{task}/lengths"] == ",".join(map(str, lengths))
    for row in effective.iter_rows(named=True):
        for key in ("effective_length", "effective_length_far"):  # depths=0,1: far = depth 0 alone
            if row[key] is not None:
                assert logged[f"bench/{row['task']}/{key}"] == row[key]
    assert logged["bench/needle_single/L96/d0"] == pytest.approx(
        results.filter(
            (pl.col("task") == "needle_single") & (pl.col("length") == 96) & (pl.col("depth") == 0)
        )["score"][0]
    )
    artifacts = [
        a.path
        for a in client.list_artifacts(
            client.get_run((run_dir / "mlflow_run_id").read_text().strip()).info.run_id,
            f"benchmark/{out.name}",
        )
    ]
    assert any(a.endswith("summary.txt") for a in artifacts) and any(
        a.endswith("heatmaps.png") for a in artifacts
    )


def test_cli_bad_input_exits_2_names_the_value_and_writes_nothing(trained, tmp_path, capsys):
    from ehrlong.benchmark import main
    from ehrlong.errors import run_cli

    tmp, run_dir = trained
    out = tmp_path / "never"
    proc = bench(tmp, f"run={run_dir}", "suite=longbench", f"out={out}")
    assert proc.returncode == 2 and "'longbench'" in proc.stderr and "ruler" in proc.stderr
    assert "Traceback" not in proc.stderr
    cases = [
        (["tasks=needle_single,haystack"], ["'haystack'", "needle_multikey"]),
        (["tasks=copy_forward", "lengths=32,128"], ["lengths=32", "copy_forward", ">= 64"]),
        (["depths=0,1.5"], ["depths=1.5", "[0, 1]"]),
        (["depths=-0.1"], ["depths=-0.1"]),
        (["samples=0"], ["samples=0"]),
        (["tasks=needle_single", "finetune_max_length=4"], ["finetune_max_length=4", "needle_single"]),
        (["split=test"], ["split='test'", "held_out"]),
    ]
    for extra, expected in cases:
        with pytest.raises(SystemExit) as e:
            run_cli(main, [f"run={run_dir}", *extra, f"out={out}"])
        err = capsys.readouterr().err
        assert e.value.code == 2, (extra, err)
        for text in expected:
            assert text in err, (extra, text, err)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
