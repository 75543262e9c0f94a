"""python -m ehrlong.benchmark run=RUN_DIR suite=ruler lengths=1024,4096,16384 depths=0,0.25,0.5,0.75,1

Long-context benchmarks of a trained run on its own dataset (issue 7; ehrlong.benchmarks):

    haystacks: windows of the run's token store (split=held_out), concatenated when a timeline is short
      -> probe fine-tune for the retrieval tasks (needle variants, variable tracking, frequent codes):
         finetune_steps on samples at lengths <= the run's context length, from the finetune_split
      -> samples x lengths x depths per task, scored by exact retrieval (retrieval tasks, the fine-tuned
         copy) or zero-shot (copy_forward, likelihood, the run as trained)
      -> per (task, length, depth): mean score, n, 95% CI; per task: effective length (RULER's rule,
         relative to the model's own shortest-length score) and a length x depth heatmap

Writes results.{parquet,csv}, effective_length.csv, per_sample.parquet, heatmap_<task>.png, heatmaps.png (all tasks),
finetune.json + finetuned.ckpt (the fine-tuned weights; the run's model.ckpt is never touched) and
summary.txt into `out` (default <runs root>/benchmarks/<timestamp>), all at once or nothing; logs
bench/<task>/L<length>, bench/<task>/effective_length and the files to the run's MLflow run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import polars as pl

from ehrlong.config import MISSING, parse
from ehrlong.errors import ConfigError, run_cli

PROG = "python -m ehrlong.benchmark"


@dataclass
class Args:
    run: str = MISSING  # a run directory written by ehrlong.train
    suite: str = "ruler"  # ruler | needle | ehr | all (ehrlong.benchmarks.SUITES)
    tasks: list[str] = field(default_factory=list)  # task names; when given, replaces the suite
    lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])  # sample lengths in tokens
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # target depths
    samples: int = 50  # per task x length x depth (RULER uses 500 per task and length)
    finetune_steps: int = 200  # probe fine-tune of the retrieval tasks; 0 = score them zero-shot
    finetune_lr: float = 1e-3
    finetune_tokens: int = 32_768  # tokens per fine-tune step (samples = this // sample length)
    # Longest fine-tune sample; null = the run's context length. A shorter cap (cheap on a CPU) teaches
    # retrieval on short samples only, and the test lengths then measure how far it carries.
    finetune_max_length: int | None = None
    seed: int = 0  # same seed: same samples, same fine-tune, same scores
    split: str = "held_out"  # subjects whose timelines make the test haystacks
    finetune_split: str = "train"  # subjects whose timelines make the fine-tune haystacks
    data: str | None = None  # MEDS root or dataset name; null = the run's own dataset
    out: str | None = None  # results folder; null = <runs root>/benchmarks/<timestamp>
    tokens_per_batch: int | None = (
        None  # scoring batches (one length each); null = 4,096 on CPU, 65,536 on GPU
    )
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    mlflow: bool = True  # log metrics and files to the run's MLflow run
    progress: bool = True


def check_args(args: Args):
    """Everything that can be checked before loading the run; returns the tasks."""
    from ehrlong.benchmarks import resolve_tasks
    from ehrlong.data.meds import SPLITS

    tasks = resolve_tasks(args.suite, args.tasks)
    if not args.lengths:
        raise ConfigError("lengths= is empty: give at least one length in tokens, e.g. lengths=1024,4096.")
    if not args.depths:
        raise ConfigError("depths= is empty: give at least one depth in [0, 1], e.g. depths=0,0.5,1.")
    for d in args.depths:
        if not (0.0 <= d <= 1.0):
            raise ConfigError(
                f"depths={d}: a depth is the share of the haystack before the target, in [0, 1] "
                "(0 = start, 1 = right before the query); e.g. depths=0,0.25,0.5,0.75,1."
            )
    for n in args.lengths:
        short = [t for t in tasks if n < t.min_length()]
        if short:
            need = max(t.min_length() for t in short)
            raise ConfigError(
                f"lengths={n}: too short for task {short[0].name} (and {len(short) - 1} other(s)), which "
                f"plants {short[0].n_inserted()} tokens and needs a haystack at least as long: use lengths "
                f">= {need}, or leave those tasks out (tasks=...)."
            )
    if len(set(args.lengths)) != len(args.lengths) or len(set(args.depths)) != len(args.depths):
        raise ConfigError(f"lengths={args.lengths} depths={args.depths}: each value once, please.")
    if args.samples < 1:
        raise ConfigError(
            f"samples={args.samples}: at least 1 sample per task, length and depth (50+ for CIs)."
        )
    if args.finetune_steps < 0:
        raise ConfigError(f"finetune_steps={args.finetune_steps}: >= 0 (0 scores retrieval zero-shot).")
    if args.finetune_lr <= 0 or args.finetune_tokens < 1 or (args.tokens_per_batch or 1) < 1:
        raise ConfigError(
            f"finetune_lr={args.finetune_lr}, finetune_tokens={args.finetune_tokens}, "
            f"tokens_per_batch={args.tokens_per_batch}: each must be > 0."
        )
    if args.finetune_max_length is not None:
        trainable = [t for t in tasks if t.trainable]
        need = max((t.min_length() for t in trainable), default=1)
        if args.finetune_max_length < need:
            raise ConfigError(
                f"finetune_max_length={args.finetune_max_length}: the retrieval tasks asked for "
                f"({', '.join(t.name for t in trainable)}) need samples of >= {need} tokens; use "
                f"finetune_max_length >= {need}, or null for the run's context length."
            )
    for key in ("split", "finetune_split"):
        if getattr(args, key) not in SPLITS:
            raise ConfigError(f"{key}={getattr(args, key)!r}: valid splits are {', '.join(SPLITS)}.")
    return tasks


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r}: use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: no CUDA device here; use device=cpu or device=auto.")
    return dev


def _log_mlflow(
    run,
    per_length: pl.DataFrame,
    results: pl.DataFrame,
    effective: pl.DataFrame,
    out: Path,
    files: list[Path],
) -> bool:
    """Metrics into the run's own MLflow run, beside its training and evaluation metrics:
    bench/<task>/L<length> (mean over depths) with /ci_low and /ci_high, bench/<task>/L<length>/d<depth>
    and bench/<task>/effective_length[_far] (when defined); the tag bench/<task>/lengths (the lengths
    tested, comma-separated); the files as artifacts under benchmark/<out>."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    from ehrlong.tracking import tracking_uri

    id_file = run.run_dir / "mlflow_run_id"
    if not id_file.is_file() or not run.cfg.tracking.enabled:
        return False
    client = mlflow.MlflowClient(tracking_uri(run.cfg.tracking.tracking_uri, run.run_dir.parent.parent))
    run_id = id_file.read_text().strip()
    now = int(time.time() * 1000)
    metrics = []
    for task, length, score, lo, hi in per_length.select(
        "task", "length", "score", "ci_low", "ci_high"
    ).iter_rows():
        for suffix, value in (("", score), ("/ci_low", lo), ("/ci_high", hi)):
            if value is not None:
                metrics.append(Metric(f"bench/{task}/L{length}{suffix}", float(value), now, 0))
    for task, length, depth, score in results.select("task", "length", "depth", "score").iter_rows():
        metrics.append(Metric(f"bench/{task}/L{length}/d{depth:g}", float(score), now, 0))
    far = "effective_length_far" in effective.columns
    for row in effective.iter_rows(named=True):
        for key in ("effective_length", "effective_length_far") if far else ("effective_length",):
            if row[key] is not None:
                metrics.append(Metric(f"bench/{row['task']}/{key}", float(row[key]), now, 0))
    metrics = [m for m in metrics if not math.isnan(m.value)]
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics per batch
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    # The lengths this call tested, per task. Metrics of earlier calls at other lengths stay in the run,
    # so the metric keys alone cannot say which lengths an effective length was found over (compare).
    tested = per_length.group_by("task").agg(pl.col("length").unique().sort())
    tags = [RunTag(f"bench/{task}/lengths", ",".join(map(str, ns))) for task, ns in tested.iter_rows()]
    client.log_batch(run_id, tags=tags)
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path=f"benchmark/{out.name}")
    return True


def _save_finetuned(tmp: Path, tuned, run, trainable, args: Args, max_length: int) -> None:
    """The fine-tuned weights (never the run's own model.ckpt) and the fine-tune's loss log."""
    import torch

    torch.save(
        {
            "state_dict": tuned.module.state_dict(),
            "base_run": str(run.run_dir),
            "tokenizer_hash": run.tokenizer_hash,
            "tasks": [t.name for t in trainable],
            "steps": args.finetune_steps,
            "seed": args.seed,
        },
        tmp / "finetuned.ckpt",
    )
    (tmp / "finetune.json").write_text(
        json.dumps(
            {
                "steps": args.finetune_steps,
                "lr": args.finetune_lr,
                "tokens_per_step": args.finetune_tokens,
                "max_length": max_length,
                "split": args.finetune_split,
                "seconds": tuned.seconds,
                "loss": tuned.losses,
                "length": tuned.lengths,
                "task": tuned.tasks,
            },
            indent=1,
        )
    )


def benchmark(args: Args) -> Path:
    import torch
    from tqdm.auto import tqdm

    from ehrlong.benchmarks import Haystack, ProbeTokens, aggregate, make_samples, score_samples
    from ehrlong.benchmarks.finetune import finetune, finetune_lengths
    from ehrlong.benchmarks.report import by_length, effective_table, far_rows, heatmap, heatmap_grid, summary
    from ehrlong.evaluation.representations import (
        data_root,
        default_tokens_per_batch,
        load_run,
        store_for_run,
    )
    from ehrlong.paths import runs_root
    from ehrlong.safety import atomic_folder

    tasks = check_args(args)
    device = _device(args.device)
    run = load_run(args.run)
    probes = ProbeTokens.of(run.tokenizer)
    trainable = [t for t in tasks if t.trainable]
    finetune_length = min(args.finetune_max_length or run.context_length, run.context_length)
    if trainable and args.finetune_steps > 0:
        too_long = [t for t in trainable if t.min_length() > run.context_length]
        if too_long:
            raise ConfigError(
                f"task {too_long[0].name} needs samples of >= {too_long[0].min_length()} tokens, longer than "
                f"the run's context length {run.context_length}, so it cannot be probe fine-tuned within "
                "the training length: leave it out (tasks=...) or use finetune_steps=0."
            )
    root = data_root(args.data, [run])
    store = store_for_run(run, root)
    hay = Haystack(store, args.split)
    t0 = time.perf_counter()
    print(
        f"benchmarking {run.cfg.config_name} ({run.run_dir}; {run.cfg.backbone}, context {run.context_length:,}) "
        f"on {root} [{args.split}: {len(hay.subjects):,} subjects, {hay.n_tokens:,} tokens] on {device}: "
        f"tasks {', '.join(t.name for t in tasks)}; lengths {args.lengths}; depths {args.depths}; "
        f"{args.samples} samples per cell"
    )
    torch.manual_seed(args.seed)
    base = run.module.to(device).eval()
    tuned = None
    if trainable and args.finetune_steps > 0:
        lo, hi = finetune_lengths(trainable, finetune_length)
        print(
            f"  probe fine-tune: {args.finetune_steps} steps on {', '.join(t.name for t in trainable)}, "
            f"lengths {lo:,}-{hi:,}, {args.finetune_split} haystacks"
        )
        tuned = finetune(
            base,
            trainable,
            Haystack(store, args.finetune_split),
            finetune_length,
            args.finetune_steps,
            args.finetune_tokens,
            args.finetune_lr,
            args.seed,
            args.progress,
        )
        print(f"  fine-tune loss {tuned.losses[0]:.3f} -> {tuned.losses[-1]:.3f} in {tuned.seconds:.1f} s")

    rows = []
    cells = [(t, n, d) for t in tasks for n in args.lengths for d in args.depths]
    for task, length, depth in tqdm(cells, desc="benchmark", unit="cell", disable=not args.progress):
        samples = make_samples(task, hay, length, depth, args.samples, args.seed)
        model = tuned.module if (task.trainable and tuned is not None) else base
        for r in score_samples(model, samples, args.tokens_per_batch or default_tokens_per_batch(device)):
            r["finetuned"] = model is not base
            rows.append(r)
    chance = {t.name: t.chance(probes) for t in tasks}
    name = pl.lit(run.cfg.config_name).alias("run")
    results = aggregate(rows, chance, args.seed).select(name, pl.all())
    per_length = by_length(rows, chance, args.seed).select(name, pl.all())
    far = far_rows(rows)  # the same rule without the target right before the query (report.FAR_DEPTH)
    effective = effective_table(per_length, by_length(far, chance, args.seed) if far else None)
    seconds = time.perf_counter() - t0

    n_concat = sum(r["n_subjects"] > 1 for r in rows)
    header = [
        f"benchmark of {run.cfg.config_name} ({run.run_dir}), context length {run.context_length:,}, "
        f"backbone {run.cfg.backbone}, seed {args.seed}, {seconds:.0f} s",
        f"haystacks: {args.split} split of {root}; {n_concat:,} of {len(rows):,} samples needed several "
        "subjects' timelines (concatenated with [EOS] between them, see mean_subjects in results.csv)",
        "retrieval tasks: "
        + (
            f"after a {args.finetune_steps}-step probe fine-tune (finetuned.ckpt; lengths <= "
            f"{finetune_length:,})"
            if tuned is not None
            else "zero-shot (no probe fine-tune)"
        )
        + "; scored by arg max over the candidate tokens (score_vocab: over the whole vocabulary)",
    ]
    beyond = [n for n in args.lengths if n > run.context_length]
    if beyond:
        header.append(f"lengths beyond the training context: {', '.join(f'{n:,}' for n in beyond)}")
    text = summary(results, per_length, effective, header) + "\n"

    out = (
        Path(args.out) if args.out else runs_root() / "benchmarks" / datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    with atomic_folder(out) as tmp:  # all or nothing: a failed benchmark leaves no half-written folder
        results.write_parquet(tmp / "results.parquet")
        results.write_csv(tmp / "results.csv")
        per_length.write_csv(tmp / "by_length.csv")
        effective.write_csv(tmp / "effective_length.csv")
        pl.from_dicts(rows, infer_schema_length=None).write_parquet(tmp / "per_sample.parquet")
        eff = {r["task"]: r for r in effective.iter_rows(named=True)}
        plots = [
            heatmap(
                results,
                t.name,
                tmp / f"heatmap_{t.name}.png",
                eff[t.name]["effective_length"],
                eff[t.name].get("effective_length_far"),
            )
            for t in tasks
        ]
        if len(tasks) > 1:
            plots.append(
                heatmap_grid(
                    results,
                    effective,
                    tmp / "heatmaps.png",
                    f"{run.cfg.config_name} (context {run.context_length:,}), seed {args.seed}",
                )
            )
        if tuned is not None:
            _save_finetuned(tmp, tuned, run, trainable, args, finetune_length)
        (tmp / "summary.txt").write_text(text)
    files = [out / p.name for p in plots] + [
        out / n for n in ("results.csv", "effective_length.csv", "summary.txt")
    ]
    if args.mlflow and _log_mlflow(run, per_length, results, effective, out, files):
        text += f"logged bench/ metrics to the run's MLflow run ({(run.run_dir / 'mlflow_run_id').read_text().strip()})\n"
    print(f"\n{text}wrote {out}")
    return out


def main(argv: Sequence[str]) -> int:
    benchmark(parse(Args, argv, prog=PROG))
    return 0


if __name__ == "__main__":
    run_cli(main)
