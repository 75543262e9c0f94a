"""Time the tokenizer against the straightforward per-subject loop, and check they agree.

    python -m ehrlong.data benchmark data=DIR [tokenizer=cehr] [rounds=5]

Each round runs both implementations, each in a fresh subprocess so its peak RSS is its own, in
alternating order (the machine is shared and noisy: interleaving spreads the noise over both; see
research/proto_tokenize_aces.md §2). Time is measured in the subprocess from reading the parquet to the
written store (imports excluded). Prints per-variant median / min / max seconds, events/s, peak RSS,
stage medians and the speed ratio, then checks that the two stores are identical.
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ehrlong.config import MISSING
from ehrlong.data.meds import data_files
from ehrlong.data.store import ARRAYS, IMPLEMENTATIONS, META_FILE, TOKENIZER_FILE, build_store
from ehrlong.errors import ConfigError
from ehrlong.tokenizer import recipe_path

FAST, LOOP = "vectorised", "loop"


@dataclass
class Args:
    data: str = MISSING  # a MEDS root
    tokenizer: str = "cehr"  # recipe name or path
    rounds: int = 5  # runs per variant; the median is reported
    out: str | None = None  # keep the two stores here (default: a temporary folder, removed)


@dataclass
class Timing:
    seconds: float  # read -> files, in-process
    stages: dict[str, float]
    peak_rss_mb: float
    events: int
    tokens: int


def run_variant(implementation: str, data: str, tokenizer: str, out: str) -> Timing:
    """One build in a fresh Python process; its timing comes back as a JSON line on stdout."""
    cmd = [sys.executable, "-m", "ehrlong.data.benchmark", "--worker", implementation, data, tokenizer, out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark worker {implementation} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return Timing(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _worker(implementation: str, data: str, tokenizer: str, out: str) -> None:
    result = build_store(data, tokenizer, out, implementation=implementation, progress=False)
    counts = result.meta["counts"]
    timing = Timing(
        seconds=sum(result.seconds.values()),
        stages=result.seconds,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        events=counts["events_read"],
        tokens=counts["tokens"],
    )
    print(json.dumps(timing.__dict__))


def store_differences(a: Path, b: Path) -> list[str]:
    """What differs between two token stores (empty when identical): arrays byte for byte, tokenizer, report."""
    diffs = []
    for name in ARRAYS:
        x, y = np.load(a / f"{name}.npy"), np.load(b / f"{name}.npy")
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            diffs.append(f"{name}.npy ({x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)})")
    tok_a, tok_b = (json.loads((p / TOKENIZER_FILE).read_text()) for p in (a, b))
    if tok_a["hash"] != tok_b["hash"]:
        diffs.append(f"tokenizer hash ({tok_a['hash'][:12]} vs {tok_b['hash'][:12]})")
    rep_a, rep_b = (json.loads((p / META_FILE).read_text())["encode_report"] for p in (a, b))
    diffs += [f"encode report field {k}" for k in rep_a if rep_a[k] != rep_b.get(k)]
    return diffs


def _median_stages(timings: list[Timing]) -> dict[str, float]:
    return {k: statistics.median(t.stages[k] for t in timings) for k in timings[0].stages}


def report(results: dict[str, list[Timing]]) -> str:
    header = f"{'variant':11s} {'median s':>9s} {'min':>7s} {'max':>7s} {'events/s':>12s} {'peak RSS':>10s}"
    lines = [f"{header}   stages (median s)"]
    for name, timings in results.items():
        secs = [t.seconds for t in timings]
        med = statistics.median(secs)
        rss = max(t.peak_rss_mb for t in timings)
        stages = ", ".join(f"{k} {v:.3f}" for k, v in _median_stages(timings).items())
        lines.append(
            f"{name:11s} {med:9.3f} {min(secs):7.3f} {max(secs):7.3f} {timings[0].events / med:12,.0f} "
            f"{rss:8.0f} MB   {stages}"
        )
    fast, loop = _median_stages(results[FAST]), _median_stages(results[LOOP])
    median = {name: statistics.median(t.seconds for t in timings) for name, timings in results.items()}
    total = median[LOOP] / median[FAST]
    per_stage = ", ".join(f"{k} {loop[k] / fast[k]:.1f}x" for k in ("fit", "encode"))
    lines.append(f"speed-up loop/vectorised (medians): {total:.1f}x read->files ({per_stage})")
    return "\n".join(lines)


def run(args: Args) -> int:
    if args.rounds < 1:
        raise ConfigError(f"rounds={args.rounds}: must be >= 1 (5 or more for a stable median).")
    data_files(args.data)  # a bad data= fails here, with the reader's message, not inside a worker
    recipe_path(args.tokenizer)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ehrlong-benchmark-"))
    results: dict[str, list[Timing]] = {FAST: [], LOOP: []}
    try:
        for r in tqdm(range(args.rounds), desc="benchmark", unit="round"):
            order = list(IMPLEMENTATIONS) if r % 2 == 0 else list(reversed(IMPLEMENTATIONS))
            for name in order:
                results[name].append(run_variant(name, str(args.data), args.tokenizer, str(work / name)))
        diffs = store_differences(work / FAST, work / LOOP)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    events, tokens = results[FAST][0].events, results[FAST][0].tokens
    print(
        f"benchmark: {args.data} ({events:,} events -> {tokens:,} tokens), recipe {args.tokenizer!r}, "
        f"{args.rounds} rounds, each variant in its own process, alternating"
    )
    print(report(results))
    if diffs:
        print(f"stores DIFFER: {', '.join(diffs)}")
        return 1
    print(
        "stores identical: tokens, times_us, offsets, subject_ids, splits byte for byte; tokenizer hash; report"
    )
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(*sys.argv[2:6])
