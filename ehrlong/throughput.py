"""Forward+backward throughput and peak memory per backbone and context length, side by side.

    python -m ehrlong.throughput backbones=mamba,transformer lengths=1024,4096,16384 size=tiny
    python -m ehrlong.throughput backbones=mamba,hf_mamba lengths=1024 rounds=1
    python -m ehrlong.throughput backbones=transformer,transformer_16k_sliding,transformer_16k_lambda lengths=16384
    python -m ehrlong.throughput backbones=hmt_mamba_64k lengths=16384,65536

An entry of `backbones` is a registered backbone, `hf_mamba`, or a preset in configs/ (run with the
preset's settings; at its own context length when `lengths` is empty). For every transformer entry the
attention function alone (forward+backward on random q, k, v of the model's shape, as the layers call it)
is timed too, so sparse patterns and dense attention compare op to op and step to step in one run.

Each (backbone, length) runs in its own process so its peak RSS is its own; rounds alternate the
configurations so machine drift hits all of them alike (research/proto_mamba_scan.md: absolute times on
a shared 2-core VM drift by up to 1.5x, interleaved ratios do not). `hf_mamba` is transformers'
MambaForCausalLM at the same shape: the outside baseline whose CPU fallback the chunked scan replaces.
Prints a table (median step time, tokens/s, peak RSS) and writes a PNG of cost vs context length.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ehrlong.config import PRESETS_DIR, TrainConfig, list_presets, parse
from ehrlong.errors import ConfigError, run_cli

EXTRA_BASELINES = ("hf_mamba",)


@dataclass
class Args:
    backbones: list[str] = field(default_factory=lambda: ["mamba", "transformer"])
    lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])  # empty: each preset's own
    size: str = "tiny"
    vocab_size: int = 8192
    batch_size: int = 1
    rounds: int = 3  # alternating rounds; each runs one short warm-up step, then `steps` timed steps
    steps: int = 2  # timed steps per process; the fastest counts (the first long step also pays page faults)
    threads: int = 0  # torch threads; 0 = torch's default (all cores)
    out: str = "throughput"  # folder for the PNG and the JSON of all measurements
    overrides: list[str] = field(default_factory=list)  # extra TrainConfig key=value for the backbones
    # glibc only: MALLOC_MMAP_THRESHOLD_ for the measured processes (null = glibc's dynamic default).
    # glibc raises its mmap threshold as large blocks are freed, so freed per-segment buffers of a long HMT
    # pass stay in the heap and the peak RSS grows with the number of segments although the live tensors
    # do not (hmt_16k, tiny: 1.20 -> 2.70 GB from 16k to 64k tokens by default, 0.71 -> 0.78 GB at 131072,
    # but the 64k step took 98.5 s instead of 62.7 s: many more page faults).
    malloc_mmap_threshold: int | None = None


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

    base = [f"config={name}"] if name in _preset_names() else [f"backbone={name}"]
    argv = [*base, f"size={size}", f"context_length={length}", *overrides]
    cfg = parse(TrainConfig, argv, presets_dir=PRESETS_DIR)
    module = EHRLitModule(build_backbone(cfg, vocab), vocab, cfg.optim, 1, length, cfg.model.tie_embeddings)

    def loss(tokens):
        from ehrlong.data.batching import EventBatch

        mask = torch.ones_like(tokens, dtype=torch.bool)
        times = torch.arange(tokens.shape[1], dtype=torch.float32).expand_as(tokens)
        losses, _ = module.token_losses(EventBatch(tokens, times, mask))
        return losses.mean()

    return loss, module


def _preset_names() -> set[str]:
    return {name for name, _ in list_presets(PRESETS_DIR)}


def _preset_length(name: str) -> int:
    from ehrlong.config import TrainConfig

    return parse(TrainConfig, [f"config={name}"], presets_dir=PRESETS_DIR).context_length


def time_attention_op(module, batch: int, length: int, steps: int) -> float | None:
    """Fastest forward+backward of the first layer's attention function alone, as the layer calls it."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    layers = getattr(module.backbone, "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers is not None else None
    if attn is None:
        return None  # not a transformer
    config = attn.config
    fn = ALL_ATTENTION_FUNCTIONS[config._attn_implementation]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    best = float("inf")
    for _ in range(steps + 1):  # the first call warms up
        q = torch.randn(batch, heads, length, attn.head_dim, requires_grad=True)
        k, v = (torch.randn(batch, kv_heads, length, attn.head_dim, requires_grad=True) for _ in range(2))
        t0 = time.perf_counter()
        out, _ = fn(attn, q, k, v, None, scaling=attn.scaling, dropout=0.0)
        out.sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


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
    op = time_attention_op(model, batch, length, steps) if name != "hf_mamba" else None
    return {
        "backbone": name,
        "length": length,
        "seconds": min(times),
        "attention_op_seconds": op,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _child(args: Args, name: str, length: int) -> dict:
    payload = json.dumps(
        [name, args.size, length, args.vocab_size, args.batch_size, args.steps, args.threads, args.overrides]
    )
    code = f"import json,sys; from ehrlong.throughput import measure_one; print(json.dumps(measure_one(*json.loads({payload!r}))))"
    env = dict(os.environ)
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"backbone": name, "length": length, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _registered() -> list[str]:
    from ehrlong.backbones import BACKBONES

    return list(BACKBONES)


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


def check_args(args: Args) -> None:
    """Everything about the command line that would otherwise fail inside every measuring child (where
    the error is one line of a child's stderr and the command would still exit 0)."""
    from ehrlong.backbones.mamba import SIZES

    known = {"hf_mamba", *_registered(), *_preset_names()}
    if not args.backbones:
        raise ConfigError(f"backbones= is empty; give one or more of {', '.join(sorted(known))}.")
    for name in args.backbones:
        if name not in known:
            raise ConfigError(f"backbones: unknown entry {name!r}. Valid: {', '.join(sorted(known))}.")
    if not args.lengths and not all(b in _preset_names() for b in args.backbones):
        raise ConfigError(
            "lengths=[] runs each entry at its own context length, which only presets have; give lengths=..."
        )
    if args.size not in SIZES:
        raise ConfigError(f"size={args.size!r}: valid sizes are {', '.join(SIZES)} (tiny trains on a CPU).")
    bad = [n for n in args.lengths if n < 2]
    if bad:
        raise ConfigError(
            f"lengths={bad[0]}: a context length is a positive number of tokens (>= 2: a next-token loss "
            "needs two), e.g. lengths=1024,4096."
        )
    for key in ("vocab_size", "batch_size", "rounds", "steps"):
        if getattr(args, key) < 1:
            raise ConfigError(f"{key}={getattr(args, key)}: must be >= 1.")
    if args.threads < 0:
        raise ConfigError(f"threads={args.threads}: 0 (torch's default) or a positive thread count.")
    # The overrides go to TrainConfig in each child: parse them here once so a typo fails before any child.
    for name in args.backbones:
        if name == "hf_mamba":
            continue
        base = [f"config={name}"] if name in _preset_names() else [f"backbone={name}"]
        parse(
            TrainConfig,
            [*base, f"size={args.size}", *args.overrides],
            presets_dir=PRESETS_DIR,
            prog="overrides",
        )


def run(args: Args) -> list[dict]:
    check_args(args)
    configs = [(b, n) for b in args.backbones for n in (args.lengths or [_preset_length(b)])]
    configs.sort(key=lambda c: c[1])
    results: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for name, length in configs:
            res = _child(args, name, length)
            results[(name, length)].append(res)
            shown = f"{res['seconds']:.2f} s" if "seconds" in res else f"error {res['error']}"
            print(f"round {r + 1}/{args.rounds} {name:12s} L={length:6d}: {shown}", flush=True)
    failed = {c: rs[-1]["error"] for c, rs in results.items() if not any("seconds" in r for r in rs)}
    if failed and len(failed) == len(results):
        # Nothing measured: exit non-zero with the children's errors (the arguments were checked above, so
        # this is the machine, e.g. out of memory, or a bug: the child's last stderr line says which).
        for (name, length), error in failed.items():
            print(f"{name} L={length}: {' '.join(error)}", file=sys.stderr)
        print("throughput: no configuration could be measured; nothing written.", file=sys.stderr)
        sys.exit(1)
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
                "attention_op_seconds": (
                    statistics.median(x["attention_op_seconds"] for x in ok)
                    if ok[0].get("attention_op_seconds") is not None
                    else None
                ),
            }
        )
    width = max(12, *(len(r["backbone"]) for r in rows)) if rows else 12
    print(
        f"\n{'backbone':{width}s} {'L':>6s} {'params':>8s} {'s/step':>8s} {'tokens/s':>9s} {'peak GB':>8s} "
        f"{'attn op s':>9s}"
    )
    for r in rows:
        op = f"{r['attention_op_seconds']:9.3f}" if r["attention_op_seconds"] is not None else f"{'-':>9s}"
        print(
            f"{r['backbone']:{width}s} {r['length']:6d} {r['parameters'] / 1e6:7.2f}M {r['seconds']:8.2f} "
            f"{r['tokens_per_s']:9.0f} {r['peak_rss_gb']:8.2f} {op}"
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
