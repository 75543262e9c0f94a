"""Long-context benchmark adapters on the EHR vocabulary (issue 7): RULER-style probes and EHR-specific
zero-shot probes over real patient timelines, scored on any model that gives next-token logits.

    from ehrlong.benchmarks import TASKS, SUITES, Haystack, make_samples, score_samples

    hay = Haystack(store, split="held_out")
    samples = make_samples(TASKS["needle_single"], hay, length=4096, depth=0.5, n=50, seed=0)
    rows = score_samples(model, samples)         # model: EHRLitModule, logits_at(...) or a callable

Modules: haystack (windows of a token store, concatenation when short), tasks (one generator + scorer
per task), models (the logits protocol, oracle and blind baselines), scoring (batches, CIs), finetune
(the short probe fine-tune of the retrieval tasks), report (effective length, heatmaps, summary).
The command line is `python -m ehrlong.benchmark`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ehrlong.benchmarks.haystack import Haystack, depth_index, insert
from ehrlong.benchmarks.models import Blind, LogitsModel, Oracle, RunModel, as_logits_model
from ehrlong.benchmarks.report import THRESHOLD, effective_length
from ehrlong.benchmarks.scoring import aggregate, score_samples
from ehrlong.benchmarks.tasks import (
    CopyForward,
    FrequentCodes,
    Likelihood,
    Needle,
    ProbeTokens,
    Sample,
    Task,
    VariableTracking,
    sample_rngs,
)
from ehrlong.errors import ConfigError

# name -> task (DESIGN.md §7.2: an explicit dict; unknown names list the valid ones).
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Needle("single"),
        Needle("multikey"),
        Needle("multivalue"),
        Needle("multiquery"),
        VariableTracking(),  # RULER's default: 1 chain, 4 hops
        VariableTracking(name="variable_tracking_distractors", chains=4),
        FrequentCodes(),
        CopyForward(),
        Likelihood(),
    )
}

# RULER's categories that carry over to codes: retrieval (NIAH variants), multi-hop tracing, aggregation.
_NEEDLES = ["needle_single", "needle_multikey", "needle_multivalue", "needle_multiquery"]
SUITES: dict[str, list[str]] = {
    "ruler": [*_NEEDLES, "variable_tracking", "frequent_codes"],
    "needle": list(_NEEDLES),
    "ehr": ["copy_forward", "likelihood"],
    "all": list(TASKS),
}


def resolve_tasks(suite: str = "ruler", tasks: Sequence[str] = ()) -> list[Task]:
    """`tasks` when given (names in TASKS), else the tasks of `suite` (a name in SUITES)."""
    if tasks:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ConfigError(
                f"unknown benchmark task {unknown[0]!r} (tasks={','.join(tasks)}). Valid tasks: "
                f"{', '.join(TASKS)}; or pick a suite: suite={'|'.join(SUITES)}."
            )
        names = list(dict.fromkeys(tasks))
    else:
        if suite not in SUITES:
            raise ConfigError(
                f"unknown benchmark suite {suite!r}. Valid suites: "
                + "; ".join(f"{k} ({', '.join(v)})" for k, v in SUITES.items())
                + "."
            )
        names = SUITES[suite]
    return [TASKS[n] for n in names]


def make_samples(task: Task, hay: Haystack, length: int, depth: float, n: int, seed: int = 0) -> list[Sample]:
    """`n` samples of one (task, length, depth) cell; the same for the same seed, whatever else is run."""
    out = []
    for i in range(n):
        rng_hay, rng = sample_rngs(seed, task.name, length, depth, i)
        out.append(task.sample(hay, length, depth, rng_hay, rng, index=i))
    return out


__all__ = [
    "TASKS",
    "SUITES",
    "THRESHOLD",
    "Blind",
    "CopyForward",
    "FrequentCodes",
    "Haystack",
    "Likelihood",
    "LogitsModel",
    "Needle",
    "Oracle",
    "ProbeTokens",
    "RunModel",
    "Sample",
    "Task",
    "VariableTracking",
    "aggregate",
    "as_logits_model",
    "depth_index",
    "effective_length",
    "insert",
    "make_samples",
    "resolve_tasks",
    "score_samples",
]
