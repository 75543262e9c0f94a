"""HMT wrapper (ehrlong/backbones/hmt.py): the per-segment layout against a hand-written reference, the times
given to inserted slots, the recall window, truncated BPTT, checkpointing, config errors and memory bounds.
The backbone contract itself (shapes, causality, padding, gradients) runs in test_backbone_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from ehrlong.backbones import build_backbone
from ehrlong.backbones.hmt import HMTBackbone
from ehrlong.config import TrainConfig, parse
from ehrlong.errors import ConfigError

VOCAB = 50
L, K, N = 8, 3, 2  # segment length, sensory tokens, memory window of the tiny test model
J = L // 2  # summary span


def make(*extra: str, backbone: str = "transformer", seed: int = 0) -> HMTBackbone:
    args = ["backbone=hmt", f"hmt.backbone={backbone}", "model.d_model=32", "model.n_layers=2"]
    args += [f"hmt.segment_length={L}", f"hmt.sensory={K}", f"hmt.memory_window={N}", "hmt.bptt_segments=0"]
    torch.manual_seed(seed)
    return build_backbone(parse(TrainConfig, [*args, *extra]), VOCAB).eval()


def reference(bb: HMTBackbone, tokens: torch.Tensor) -> torch.Tensor:
    """HMT written out segment by segment from the module's parameters (He et al. 2024, §3)."""
    emb = bb.embed(tokens)
    batch, d = emb.shape[0], bb.d_model
    segments = [emb[:, s : s + L] for s in range(0, tokens.shape[1], L)]
    prompt = bb.summary_prompt.expand(batch, 1, d)
    outputs, memories = [], []
    for n, h in enumerate(segments):
        if n == 0:
            p, sensory = bb.initial_memory.expand(batch, 1, d), h[:, :0]
        else:
            prev = segments[n - 1]
            summary = bb.inner(embeddings=torch.cat([prompt, prev[:, L - J :], prompt], 1))[:, -1]
            m = torch.stack(memories[-N:], 1)  # the last N memories only
            scores = torch.einsum("bd,bmd->bm", bb.recall_query(summary), bb.recall_key(m))
            p = torch.einsum("bm,bmd->bd", torch.softmax(scores / math.sqrt(d), -1), m).unsqueeze(1)
            sensory = prev[:, L - K :]
        out = bb.inner(embeddings=torch.cat([p, sensory, h, p], 1))
        outputs.append(out[:, 1 + sensory.shape[1] : -1])
        memories.append(out[:, -1])
    return torch.cat(outputs, 1)


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_matches_hand_written_reference(backbone):
    # 4 segments, the last one short; with N=2 segment 3 recalls over M_1, M_2 but not M_0.
    bb = make(backbone=backbone)
    assert (
        type(bb.inner).__name__ == {"transformer": "TransformerBackbone", "mamba": "MambaBackbone"}[backbone]
    )
    tokens = torch.randint(1, VOCAB, (2, 3 * L + 3))
    times = torch.cumsum(torch.rand(2, 3 * L + 3), 1)
    with torch.no_grad():
        out = bb(tokens=tokens, times=times)
        torch.testing.assert_close(out, reference(bb, tokens), atol=1e-5, rtol=1e-5)
        # The reference is not blind to the window: recalling over all memories changes segment 3.
        bb.memory_window = 3
        wider = bb(tokens=tokens, times=times)
    torch.testing.assert_close(wider[:, : 3 * L], out[:, : 3 * L])
    assert not torch.allclose(wider[:, 3 * L :], out[:, 3 * L :])


def test_inserted_slots_take_neighbouring_times():
    # A time-aware inner backbone (rope.position=time) must see ordered times: each memory / prompt slot gets
    # the time of the nearest real token after it (leading slot) or before it (trailing slot).
    bb = make()
    calls = []
    inner_forward = bb.inner.forward

    def recording_forward(*, embeddings, times, **kwargs):
        calls.append((embeddings, times))
        return inner_forward(embeddings=embeddings, times=times, **kwargs)

    bb.inner.forward = recording_forward
    t = torch.cumsum(torch.rand(1, 2 * L + 4), 1)
    with torch.no_grad():
        bb(tokens=torch.randint(1, VOCAB, t.shape), times=t)
    # Calls: segment 0 full pass, segment 1 summary + full, segment 2 summary + full.
    expected = [
        [t[:, :1], t[:, :L], t[:, L - 1 : L]],
        [t[:, L - J : L - J + 1], t[:, L - J : L], t[:, L - 1 : L]],
        [t[:, L - K : L - K + 1], t[:, L - K : L], t[:, L : 2 * L], t[:, 2 * L - 1 : 2 * L]],
        [t[:, 2 * L - J : 2 * L - J + 1], t[:, 2 * L - J : 2 * L], t[:, 2 * L - 1 : 2 * L]],
        [t[:, 2 * L - K : 2 * L - K + 1], t[:, 2 * L - K :], t[:, -1:]],
    ]
    assert len(calls) == len(expected)
    for (x, times), parts in zip(calls, expected, strict=True):
        torch.testing.assert_close(times, torch.cat(parts, 1))
        assert x.shape[1] == times.shape[1]
        torch.testing.assert_close(x[:, 0], x[:, -1])  # the same P_n (or T) on both ends
    torch.testing.assert_close(calls[1][0][0, 0], bb.summary_prompt)
    torch.testing.assert_close(calls[0][0][0, 0], bb.initial_memory)


def test_time_positions_reach_the_inner_transformer():
    # With rope.position=time the inner transformer's rotary angles come from the times HMT hands it: scaling
    # the times changes the outputs; shifting them does not (angles are relative to each inner sequence).
    bb = make("rope.position=time")
    tokens = torch.randint(1, VOCAB, (2, 3 * L + 2))
    t = torch.cumsum(torch.rand(2, 3 * L + 2) * 5, 1)
    with torch.no_grad():
        out = bb(tokens=tokens, times=t)
        torch.testing.assert_close(bb(tokens=tokens, times=t + 100.0), out, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(bb(tokens=tokens, times=2 * t), out, atol=1e-3)


def test_recall_reads_only_the_last_n_memories():
    bb = make()
    memories = [torch.randn(2, 32) for _ in range(5)]
    summary = torch.randn(2, 32)
    out = bb.recall(summary, memories)
    older = [torch.randn(2, 32) for _ in range(3)] + memories[3:]
    torch.testing.assert_close(bb.recall(summary, older), out, atol=0, rtol=0)
    newer = memories[:4] + [torch.randn(2, 32)]
    assert not torch.allclose(bb.recall(summary, newer), out)
    # Values are the raw memories: the output is a convex combination of the last N.
    m = torch.stack(memories[-N:], 1)
    w = torch.softmax(
        torch.einsum("bd,bmd->bm", bb.recall_query(summary), bb.recall_key(m)) / math.sqrt(32), -1
    )
    torch.testing.assert_close(out, torch.einsum("bm,bmd->bd", w, m))


@pytest.mark.parametrize(
    "bptt, loss_segment, reached",
    [
        (0, 2, {0, 1, 2}),  # no truncation: memories carry gradient back to segment 0
        (1, 2, {1, 2}),  # truncated at every boundary: only segment 1's tokens, as sensory / summary inputs
        (3, 2, {0, 1, 2}),  # segments 0-2 share one truncation window
        (3, 3, {2, 3}),  # segment 3 starts a new window
    ],
)
def test_truncated_bptt(bptt, loss_segment, reached):
    bb = make(f"hmt.bptt_segments={bptt}").train()
    emb = bb.embed(torch.randint(1, VOCAB, (1, 4 * L))).detach().requires_grad_()
    out = bb(embeddings=emb)
    (grad,) = torch.autograd.grad(out[:, loss_segment * L : (loss_segment + 1) * L].sum(), emb)
    for n in range(4):
        reaches = bool(grad[:, n * L : (n + 1) * L].abs().sum() > 0)
        assert reaches == (n in reached), (n, reaches)


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_checkpointing_changes_nothing(backbone):
    # Dropout on, so recomputation in backward must replay the same random masks (checkpoint keeps RNG state).
    bb = make("model.dropout=0.1", backbone=backbone).train()
    tokens = torch.randint(1, VOCAB, (2, 3 * L + 2))
    weight = torch.randn(2, 3 * L + 2, 32)

    def run(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        bb.checkpoint_segments = checkpointing
        bb.zero_grad()
        torch.manual_seed(1)
        out = bb(tokens=tokens)
        (out * weight).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in bb.named_parameters()}

    out_ckpt, grads_ckpt = run(True)
    out_plain, grads_plain = run(False)
    torch.testing.assert_close(out_ckpt, out_plain)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], g, msg=name)
    # The grad-free forward (no checkpointing) is the same function as the checkpointed one.
    bb.eval()
    bb.checkpoint_segments = True
    with torch.no_grad():
        plain = bb(tokens=tokens)
    torch.testing.assert_close(bb(tokens=tokens).detach(), plain)


@pytest.mark.parametrize(
    "override, key",
    [
        ("hmt.backbone=hmt", "hmt.backbone"),
        ("hmt.backbone=rwkv", "hmt.backbone"),
        ("hmt.segment_length=1", "hmt.segment_length"),
        (f"hmt.sensory={L}", "hmt.sensory"),
        ("hmt.sensory=-1", "hmt.sensory"),
        ("hmt.memory_window=0", "hmt.memory_window"),
        ("hmt.bptt_segments=-1", "hmt.bptt_segments"),
        ("hmt.recall_dim=0", "hmt.recall_dim"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make(override)


def saved_numel(bb: HMTBackbone, length: int) -> int:
    """Elements of the activations autograd keeps for backward during one forward (weights not counted)."""
    weights = {p.untyped_storage().data_ptr() for p in bb.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in weights:
            total += t.numel()
        return t

    tokens = torch.randint(1, VOCAB, (1, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = bb(tokens=tokens)
    out.sum().backward()
    return total


def test_saved_activations_do_not_grow_with_segments():
    # Checkpointed segments keep only their inputs between forward and backward: token ids and times of the
    # segment and of the previous one (4 numbers per token; the N memories are [B, D] each). The activations
    # of a segment (layers x (L + k + 2) x D and more) are recomputed in its backward.
    bb = make("hmt.segment_length=64", "hmt.sensory=8", "hmt.memory_window=4").train()
    d = bb.d_model
    short, long = saved_numel(bb, 1024), saved_numel(bb, 4096)
    assert long / 4096 <= 1.05 * short / 1024, (short, long)
    assert long <= 4 * 4096 < 4096 * d, long  # an eighth of one [T, D] activation in all
    # The measure sees activations when they are kept: without checkpointing, tens of [T, D] per token.
    bb.checkpoint_segments = False
    assert saved_numel(bb, 1024) > 10 * 1024 * d
