"""Incremental prediction for recurrent backbones: keep each subject's state, feed only new events.

A recurrent backbone (Mamba) summarises a timeline in a fixed-size state, so when M events arrive for a
subject whose state covers N events, the updated prediction costs O(M), not O(N + M) as a from-scratch
forward does (issue 6). `MambaBackbone.prefill` advances the state; the probe `ehrlong.evaluate` saved
turns the last hidden state into a probability, exactly as `ehrlong.predict` does from scratch.

What "equal to from scratch" means: the state carries the whole history. While the history fits the
run's context length L this is the from-scratch prediction (tests/test_incremental_predict.py); past L a
from-scratch prediction truncates to the last L tokens and the state does not, so the two differ by
design. The state is the recurrent model's natural way to see all of it.

    python -m ehrlong.incremental run=RUN_DIR [history=16384] [new_events=100] [task=NAME]

times one update of `new_events` events after a `history`-token timeline of a real subject of the run's
dataset, against the from-scratch forward over the same tokens, and checks they agree.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ehrlong.config import parse
from ehrlong.errors import ConfigError, DataError, run_cli

PROG = "python -m ehrlong.incremental"


@dataclass
class TimelineState:
    """One subject's recurrent state after `n_tokens` tokens, and its last hidden state [D]."""

    state: list
    n_tokens: int
    last_hidden: torch.Tensor


class IncrementalPredictor:
    """start(tokens) -> TimelineState; update(state, new_tokens) -> TimelineState; predict(state) -> probs."""

    def __init__(self, run, probes: dict):
        if not hasattr(run.module.backbone, "prefill"):
            raise ConfigError(
                f"run {run.run_dir} has backbone {run.cfg.backbone!r}, which keeps no recurrent state; "
                "incremental prediction needs backbone=mamba. Predict from scratch with python -m ehrlong.predict."
            )
        self.backbone = run.module.backbone.eval()
        self.probes = probes

    def _advance(self, tokens: np.ndarray, state: list | None, n_before: int) -> TimelineState:
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError(f"give a non-empty 1-D array of token ids; got shape {tokens.shape}")
        device = next(self.backbone.parameters()).device
        hidden, state = self.backbone.prefill(torch.as_tensor(tokens, device=device)[None], state)
        return TimelineState(state, n_before + len(tokens), hidden[0, -1].float().cpu())

    def start(self, tokens: np.ndarray) -> TimelineState:
        return self._advance(tokens, None, 0)

    def update(self, timeline: TimelineState, new_tokens: np.ndarray) -> TimelineState:
        return self._advance(new_tokens, timeline.state, timeline.n_tokens)

    def predict(self, timeline: TimelineState) -> dict[str, float]:
        x = timeline.last_hidden.numpy()[None].astype(np.float32)
        return {task: float(probe.predict_proba(x)[0]) for task, probe in self.probes.items()}


# ---------------------------------------------------------------------------------------------------
# Measurement CLI
# ---------------------------------------------------------------------------------------------------


@dataclass
class Args:
    run: str | None = None
    data: str | None = None  # null = the run's dataset
    task: str | None = None  # a probe of the run (null = the first one; none saved = hidden states only)
    history: int = 16_384  # tokens of history the state summarises
    new_events: int = 100  # events that arrive
    repeats: int = 3


def _subject_with(store, n_tokens: int) -> int:
    lengths = np.diff(np.asarray(store.offsets))
    long = np.flatnonzero(lengths >= n_tokens)
    if len(long) == 0:
        raise DataError(
            f"no subject of {store.root} has {n_tokens:,} tokens (longest: {int(lengths.max()):,}); lower history=."
        )
    return int(long[0])


def measure(args: Args) -> dict:
    from ehrlong.evaluation.probes import load_probe
    from ehrlong.evaluation.representations import data_root, load_run, store_for_run

    if args.run is None:
        raise ConfigError(f"give a run: {PROG} run=runs/mamba_16k/<timestamp>")
    run = load_run(args.run)
    store = store_for_run(run, data_root(args.data, [run]))
    probes = {}
    folder = run.run_dir / "probes"
    saved = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    if args.task and args.task not in saved:
        raise ConfigError(
            f"task={args.task}: no probe {folder / args.task}.json; saved probes: {', '.join(saved) or 'none'}. "
            f"python -m ehrlong.evaluate run={run.run_dir} saves one per task it evaluates (or leave task= "
            "out to time hidden states only)."
        )
    names = [args.task] if args.task else saved[:1]
    for name in names:
        probes[name] = load_probe(folder / f"{name}.json")[0]
    predictor = IncrementalPredictor(run, probes)
    # The first `history` tokens of a long-enough subject, then the tokens of its next `new_events` events
    # (event-code tokens; the time-gap tokens among them come along).
    first_code = store.tokenizer.first_code_id
    budget = args.history + 50 * args.new_events  # room for the new events' tokens
    i = _subject_with(store, budget)
    start = int(store.offsets[i])
    tokens = np.asarray(store.tokens[start : start + budget], dtype=np.int64)
    is_event = tokens[args.history :] >= first_code
    n_new = int(np.searchsorted(np.cumsum(is_event), args.new_events)) + 1
    history, new = tokens[: args.history], tokens[args.history : args.history + n_new]

    timings = {"update": [], "scratch": []}
    with torch.no_grad():
        base = predictor.start(history)
        for _ in range(args.repeats):
            t = time.perf_counter()
            updated = predictor.update(base, new)
            timings["update"].append(time.perf_counter() - t)
            t = time.perf_counter()
            scratch = predictor.start(np.concatenate([history, new]))
            timings["scratch"].append(time.perf_counter() - t)
    diff = float((updated.last_hidden - scratch.last_hidden).abs().max())
    out = {
        "history_tokens": len(history),
        "new_events": args.new_events,
        "new_tokens": len(new),
        "update_s": statistics.median(timings["update"]),
        "scratch_s": statistics.median(timings["scratch"]),
        "max_abs_hidden_diff": diff,
        "predictions_update": predictor.predict(updated),
        "predictions_scratch": predictor.predict(scratch),
        "threads": torch.get_num_threads(),
    }
    return out


def main(argv: Sequence[str]) -> int:
    r = measure(parse(Args, argv, prog=PROG))
    print(
        f"{r['new_events']} new events ({r['new_tokens']} tokens) after {r['history_tokens']:,} tokens of history, "
        f"{r['threads']} threads, median of repeats:\n"
        f"  incremental update  {r['update_s'] * 1000:9.1f} ms\n"
        f"  from scratch        {r['scratch_s'] * 1000:9.1f} ms  ({r['scratch_s'] / r['update_s']:.0f}x)\n"
        f"  max |hidden difference| {r['max_abs_hidden_diff']:.2e}; predictions "
        f"update {r['predictions_update']} vs scratch {r['predictions_scratch']}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
