"""Forward+backward throughput and peak memory per backbone and context length, side by side.

    python -m ehrlong.throughput backbones=mamba,transformer lengths=1024,4096,16384 size=tiny
    python -m ehrlong.throughput backbones=mamba,hf_mamba lengths=1024 rounds=1

Each (backbone, length) runs in its own process so its peak RSS is its own; rounds alternate the
configurations so machine drift hits all of them alike (research/proto_mamba_scan.md: absolute times on
a shared 2-core VM drift by up to 1.5x, interleaved ratios do not). `hf_mamba` is transformers'
MambaForCausalLM at the same shape: the outside baseline whose CPU fallback the chunked scan replaces.
Prints a table (median step time, tokens/s, peak RSS) and writes a PNG of cost vs context length.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ehrlong.config import parse
from ehrlong.errors import run_cli

EXTRA_BASELINES = ("hf_mamba",)


@dataclass
class Args:
    backbones: list[str] = field(default_factory=lambda: ["mamba", "transformer"])
    lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    size: str = "tiny"
    vocab_size: int = 8192
    batch_size: int = 1
    rounds: int = 3  # alternating rounds; each runs one short warm-up step, then `steps` timed steps
    steps: int = 2  # timed steps per process; the fastest counts (the first long step also pays page faults)
    threads: int = 0  # torch threads; 0 = torch's default (all cores)
    out: str = "throughput"  # folder for the PNG and the JSON of all measurements
    overrides: list[str] = field(default_factory=list)  # extra TrainConfig key=value for the backbones


def _build(name: str, size: str, length: int, vocab: int, overrides: Sequence[str]):
    import torch

    from ehrlong.backbones import build_backbone
    from ehrlong.config import TrainConfig

    if name == "hf_mamba":
        from transformers import MambaConfig, MambaForCausalLM

        from ehrlong.backbones.mamba import SIZES

        s = SIZES[size]
        model = MambaForCausalLM(
            MambaConfig(
                vocab_size=vocab, hidden_size=s.d_model, num_hidden_layers=s.n_layers, state_size=16, expand=2
            )
        )
        return lambda tokens: torch.nn.functional.cross_entropy(
            model(input_ids=tokens).logits[0, :-1], tokens[0, 1:]
        ), model

    from ehrlong.module import EHRLitModule

    cfg = parse(TrainConfig, [f"backbone={name}", f"size={size}", f"context_length={length}", *overrides])
    module = EHRLitModule(build_backbone(cfg, vocab), vocab, cfg.optim, 1, length, cfg.model.tie_embeddings)

    def loss(tokens):
        from ehrlong.data.batching import EventBatch

        mask = torch.ones_like(tokens, dtype=torch.bool)
        times = torch.arange(tokens.shape[1], dtype=torch.float32).expand_as(tokens)
        losses, _ = module.token_losses(EventBatch(tokens, times, mask))
        return losses.mean()

    return loss, module


def measure_one(
    name: str, size: str, length: int, vocab: int, batch: int, steps: int, threads: int, overrides
) -> dict:
    """Runs inside the child process: one warm-up step, then `steps` timed forward+backward steps."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    loss_fn, model = _build(name, size, length, vocab, overrides)
    warm = torch.randint(1, vocab, (batch, min(length, 256)))
    loss_fn(warm).backward()
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        tokens = torch.randint(1, vocab, (batch, length))
        t0 = time.perf_counter()
        loss_fn(tokens).backward()
        times.append(time.perf_counter() - t0)
    return {
        "backbone": name,
        "length": length,
        "seconds": min(times),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _child(args: Args, name: str, length: int) -> dict:
    payload = json.dumps(
        [name, args.size, length, args.vocab_size, args.batch_size, args.steps, args.threads, args.overrides]
    )
    code = f"import json,sys; from ehrlong.throughput import measure_one; print(json.dumps(measure_one(*json.loads({payload!r}))))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"backbone": name, "length": length, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["backbone"] for r in rows}):
        pts = sorted((r["length"], r["seconds"], r["peak_rss_gb"]) for r in rows if r["backbone"] == name)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    for ax, ylabel in ((ax1, "seconds per forward+backward"), (ax2, "peak RSS (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("cost vs context length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: Args) -> list[dict]:
    configs = [(b, n) for n in args.lengths for b in args.backbones]
    results: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for name, length in configs:
            res = _child(args, name, length)
            results[(name, length)].append(res)
            shown = f"{res['seconds']:.2f} s" if "seconds" in res else f"error {res['error']}"
            print(f"round {r + 1}/{args.rounds} {name:12s} L={length:6d}: {shown}", flush=True)
    rows = []
    for (name, length), runs in results.items():
        ok = [x for x in runs if "seconds" in x]
        if not ok:
            continue
        sec = statistics.median(x["seconds"] for x in ok)
        rows.append(
            {
                "backbone": name,
                "length": length,
                "seconds": sec,
                "tokens_per_s": args.batch_size * length / sec,
                "peak_rss_gb": max(x["peak_rss_gb"] for x in ok),
                "parameters": ok[0]["parameters"],
                "runs": [x["seconds"] for x in ok],
            }
        )
    print(f"\n{'backbone':12s} {'L':>6s} {'params':>8s} {'s/step':>8s} {'tokens/s':>9s} {'peak GB':>8s}")
    for r in rows:
        print(
            f"{r['backbone']:12s} {r['length']:6d} {r['parameters'] / 1e6:7.2f}M {r['seconds']:8.2f} "
            f"{r['tokens_per_s']:9.0f} {r['peak_rss_gb']:8.2f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "throughput.png")
    print(f"\nwrote {out / 'throughput.png'} and {out / 'throughput.json'}")
    return rows


def main(argv: Sequence[str]) -> int:
    run(parse(Args, argv, prog="python -m ehrlong.throughput"))
    return 0


if __name__ == "__main__":
    run_cli(main)
