"""python -m ehrlong.compare experiment=NAME metric=auroc [task=a,b] [by=context_length] [out=DIR]

Metric x context length x backbone, read back from MLflow (DESIGN.md §1 "compare"):

    training runs (tags backbone, context_length, config_name, dataset, size; ehrlong.train)
      + the k=all results ehrlong.evaluate logs into each of them (metric=auroc|auprc|brier):
            eval/<task>/<metric>                       held-out value
            eval/<task>/<metric>/ci_low|ci_high        95% subject-level bootstrap CI
            eval/<task>/<metric>/<stratum>/q<n>[/ci_low|/ci_high]   per stratum quartile
      + or the long-context benchmark results ehrlong.benchmark logs into them:
            bench/<task>/effective_length              tokens (metric=effective_length); not logged
                                                       when the run has none -> shown as "none"
            bench/<task>/L<n>[/ci_low|/ci_high]        mean score over depths at n tokens, 95% CI
                                                       (metric=bench_score length=n)
            bench/<task>/L<n>/d<depth>                 per depth (not compared)
      -> one row per backbone (per config_name where several configs share a backbone and a column),
         one column per value of the `by` tag (context length by default, ascending); of the runs that
         have the metric for a compared task, the newest (start time) of each cell is kept
      -> printed tables, comparison.csv, PNGs, summary.txt in `out`, and an MLflow run of its own
         (tag kind=comparison, so later comparisons never read it as an input)

Runs are found through the MLflow API (search_runs), never by reading the store's files, so the same
command works against the local sqlite store and a tracking server.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from ehrlong.config import TrackingConfig, parse
from ehrlong.errors import ConfigError, DataError, run_cli
from ehrlong.evaluate import STRATA
from ehrlong.evaluation.metrics import DEFAULT_METRICS, HIGHER_IS_BETTER
from ehrlong.safety import atomic_folder
from ehrlong.tracking import TAG_KEYS

PROG = "python -m ehrlong.compare"
EVAL_METRICS = DEFAULT_METRICS  # what ehrlong.evaluate logs per task
EFFECTIVE_LENGTH, BENCH_SCORE = "effective_length", "bench_score"
# The same rule without depth 1, the target right before the query (ehrlong.benchmarks.report.FAR_DEPTH).
EFFECTIVE_LENGTH_FAR = "effective_length_far"
EFFECTIVE_METRICS = (EFFECTIVE_LENGTH, EFFECTIVE_LENGTH_FAR)  # one value per task, in tokens
BENCH_METRICS = (*EFFECTIVE_METRICS, BENCH_SCORE)  # read from what ehrlong.benchmark logs per task
METRICS = (*EVAL_METRICS, *BENCH_METRICS)
KIND_TAG = "kind"
KIND_COMPARISON = "comparison"
CI_BOUNDS = ("ci_low", "ci_high")
RUN_TAGS = TAG_KEYS  # ehrlong.train tags every run with these
SIZE_ORDER = ("tiny", "small", "base")  # config `size`, smallest first: the column order of by=size
CSV_COLUMNS = (
    "task",
    "row",
    *RUN_TAGS,  # backbone, context_length, config_name, dataset, size; a `by` tag not among them follows
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "run_id",
    "stratum",
    "quartile",
)
EVALUATE_HINT = "python -m ehrlong.evaluate run=runs/<config_name>/<timestamp>"
BENCHMARK_HINT = "python -m ehrlong.benchmark run=runs/<config_name>/<timestamp>"


@dataclass
class Args:
    experiment: str = TrackingConfig.experiment  # the MLflow experiment training logs into
    metric: str = (
        "auroc"  # auroc | auprc | brier (evaluate) | effective_length[_far] | bench_score (benchmark)
    )
    length: int | None = None  # metric=bench_score only (required there): the haystack length in tokens
    task: list[str] = field(default_factory=list)  # a,b; empty = every task some run has the metric for
    by: str = "context_length"  # the columns' tag: backbone | context_length | config_name | dataset | size
    out: str | None = None  # output folder; null = <runs root>/comparisons/<timestamp>
    tracking_uri: str | None = None  # null = $MLFLOW_TRACKING_URI, else <runs root>/mlflow.db (sqlite)
    mlflow: bool = True  # log the comparison as its own MLflow run (tag kind=comparison)


@dataclass
class RunResults:
    """One MLflow run with its tags and its eval/ (or bench/) metrics for the chosen metric."""

    run_id: str
    run_name: str
    start_time: int  # ms since the epoch, as MLflow stores it
    tags: dict[str, str]
    # (task, stratum, quartile) -> {"value": .., "ci_low": .., "ci_high": ..}; stratum "all", quartile None overall.
    # metric=effective_length: value None where the run was benchmarked on the task but has no effective length.
    values: dict[tuple[str, str, int | None], dict[str, float | None]]
    lengths: dict[str, list[int]] = field(default_factory=dict)  # bench metrics: task -> lengths tested
    row: str = ""  # table row label, set when rows are assigned
    column: str = ""  # value of the `by` tag


@dataclass
class Selection:
    """The runs a comparison uses, and what it left out and why."""

    runs: list[RunResults]  # one per (row, column): the newest
    rows: list[str]  # row labels, table order
    columns: list[str]  # `by` values, ascending
    tasks: list[str]
    ignored: dict[str, int]  # reason -> number of runs
    n_found: int  # runs in the experiment (active)


@dataclass
class Comparison:
    """What `compare` produced."""

    out: Path
    table: pl.DataFrame  # the CSV rows
    text: str  # the printed tables (also summary.txt)
    run_id: str | None  # the comparison's own MLflow run
    selection: Selection


def parse_metric_key(key: str) -> tuple[str, str, str, int | None, str] | None:
    """`eval/<task>/<metric>[/<stratum>/q<n>][/ci_low|/ci_high]` -> (task, metric, stratum, quartile, part).

    stratum is "all" and quartile None for the overall value; part is "value", "ci_low" or "ci_high".
    Any other name (val_loss, eval names of another shape) gives None. Task names hold no slash.
    """
    parts = key.split("/")
    if len(parts) < 3 or parts[0] != "eval":
        return None
    task, metric, rest = parts[1], parts[2], parts[3:]
    part = "value"
    if rest and rest[-1] in CI_BOUNDS:
        part = rest.pop()
    if not rest:
        return task, metric, "all", None, part
    if len(rest) == 2 and rest[1][:1] == "q" and rest[1][1:].isdigit():
        return task, metric, rest[0], int(rest[1][1:]), part
    return None


def parse_bench_key(key: str) -> tuple[str, str, int | None, str] | None:
    """`bench/<task>/...` (ehrlong.benchmark) -> (task, kind, length, part):

        bench/<task>/effective_length[_far]      (task, "effective_length[_far]", None, "value")
        bench/<task>/L<n>[/ci_low|/ci_high]      (task, "score", n, "value" | "ci_low" | "ci_high")
        bench/<task>/L<n>/d<depth>               (task, "depth", n, "value")

    Any other name gives None. Task names hold no slash.
    """
    parts = key.split("/")
    if len(parts) < 3 or parts[0] != "bench" or not parts[1]:
        return None
    task, rest = parts[1], parts[2:]
    if len(rest) == 1 and rest[0] in EFFECTIVE_METRICS:
        return task, rest[0], None, "value"
    if not (rest[0][:1] == "L" and rest[0][1:].isdigit()):
        return None
    length = int(rest[0][1:])
    if len(rest) == 1:
        return task, "score", length, "value"
    if len(rest) == 2 and rest[1] in CI_BOUNDS:
        return task, "score", length, rest[1]
    if len(rest) == 2 and rest[1][:1] == "d" and _number(rest[1][1:]) is not None:
        return task, "depth", length, "value"
    return None


def metric_label(metric: str, length: int | None = None) -> str:
    """The name of what is compared, in the CSV, file names and the comparison's run name: bench_score_L4096."""
    return f"{metric}_L{length}" if metric == BENCH_SCORE else metric


# ---------------------------------------------------------------------------------------------------
# Reading MLflow
# ---------------------------------------------------------------------------------------------------


def _client(uri: str):
    import mlflow

    if uri.startswith("sqlite:///"):
        # A missing sqlite file would be created (and migrated) by the client: say what is wrong instead.
        path = Path(uri[len("sqlite:///") :].split("?")[0])  # sqlite:////abs/path or sqlite:///relative/path
        if not path.is_file():
            raise ConfigError(
                f"no MLflow store at {path} (tracking URI {uri}): train a run first (python -m ehrlong.train "
                "config=NAME), or name the store with tracking_uri=URI, $MLFLOW_TRACKING_URI or $EHRLONG_RUNS."
            )
    return mlflow.MlflowClient(tracking_uri=uri)


def _experiment(client, name: str, uri: str):
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(
            f"experiment={name!r}: no such experiment in {uri}. Existing experiments: "
            f"{', '.join(names) or '(none)'}. Pass one of them as experiment=NAME "
            f"(training logs into tracking.experiment, default {TrackingConfig.experiment!r})."
        )
    return exp


def _search_all(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _results(run, metric: str, length: int | None = None) -> tuple[RunResults, bool]:
    """The run's values for `metric`, and whether it has any metric of its family (eval/ or bench/) at all."""
    values: dict[tuple[str, str, int | None], dict[str, float | None]] = defaultdict(dict)
    lengths: dict[str, set[int]] = defaultdict(set)
    any_of_family = far_known = False
    bench = metric in BENCH_METRICS
    for key, v in run.data.metrics.items():
        if not bench:
            parsed = parse_metric_key(key)
            if parsed is None:
                continue
            any_of_family = True
            task, m, stratum, quartile, part = parsed
            if m == metric and v is not None and not math.isnan(v):
                values[(task, stratum, quartile)][part] = float(v)
            continue
        parsed_bench = parse_bench_key(key)
        if parsed_bench is None:
            continue
        any_of_family = True
        if v is None or math.isnan(v):
            continue
        task, kind, n, part = parsed_bench
        far_known = far_known or kind == EFFECTIVE_LENGTH_FAR
        if kind == "score" and part == "value":
            lengths[task].add(n)
        if (metric in EFFECTIVE_METRICS and kind == metric) or (
            metric == BENCH_SCORE and kind == "score" and n == length
        ):
            values[(task, "all", None)][part] = float(v)
    # ehrlong.benchmark logs no effective_length when a task has none (shortest-length score not above
    # chance): a task with scores but no effective length is a result, "none", not a missing cell. Runs
    # benchmarked before effective_length_far existed logged none of it: for them it is missing, not none.
    if metric == EFFECTIVE_LENGTH or (metric == EFFECTIVE_LENGTH_FAR and far_known):
        for task in lengths:
            values[(task, "all", None)].setdefault("value", None)
    values = {k: v for k, v in values.items() if "value" in v}  # a CI bound without its value: not a result
    info = run.info
    res = RunResults(info.run_id, info.run_name or "", int(info.start_time or 0), dict(run.data.tags), values)
    # The last benchmark's own lengths (ehrlong.benchmark tags them); the metric keys also hold every
    # length an earlier benchmark of the run tested, so they are the fallback for runs without the tag.
    res.lengths = {
        t: [int(n) for n in tag.split(",")] if (tag := res.tags.get(f"bench/{t}/lengths")) else sorted(ns)
        for t, ns in lengths.items()
    }
    return res, any_of_family


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _natural(value: str) -> list:
    """Sort key that puts mamba_4k before mamba_16k."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", value)]


def _sorted_columns(values) -> list[str]:
    """Ascending: numerically when every value is a number (context lengths), model sizes smallest first,
    else naturally."""
    values = set(values)
    if all(_number(v) is not None for v in values):
        return sorted(values, key=lambda v: float(v))
    if values <= set(SIZE_ORDER):
        return sorted(values, key=SIZE_ORDER.index)
    return sorted(values, key=_natural)


def _tag_columns(by: str) -> tuple[str, ...]:
    """The tag columns of the CSV: the training tags, and the `by` tag when it is another one."""
    return RUN_TAGS if by in RUN_TAGS else (*RUN_TAGS, by)


def select(
    client,
    experiment: str,
    metric: str,
    by: str,
    tasks: Sequence[str],
    uri: str = "",
    length: int | None = None,
) -> Selection:
    """Find the runs to compare (see the module docstring); errors name what is missing and the fix."""
    exp = _experiment(client, experiment, uri)
    found = _search_all(client, exp.experiment_id)
    bench = metric in BENCH_METRICS
    family, hint = ("bench", BENCHMARK_HINT) if bench else ("eval", EVALUATE_HINT)
    key = (
        f"bench/<task>/{metric}"
        if metric in EFFECTIVE_METRICS
        else f"bench/<task>/L{length}"
        if bench
        else f"eval/<task>/{metric}"
    )
    label = metric_label(metric, length)
    ignored: dict[str, int] = defaultdict(int)
    candidates: list[RunResults] = []
    for run in found:
        if run.data.tags.get(KIND_TAG) == KIND_COMPARISON:
            ignored["comparison run(s) (tag kind=comparison)"] += 1
            continue
        res, any_of_family = _results(run, metric, length)
        if not any_of_family:
            verb = "benchmark" if bench else "evaluate"
            ignored[f"run(s) without any {family} metric ({verb} them: {hint})"] += 1
            continue
        candidates.append(res)

    available = sorted({t for r in candidates for (t, s, _) in r.values if s == "all"})
    if not available and metric == BENCH_SCORE and candidates:
        tested = sorted({n for r in candidates for ns in r.lengths.values() for n in ns})
        raise ConfigError(
            f"length={length}: no run in experiment {experiment!r} has a benchmark score at {length} tokens "
            f"(bench/<task>/L{length}). Lengths benchmarked: {', '.join(map(str, tested)) or '(none)'}; "
            f"pass one of them as length=N, or benchmark at this length: {hint} lengths={length}."
        )
    if not available:
        first = "Benchmark" if bench else "Evaluate"
        raise DataError(
            f"no run in experiment {experiment!r} ({uri}) has {key} metrics: "
            f"{len(found)} run(s) found, {sum(ignored.values())} of them without any {family} metric or "
            f"comparisons. {first} trained runs first: {hint} (it logs {key} into each run)."
        )
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise ConfigError(
            f"task={','.join(unknown)}: no run in experiment {experiment!r} has {label} for "
            f"{'it' if len(unknown) == 1 else 'them'}. Tasks with {label}: {', '.join(available)}. "
            f"Leave task= out to compare them all, or {'benchmark' if bench else 'evaluate'} the task first: "
            f"{hint} tasks=NAME."
        )
    chosen_tasks = list(dict.fromkeys(tasks)) if tasks else available
    present = {k for r in candidates for k in r.tags if not k.startswith("mlflow.") and k != KIND_TAG}
    if by not in present:
        listed = [k for k in RUN_TAGS if k in present] + sorted(present - set(RUN_TAGS), key=_natural)
        raise ConfigError(
            f"by={by!r}: no run with {family} metrics in experiment {experiment!r} has a {by!r} tag. Tags they "
            f"carry: {', '.join(listed) or '(none)'}; pass one of them, e.g. by=context_length (the default)."
        )

    runs = []
    for r in candidates:
        if not any((t, "all", None) in r.values for t in chosen_tasks):
            ignored[f"run(s) without {label} for the compared task(s)"] += 1
        elif not r.tags.get(by):
            ignored[f"run(s) without a {by!r} tag"] += 1
        else:
            r.column = r.tags[by]
            runs.append(r)
    if not runs:
        raise DataError(
            f"no run in experiment {experiment!r} has both {label} for {', '.join(chosen_tasks)} and a {by!r} tag "
            f"({'; '.join(f'{n} {why}' for why, n in ignored.items())}). Runs trained by python -m ehrlong.train "
            f"carry the tags {', '.join(RUN_TAGS)}."
        )

    # Rows: one per backbone. Several configs of one backbone in the same column (transformer_16k_yarn
    # and transformer_16k_sliding at 16,384) would hide each other, so each config that shares a cell
    # with another gets its own row, labelled by its config_name, in every column.
    several_datasets = by != "dataset" and len({r.tags.get("dataset", "") for r in runs}) > 1

    def base(r: RunResults) -> tuple[str, str]:
        name = r.tags.get("config_name") if by == "backbone" else r.tags.get("backbone")
        return (r.tags.get("dataset", "") if several_datasets else "", name or "(no tag)")

    configs = defaultdict(set)
    for r in runs:
        configs[(*base(r), r.column)].add(r.tags.get("config_name", ""))
    split = {(*key[:2], c) for key, cs in configs.items() if len(cs) > 1 for c in cs}
    for r in runs:
        dataset, label = base(r)
        if (dataset, label, r.tags.get("config_name", "")) in split:
            label = r.tags.get("config_name") or "(no config_name)"
        r.row = f"{label} ({dataset})" if dataset else label

    # The newest run (start time) of each cell wins: a config trained or evaluated again replaces the old one.
    newest: dict[tuple[str, str], RunResults] = {}
    for r in sorted(runs, key=lambda r: (r.start_time, r.run_id)):
        if (r.row, r.column) in newest:
            ignored[f"older run(s) of a config and {by} (the newest run of each is kept)"] += 1
        newest[(r.row, r.column)] = r
    kept = list(newest.values())
    rows = sorted({r.row for r in kept}, key=_natural)
    columns = _sorted_columns(r.column for r in kept)
    kept.sort(key=lambda r: (rows.index(r.row), columns.index(r.column)))
    return Selection(kept, rows, columns, chosen_tasks, dict(ignored), len(found))


# ---------------------------------------------------------------------------------------------------
# Table, text, plots
# ---------------------------------------------------------------------------------------------------


def _stratum_order(stratum: str) -> tuple[int, str]:
    order = ("all", *STRATA)
    return (order.index(stratum) if stratum in order else len(order), stratum)


def long_table(sel: Selection, metric: str, by: str = "context_length") -> pl.DataFrame:
    """Every value the comparison uses, one row per (task, run, stratum, quartile): the CSV. `metric` is
    the label (metric_label); an effective length of "none" is a row with an empty value."""
    tags = _tag_columns(by)
    records = []
    for r in sel.runs:
        for (task, stratum, quartile), v in r.values.items():
            if task not in sel.tasks:
                continue
            records.append(
                {
                    "task": task,
                    "row": r.row,
                    **{k: r.tags.get(k) for k in tags},
                    "metric": metric,
                    "value": v["value"],
                    "ci_low": v.get("ci_low"),
                    "ci_high": v.get("ci_high"),
                    "run_id": r.run_id,
                    "stratum": stratum,
                    "quartile": quartile,
                    "_order": (
                        sel.tasks.index(task),
                        _stratum_order(stratum),
                        quartile or 0,
                        sel.rows.index(r.row),
                        sel.columns.index(r.column),
                    ),
                }
            )
    records.sort(key=lambda d: d.pop("_order"))
    columns = (*CSV_COLUMNS[:2], *tags, *CSV_COLUMNS[2 + len(RUN_TAGS) :])
    schema = {c: pl.String for c in columns} | {
        "value": pl.Float64,
        "ci_low": pl.Float64,
        "ci_high": pl.Float64,
        "quartile": pl.Int64,
    }
    return pl.DataFrame(records, schema=schema) if records else pl.DataFrame(schema=schema)


def cell(value: float | None, lo: float | None, hi: float | None, metric: str) -> str:
    """0.812 [0.74, 0.88]; a Brier score keeps three decimals in its CI too (values near 0.07); an effective
    length in whole tokens, 16384 (render prints "none" where a run has none)."""
    if value is None:
        return "-"
    if metric in EFFECTIVE_METRICS:
        return f"{value:.0f}"
    digits = 3 if metric == "brier" else 2
    if lo is None or hi is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _heading(metric: str, length: int | None, by: str) -> str:
    if metric in EFFECTIVE_METRICS:
        far = " over the depths below 1 (the target not right before the query)" * (
            metric == EFFECTIVE_LENGTH_FAR
        )
        return (
            f"effective context length in tokens (ehrlong.benchmark, RULER's rule: the longest tested length up "
            f"to which the mean score{far} stays >= 85.6% of the run's own score at its shortest tested length; "
            f"higher is better); columns: {by}; none: benchmarked, but no effective length (the score at the "
            "shortest length is not above chance); -: no run, or the cell's newest run has no benchmark "
            "result for the task"
        )
    if metric == BENCH_SCORE:
        return (
            f"benchmark score at {length} tokens, mean over depths [95% CI] (ehrlong.benchmark; each task's "
            "own score: accuracy or recall for retrieval, nats for copy_forward and likelihood; higher is "
            f"better); columns: {by}; -: no run, or the cell's newest run has no score at {length} for the task"
        )
    better = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
    return (
        f"held-out {metric.upper()} [95% CI], k=all probes ({better} is better); columns: {by}; "
        "-: no run, or the cell's newest run has no value for the task"
    )


def render(sel: Selection, metric: str, by: str, experiment: str, uri: str, length: int | None = None) -> str:
    lines = [
        f"experiment {experiment!r} ({uri}): {sel.n_found} run(s), {len(sel.runs)} compared "
        f"(the newest run per row and {by})"
    ]
    for reason, n in sel.ignored.items():
        lines.append(f"  ignored {n} {reason}")
    lines.append("\n" + _heading(metric, length, by))
    by_cell = {(r.row, r.column): r for r in sel.runs}
    width = max(19 if metric not in EFFECTIVE_METRICS else 8, *(len(c) for c in sel.columns))
    row_w = max(12, *(len(r) for r in sel.rows))
    for task in sel.tasks:
        lines.append(f"\n{task}")
        lines.append(f"{'':{row_w}s}  " + "  ".join(f"{c:>{width}s}" for c in sel.columns))
        for row in sel.rows:
            cells = []
            for col in sel.columns:
                r = by_cell.get((row, col))
                v = r.values.get((task, "all", None)) if r else None
                if v is None:
                    cells.append("-")
                elif v["value"] is None:
                    cells.append("none")  # benchmarked on the task, no effective length logged
                else:
                    cells.append(cell(v["value"], v.get("ci_low"), v.get("ci_high"), metric))
            lines.append(f"{row:{row_w}s}  " + "  ".join(f"{c:>{width}s}" for c in cells))
        if metric in EFFECTIVE_METRICS:
            # The rule is relative to the shortest tested length: effective lengths compare over the same lengths.
            tested = {
                (r.row, r.column): tuple(r.lengths.get(task, ()))
                for r in sel.runs
                if (task, "all", None) in r.values
            }
            if len(set(tested.values())) == 1:
                lines.append(f"lengths tested: {', '.join(map(str, next(iter(tested.values()))))}")
            else:
                lines.append("lengths tested differ between runs (an effective length depends on them):")
                lines += [
                    f"  {row}, {by}={col}: {', '.join(map(str, ns))}" for (row, col), ns in tested.items()
                ]
    lines.append("\nruns compared:")
    for r in sel.runs:
        started = datetime.fromtimestamp(r.start_time / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        lines.append(
            f"  {r.row:{row_w}s}  {by}={r.column:<8s} {r.tags.get('config_name', '-')}  run {r.run_id} "
            f"({r.run_name}, started {started})"
        )
    return "\n".join(lines)


def _x_positions(columns: list[str], by: str) -> tuple[dict[str, float], bool]:
    """x of each column, and whether the axis is log2 (positive numbers: context lengths)."""
    nums = [_number(c) for c in columns]
    if all(n is not None and n > 0 for n in nums):
        return dict(zip(columns, nums, strict=True)), True
    return {c: float(i) for i, c in enumerate(columns)}, False


def _grid(n: int, cols: int = 4) -> tuple[int, int]:
    return math.ceil(n / min(n, cols)), min(n, cols)


def plot_overall(
    table: pl.DataFrame, sel: Selection, metric: str, by: str, path: Path, length: int | None = None
) -> Path:
    """Metric vs the `by` tag (log2 x for context lengths), one line per row, one panel per task. Effective
    lengths: log2 y, no CI, a run without one ("none") is not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    xs, log2 = _x_positions(sel.columns, by)
    overall = table.filter((pl.col("stratum") == "all") & pl.col("value").is_not_null())
    nr, nc = _grid(len(sel.tasks))
    fig, axes = plt.subplots(nr, nc, figsize=(3.6 * nc, 3.0 * nr + 0.6), squeeze=False)
    colors = plt.get_cmap("tab10")
    for i, task in enumerate(sel.tasks):
        ax = axes[i // nc][i % nc]
        for j, row in enumerate(sel.rows):
            part = overall.filter((pl.col("task") == task) & (pl.col("row") == row))
            if not part.height:
                continue
            # Rows side by side where they share an x (several configs at 16k): a shift of at most
            # x2^+-0.1 (log axis) or +-0.1 of a category.
            off = 0.2 * (j - (len(sel.rows) - 1) / 2) / max(len(sel.rows) - 1, 1)
            pts = sorted(
                (xs[c] * 2**off if log2 else xs[c] + off, v, lo, hi)
                for c, v, lo, hi in zip(part[by], part["value"], part["ci_low"], part["ci_high"], strict=True)
            )
            x = [p[0] for p in pts]
            y = [p[1] for p in pts]
            low = [p[1] - p[2] if p[2] is not None else 0.0 for p in pts]
            high = [p[3] - p[1] if p[3] is not None else 0.0 for p in pts]
            ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, color=colors(j % 10), label=row)
        if log2:
            ax.set_xscale("log", base=2)
        ax.set_xticks(list(xs.values()), list(xs), fontsize=7, rotation=30 if len(xs) > 4 else 0)
        ax.minorticks_off()
        ax.set_title(task, fontsize=9)
        ax.set_xlabel(by, fontsize=8)
        ax.grid(alpha=0.3)
        if metric in EFFECTIVE_METRICS and _all_positive(overall, task):
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))  # 16384, not 2^14
    for k in range(len(sel.tasks), nr * nc):
        axes[k // nc][k % nc].axis("off")
    ylabel = {
        EFFECTIVE_LENGTH: "effective length (tokens)",
        EFFECTIVE_LENGTH_FAR: "effective length without depth 1 (tokens)",
        BENCH_SCORE: f"score at {length} tokens (95% CI)",
    }.get(metric, f"held-out {metric.upper()} (95% CI)")
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # the first panel may miss a row: gather every row's handle once
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    ncol = max(1, min(len(labels), int(3.6 * nc // 2)))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.25 + 0.2 * math.ceil(len(labels) / ncol)) / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _all_positive(table: pl.DataFrame, task: str) -> bool:
    values = table.filter(pl.col("task") == task)["value"]
    return values.len() > 0 and bool((values > 0).all())


def plot_strata(table: pl.DataFrame, sel: Selection, metric: str, by: str, path: Path) -> Path | None:
    """Metric by stratum quartile, one panel per (stratum, task); None when no run logged strata.

    Quartile on x, one line per (row, column value): a hue per row, darker for longer context. Why this
    way round: the question is whether longer context helps more on some patients (Context Clues
    reports long-vs-short per quartile), and here that is the vertical gap between a row's light and dark
    lines at each quartile, with the quartile trend (are repetitive or irregular records harder?) along
    each line. A config trained at one length (transformer_16k_yarn) still draws a line; with context
    length on x it would be a column of four lone points.
    """
    strata = table.filter(pl.col("stratum") != "all")
    if not strata.height:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    names = sorted(set(strata["stratum"]), key=_stratum_order)
    width = max(9.0, 3.6 * len(sel.tasks))
    fig, axes = plt.subplots(
        len(names), len(sel.tasks), figsize=(width, 2.7 * len(names) + 1.0), squeeze=False
    )
    colors = plt.get_cmap("tab10")
    present = set(zip(strata["row"], strata[by], strict=True))
    lines = [(r.row, r.column) for r in sel.runs if (r.row, r.column) in present]  # row, then column order
    style = {}
    for i, (row, col) in enumerate(lines):
        of_row = [c for rr, c in lines if rr == row]
        shade = (of_row.index(col) + 1) / len(of_row)  # 1 = the row's longest context: full colour
        base = to_rgb(colors(sel.rows.index(row) % 10))
        color = tuple(1 - (1 - ch) * (0.3 + 0.7 * shade) for ch in base)
        dodge = (i - (len(lines) - 1) / 2) * 0.5 / max(len(lines), 2)  # CI bars side by side, within +-0.25
        label = (
            (f"{row}, L={col}" if by == "context_length" else f"{row}, {by}={col}")
            if len(sel.columns) > 1
            else row
        )
        style[(row, col)] = (color, dodge, label)
    drawn: dict[str, object] = {}
    for r, stratum in enumerate(names):
        for c, task in enumerate(sel.tasks):
            ax = axes[r][c]
            part = strata.filter((pl.col("task") == task) & (pl.col("stratum") == stratum))
            for row, col in lines:
                pts = part.filter((pl.col("row") == row) & (pl.col(by) == col)).sort("quartile")
                if not pts.height:
                    continue
                color, dodge, label = style[(row, col)]
                v = pts["value"].to_numpy()
                lo = [a - b if b is not None else 0.0 for a, b in zip(v, pts["ci_low"], strict=True)]
                hi = [b - a if b is not None else 0.0 for a, b in zip(v, pts["ci_high"], strict=True)]
                h = ax.errorbar(
                    pts["quartile"].to_numpy() + dodge,
                    v,
                    yerr=[lo, hi],
                    marker="o",
                    ms=3,
                    capsize=2,
                    color=color,
                    label=label,
                    lw=1.2,
                    elinewidth=0.8,
                )
                drawn.setdefault(label, h)
            ax.set_title(f"{task}\nby {stratum} quartile", fontsize=8)
            ax.set_xticks([1, 2, 3, 4], ["Q1", "Q2", "Q3", "Q4"], fontsize=7)
            ax.grid(alpha=0.3)
    ncol = max(1, min(len(drawn), int(width // 3)))
    fig.supylabel(f"held-out {metric.upper()} (95% CI)")
    fig.legend(list(drawn.values()), list(drawn), loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, (0.25 + 0.17 * math.ceil(len(drawn) / ncol)) / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


def _check_args(args: Args) -> None:
    if args.metric not in METRICS:
        raise ConfigError(
            f"metric={args.metric!r}: pass one of {', '.join(EVAL_METRICS)} (held-out results ehrlong.evaluate "
            f"logs) or {', '.join(BENCH_METRICS)} (long-context results ehrlong.benchmark logs; "
            f"{BENCH_SCORE} with length=N), e.g. metric=auroc."
        )
    if args.metric == BENCH_SCORE and args.length is None:
        raise ConfigError(
            f"metric={BENCH_SCORE} needs length=N: the haystack length in tokens whose score to compare "
            f"(bench/<task>/L<N>, one of the lengths= given to ehrlong.benchmark), e.g. length=4096."
        )
    if args.length is not None and args.metric != BENCH_SCORE:
        raise ConfigError(
            f"length={args.length}: only metric={BENCH_SCORE} takes a length (metric={args.metric!r} has one "
            "value per task); leave length= out, or pass metric=bench_score."
        )
    if args.length is not None and args.length <= 0:
        raise ConfigError(f"length={args.length}: a haystack length in tokens is positive, e.g. length=4096.")
    # by= is checked against the tags the runs carry (select): training adds tags over time (size).
    bad = [t for t in args.task if not t or "/" in t]
    if bad:
        raise ConfigError(
            f"task={bad[0]!r}: task names hold no slash and are not empty; give them as task=a,b."
        )


def _out_dir(args: Args) -> Path:
    from ehrlong.paths import runs_root

    if args.out:
        out = Path(args.out)
        # Replacing a folder is only safe when it is an earlier comparison (out=. would delete the repo).
        if out.exists() and any(out.iterdir()) and not (out / "comparison.csv").is_file():
            raise ConfigError(
                f"out={out}: the folder exists and is not an earlier comparison (no comparison.csv); "
                "name a new or empty folder, or leave out= unset for runs/comparisons/<timestamp>."
            )
        return out
    base = runs_root() / "comparisons" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists() or out.with_name(out.name + ".partial").exists():  # two comparisons in one second
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def compare(args: Args) -> Comparison:
    from ehrlong.paths import runs_root
    from ehrlong.tracking import tracking_uri

    _check_args(args)
    out = _out_dir(args)  # before reading MLflow: a bad out= is found without waiting for the store
    uri = tracking_uri(args.tracking_uri, runs_root())
    client = _client(uri)
    sel = select(client, args.experiment, args.metric, args.by, args.task, uri, args.length)
    label = metric_label(args.metric, args.length)
    table = long_table(sel, label, args.by)
    text = render(sel, args.metric, args.by, args.experiment, uri, args.length)

    with atomic_folder(out) as tmp:  # all or nothing: a failed comparison leaves no half-written folder
        table.write_csv(tmp / "comparison.csv")
        plots = [
            plot_overall(table, sel, args.metric, args.by, tmp / f"{label}_vs_{args.by}.png", args.length)
        ]
        if args.metric in BENCH_METRICS:
            text += "\n\nbenchmark metrics have no stratum quartiles: no stratified plot"
        elif (
            strata := plot_strata(table, sel, args.metric, args.by, tmp / f"{args.metric}_by_quartile.png")
        ) is None:
            text += "\n\nno stratum quartile metrics logged: no stratified plot (re-run ehrlong.evaluate)"
        else:
            plots.append(strata)
        (tmp / "summary.txt").write_text(text + "\n")
    files = [out / "comparison.csv", out / "summary.txt", *(out / p.name for p in plots)]

    print(text)
    run_id = _log_run(client, sel, args, files) if args.mlflow else None
    print(f"\nwrote {out}" + (f"; MLflow run {run_id} (experiment {args.experiment!r})" if run_id else ""))
    return Comparison(out, table, text, run_id, sel)


def _log_run(client, sel: Selection, args: Args, files: list[Path]) -> str:
    """The comparison as its own run in the same experiment; deleted again if logging fails half-way."""
    from mlflow.entities import Param

    exp = client.get_experiment_by_name(args.experiment)
    run = client.create_run(
        exp.experiment_id,
        run_name=f"compare-{metric_label(args.metric, args.length)}",
        tags={KIND_TAG: KIND_COMPARISON, "metric": args.metric, "by": args.by},
    )
    run_id = run.info.run_id
    try:
        params = {
            "metric": args.metric,
            "by": args.by,
            "tasks": ",".join(sel.tasks)[:6000],  # MLflow's param value limit
            "n_runs": str(len(sel.runs)),
        }
        if args.length is not None:
            params["length"] = str(args.length)
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        for f in files:
            client.log_artifact(run_id, str(f))
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        try:
            client.delete_run(run_id)
        except Exception:  # the store is what failed: nothing more to clean up from here
            pass
        raise
    return run_id


def main(argv: Sequence[str]) -> int:
    compare(parse(Args, argv, prog=PROG))
    return 0


if __name__ == "__main__":
    run_cli(main)
