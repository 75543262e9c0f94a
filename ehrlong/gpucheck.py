"""What only a GPU can check: mamba-ssm kernel parity with the CPU scan, and base-size speed in bf16.

    python -m ehrlong.gpucheck out=gpucheck.json

1. Kernel parity: `mamba_ssm`'s fused `selective_scan_fn` against ehrlong's chunked scan on the same
   inputs (float32): max relative error of outputs and of every input gradient.
2. Throughput: forward+backward tokens/s and peak GPU memory of `mamba_16k` and `transformer_4k` at
   `size=base` under bf16 autocast, one sequence per step.

Without CUDA it says so and exits 0 (tests/test_gpucheck.py is marked `gpu`). Record the printed figures
in README.md ("GPU figures") when a GPU run is made.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ehrlong.config import PRESETS_DIR, TrainConfig, list_presets, parse
from ehrlong.errors import ConfigError, run_cli


@dataclass
class Args:
    out: str = "gpucheck.json"
    steps: int = 5
    vocab_size: int = 40000
    presets: list[str] | None = None  # default: mamba_16k, transformer_4k


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def kernel_parity(batch: int = 2, d: int = 256, n: int = 16, length: int = 2048) -> dict[str, float]:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    from ehrlong.backbones.scan import selective_scan

    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    inputs = {
        "u": rand(batch, d, length),
        "delta": rand(batch, d, length) * 0.5,
        "A": -torch.exp(rand(d, n) * 0.5),
        "B": rand(batch, n, length),
        "C": rand(batch, n, length),
        "D": rand(d),
        "z": rand(batch, d, length),
        "delta_bias": rand(d) * 0.1,
    }
    grads = {}
    outs = {}
    for name, fn in (("cuda", selective_scan_fn), ("torch", selective_scan)):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y = fn(**leaves, delta_softplus=True)
        y.backward(torch.ones_like(y) / y.numel() ** 0.5)
        outs[name] = y.detach()
        grads[name] = {k: v.grad for k, v in leaves.items()}
    report = {"y": rel_err(outs["torch"], outs["cuda"])}
    report.update({f"d{k}": rel_err(grads["torch"][k], grads["cuda"][k]) for k in inputs})
    return report


def throughput(preset: str, vocab: int, steps: int) -> dict:
    from ehrlong.backbones import build_backbone
    from ehrlong.data.batching import EventBatch
    from ehrlong.module import EHRLitModule

    cfg = parse(TrainConfig, [f"config={preset}", "size=base"], presets_dir=PRESETS_DIR)
    L = cfg.context_length
    module = EHRLitModule(build_backbone(cfg, vocab), vocab, cfg.optim, 1, L).cuda()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    tokens = torch.randint(1, vocab, (1, L), device="cuda")
    batch = EventBatch(
        tokens,
        torch.arange(L, device="cuda", dtype=torch.float32)[None],
        torch.ones_like(tokens, dtype=torch.bool),
    )
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses, _ = module.token_losses(batch)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i:  # the first step includes kernel autotuning and allocation
            times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    return {
        "preset": preset,
        "context_length": L,
        "parameters": sum(p.numel() for p in module.parameters()),
        "seconds_per_step": sec,
        "tokens_per_s": L / sec,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def check_args(args: Args) -> None:
    """What can be wrong with the command line, checked on any machine (not only once a GPU is there)."""
    names = [name for name, _ in list_presets(PRESETS_DIR)]
    for preset in args.presets or []:
        if preset not in names:
            raise ConfigError(
                f"presets: no preset named {preset!r}. Valid presets: {', '.join(names)} "
                "(python -m ehrlong.train config=list describes them)."
            )
    if args.steps < 1:
        raise ConfigError(f"steps={args.steps}: timed steps per preset, must be >= 1 (default 5).")
    if args.vocab_size < 2:
        raise ConfigError(f"vocab_size={args.vocab_size}: must be >= 2 (default 40000).")


def main(argv: Sequence[str]) -> int:
    args = parse(Args, argv, prog="python -m ehrlong.gpucheck")
    check_args(args)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (this script is for a GPU machine).")
        return 0
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        report["kernel_parity_rel_err"] = kernel_parity()
    except ImportError as e:
        report["kernel_parity_rel_err"] = f"mamba-ssm not importable ({e}); install the [cuda] extra"
    report["throughput_bf16_base"] = [
        throughput(p, args.vocab_size, args.steps) for p in (args.presets or ["mamba_16k", "transformer_4k"])
    ]
    print(json.dumps(report, indent=2))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    run_cli(main)
