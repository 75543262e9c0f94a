"""python -m ehrlong.evaluation.signalcheck run=RUN short=48: has a pretrained run learned the synthetic
tasks at all, and does it use the early history to do so?

When a probe (ehrlong.evaluate) finds nothing at the prediction-time token, either the model never
learned that the outcome depends on the signal, or it learned it and does not hold it at that token.
This tells the two apart on the synthetic cohort (ehrlong.data.synthetic), whose outcome codes are
recorded at the first timestamp after the prediction time. For each subject of a split it takes the
probability the model itself gives each task's outcome code, summed over the positions that predict
that timestamp, from the prediction-time token up to the first outcome code there (later positions
have seen an outcome). It reads this once with the run's own window (the last L tokens up to those
positions) and once with only the last `short` tokens at or before the prediction time.

The AUROC of that score for the subject's latent level (metadata/subject_dials.parquet) says whether the
language model uses the task's signal. Long minus short, on the same bootstrap resamples, says whether
it uses the part of the history that only the long window holds. The early tasks' signal lies in the
first visits, so a run that has learned them shows a margin; the recent task's signal sits in the last
draw, so it shows none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from ehrlong.config import parse
from ehrlong.data.store import to_us
from ehrlong.data.synthetic import TASKS
from ehrlong.errors import ConfigError, run_cli
from ehrlong.evaluation.metrics import bootstrap, paired_difference
from ehrlong.evaluation.representations import data_root, load_run, store_for_run
from ehrlong.safety import atomic_write

PROG = "python -m ehrlong.evaluation.signalcheck"


@dataclass
class Args:
    run: str = ""  # a run directory written by ehrlong.train on a synthetic cohort
    short: int = 48  # tokens at or before the prediction time in the short read
    split: str = "held_out"
    n_boot: int = 1000
    out: str | None = None  # optional parquet of the per-subject scores
    progress: bool = True


@torch.no_grad()
def outcome_scores(
    module: torch.nn.Module,
    tokens: np.ndarray,
    times_us: np.ndarray,
    prediction_us: int,
    outcome_ids: np.ndarray,
    length: int,
    short: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Summed P(outcome id) per outcome id, over the positions that predict the first timestamp after
    `prediction_us`, up to its first outcome id: (with the last `length` tokens, with `short` tokens at
    or before the prediction time). None when nothing follows the prediction time."""
    end_pred = int(np.searchsorted(times_us, prediction_us, side="right"))
    if end_pred == 0 or end_pred >= len(tokens):
        return None
    end = int(np.searchsorted(times_us, times_us[end_pred], side="right"))
    hits = np.flatnonzero(np.isin(tokens[end_pred:end], outcome_ids))
    if len(hits):
        end = end_pred + int(hits[0]) + 1  # the first outcome code is scored, nothing after it
    scores = []
    for start in (max(0, end - length), max(0, end_pred - short)):
        x = torch.as_tensor(np.array(tokens[start:end], dtype=np.int64))[None]
        t = torch.as_tensor(np.array(times_us[start:end], dtype=np.int64))[None]
        hidden = module.backbone(tokens=x, times=t, mask=torch.ones_like(x, dtype=torch.bool))
        # position i predicts token i + 1: the positions from the prediction-time token to end - 2
        logits = module.head(hidden[0, end_pred - start - 1 : end - start - 1])
        scores.append(torch.softmax(logits.float(), -1)[:, outcome_ids].sum(0).numpy())
    return scores[0], scores[1]


def score_split(args: Args) -> tuple[pl.DataFrame, int]:
    """Per subject of the split: latent level (bool per task) and the two scores per task."""
    run = load_run(args.run)
    root = data_root(None, [run])
    dials_path = root / "metadata" / "subject_dials.parquet"
    if not dials_path.is_file():
        raise ConfigError(
            f"run={args.run}: {dials_path} is missing, so {root} is not a synthetic cohort. {PROG} needs "
            "the latent levels only `python -m ehrlong.data synth` writes: evaluate a run trained on the embedded "
            "synthetic cohort (data.root unset) or on a root that command wrote."
        )
    store = store_for_run(run, root)
    missing = [t.outcome_code for t in TASKS.values() if t.outcome_code not in run.tokenizer.token_to_id]
    if missing:
        raise ConfigError(
            f"run={args.run}: the outcome code(s) {', '.join(missing)} are not in its vocabulary "
            f"({run.run_dir / 'tokenizer.json'}); the cohort has too few outcomes. Generate more subjects."
        )
    outcome_ids = np.array([run.tokenizer.token_to_id[t.outcome_code] for t in TASKS.values()])
    dials = pl.read_parquet(dials_path).filter(pl.col("split") == args.split)
    rows, skipped = [], 0
    for row in tqdm(
        dials.iter_rows(named=True), total=len(dials), desc="signalcheck", disable=not args.progress
    ):
        s = store.subject_slice(store.subject_index(row["subject_id"]))
        got = outcome_scores(
            run.module,
            store.tokens[s],
            store.times_us[s],
            to_us(row["prediction_time"]),
            outcome_ids,
            run.context_length,
            args.short,
        )
        if got is None:
            skipped += 1
            continue
        for j, (name, task) in enumerate(TASKS.items()):
            rows.append(
                {
                    "subject_id": row["subject_id"],
                    "task": name,
                    "level": row[f"{name}_level"] != task.levels[0],
                }
                | {"long": float(got[0][j]), "short": float(got[1][j])}
            )
    return pl.DataFrame(rows), skipped


def fmt(value: float, low: float, high: float, sign: str) -> str:
    """`value [low, high]`, or n/a where the split holds one class only (AUROC is undefined)."""
    if value != value:
        return "n/a (one class)"
    return f"{value:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def main(argv: Sequence[str]) -> int:
    args = parse(Args, argv, prog=PROG)
    if not args.run:
        raise ConfigError(f"{PROG}: pass run=RUN_DIR (a run trained on a synthetic cohort).")
    if args.short < 1:
        raise ConfigError(f"short={args.short}: the short read needs at least 1 token.")
    scores, skipped = score_split(args)
    if args.out:  # atomic: a kill leaves the old file or none, never half of one
        atomic_write(Path(args.out), scores.write_parquet)
    n = scores["subject_id"].n_unique()
    print(f"{args.run}: P(outcome code) from the model itself, {n} {args.split} subjects", end="")
    print(f" ({skipped} with nothing after the prediction time left out)" if skipped else "")
    print(
        f"AUROC for the latent level [95% CI]; long = the run's window, short = the last {args.short} tokens"
    )
    print(f"{'task':22s} {'signal':7s} {'long':>22s} {'short':>22s} {'long - short':>26s}  n (level > first)")
    for name, task in TASKS.items():
        t = scores.filter(pl.col("task") == name)
        y, ids = t["level"].to_numpy(), t["subject_id"].to_numpy()
        ci = {
            k: bootstrap(y, t[k].to_numpy(), ids, "auroc", n_boot=args.n_boot).row(0, named=True)
            for k in ("long", "short")
        }
        d = paired_difference(y, t["long"].to_numpy(), t["short"].to_numpy(), ids, n_boot=args.n_boot)
        d = d.row(0, named=True)
        cells = [fmt(c["value"], c["ci_low"], c["ci_high"], "") for c in ci.values()]
        diff = fmt(d["difference"], d["ci_low"], d["ci_high"], "+")
        n = f"{len(y)} ({int(y.sum())})"
        print(f"{name:22s} {task.signal:7s} {cells[0]:>22s} {cells[1]:>22s} {diff:>26s}  {n}")
    return 0


if __name__ == "__main__":
    run_cli(main)
