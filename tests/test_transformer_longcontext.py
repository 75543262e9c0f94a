"""The transformer's long-context options: sparse attention patterns (attention.pattern) wired through
transformers' attention registry, and rotary positions from event time (rope.position=time)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ehrlong.backbones.attention import SPARSE_IMPLEMENTATION, pattern_mask, sparse_attention_forward
from ehrlong.backbones.transformer import build, time_positions
from ehrlong.config import TrainConfig, parse
from ehrlong.errors import ConfigError

VOCAB, HEADS = 50, 4

PATTERNS = {
    "sliding_window": ["attention.window=5", "attention.block=3"],
    "lambda": ["attention.window=4", "attention.sinks=3"],
    "longlora_shift": ["attention.group=6"],
}


def make(*extra: str, seed: int = 0) -> torch.nn.Module:
    cfg = parse(
        TrainConfig,
        [
            "backbone=transformer",
            "model.d_model=32",
            "model.n_layers=2",
            f"transformer.n_heads={HEADS}",
            "context_length=64",
            *extra,
        ],
    )
    torch.manual_seed(seed)
    return build(cfg, VOCAB)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def masked_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense SDPA under the pattern's explicit [T, T] (or [H, T, T]) mask: what the blocked kernels must equal."""
    spec = dict(module.config.attention_pattern)
    name = spec.pop("pattern")
    spec.pop("block", None)  # the blocking changes the cost, not the mask
    if name == "longlora_shift":
        spec["heads"] = query.shape[1]
    mask = pattern_mask(name, query.shape[2], **spec)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("test_masked_reference", masked_reference)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_pattern_in_the_model_equals_masked_dense_values_and_gradients(pattern):
    model = make(f"attention.pattern={pattern}", *PATTERNS[pattern]).train()
    assert model.config._attn_implementation == SPARSE_IMPLEMENTATION
    x = tokens(2, 23)

    def run(implementation: str):
        model.zero_grad()
        model.config._attn_implementation = implementation
        out = model(tokens=x)
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = run(SPARSE_IMPLEMENTATION)
    ref, ref_grads = run("test_masked_reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    # And the pattern is really sparse: with the same weights, dense attention gives other outputs.
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        assert not torch.allclose(model(tokens=x)[:, 10:], ref[:, 10:], atol=1e-3)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_pattern_padding_stays_invisible(pattern):
    """Right padding with garbage tokens changes no real output, for every pattern (mask builder registered)."""
    model = make(f"attention.pattern={pattern}", *PATTERNS[pattern]).train()
    n, pad = 17, 9
    real = tokens(1, n)
    padded = torch.cat([real, tokens(1, pad, seed=7)], dim=1)
    mask = torch.arange(n + pad)[None, :] < n
    with torch.no_grad():
        alone = model(tokens=real)
        torch.testing.assert_close(model(tokens=padded, mask=mask)[:, :n], alone, atol=1e-5, rtol=1e-5)


def test_sparse_function_gets_the_padding_mask_and_rejects_left_padding():
    model = make("attention.pattern=sliding_window", "attention.window=4").eval()
    seen = []
    original = sparse_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(SPARSE_IMPLEMENTATION, spy)
    try:
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[1, 8:] = False
        with torch.no_grad():
            model(tokens=tokens(2, 12), mask=mask)
        # transformers called our registered mask builder: the layers got the padding, not None.
        assert len(seen) == 2 and all(torch.equal(m, mask) for m in seen)
    finally:
        AttentionInterface.register(SPARSE_IMPLEMENTATION, original)

    left = torch.ones(1, 6, dtype=torch.bool)
    left[0, 0] = False
    q = torch.randn(1, HEADS, 6, 8)
    with pytest.raises(ValueError, match="right-padded"):
        sparse_attention_forward(model.layers[0].self_attn, q, q, q, left)


def test_longlora_uses_full_attention_at_inference():
    """LongLoRA's shifted groups are for training; evaluation attends to the whole causal past."""
    model = make("attention.pattern=longlora_shift", "attention.group=4").eval()
    x = tokens(1, 20)
    with torch.no_grad():
        sparse_eval = model(tokens=x)
        model.config._attn_implementation = "sdpa"
        dense = model(tokens=x)
    torch.testing.assert_close(sparse_eval, dense, atol=1e-5, rtol=1e-5)


def reference_gqa(module, query, key, value, attention_mask, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    return masked_reference(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("test_masked_reference_gqa", reference_gqa)


def test_grouped_query_heads_are_shared():
    model = make(
        "attention.pattern=lambda", "attention.window=4", "attention.sinks=2", "transformer.n_kv_heads=2"
    ).train()
    x = tokens(1, 15)
    out = model(tokens=x)
    model.config._attn_implementation = "test_masked_reference_gqa"
    torch.testing.assert_close(out, model(tokens=x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["attention.pattern=banded"], "attention.pattern"),
        (["attention.pattern=sliding_window", "attention.window=0"], "attention.window"),
        (["attention.pattern=longlora_shift", "attention.group=5"], "attention.group"),
        (["attention.pattern=lambda", "model.dropout=0.1"], "model.dropout"),
        (["rope.position=visit"], "rope.position"),
        (["rope.position=time", "rope.positions_per_day=0"], "rope.positions_per_day"),
    ],
)
def test_bad_long_context_config_names_the_key(extra, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make(*extra)


# ------------------------------------------------------------------------------------------------------
# rope.position=time
# ------------------------------------------------------------------------------------------------------


def test_time_positions_share_a_timestamp_and_repeat_at_padding():
    times = torch.tensor([[400.0, 400.0, 401.5, 766.5, 766.5, 0.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    pos = time_positions(times, mask, positions_per_day=2.0)
    assert pos.tolist() == [[0.0, 0.0, 3.0, 733.0, 733.0, 733.0]]
    with pytest.raises(ValueError, match="times"):
        time_positions(None, mask, 1.0)


def captured_cos(model: torch.nn.Module, **inputs) -> torch.Tensor:
    seen = []
    hook = model.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_embeddings"][0]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return seen[0]


def test_time_positions_drive_the_rotary_angles():
    model = make("rope.position=time", "rope.positions_per_day=24").eval()
    x = tokens(1, 6)
    times = torch.tensor([[10.0, 10.0, 10.5, 11.0, 40.0, 40.0]])
    cos = captured_cos(model, tokens=x, times=times)
    hours = (times - 10.0) * 24  # [1, T]
    inv_freq = model.rotary.inv_freq
    expected = torch.cat([hours[..., None] * inv_freq] * 2, dim=-1).cos()
    torch.testing.assert_close(cos, expected)
    # Events at one timestamp get one rotation.
    assert torch.equal(cos[0, 0], cos[0, 1]) and torch.equal(cos[0, 4], cos[0, 5])


def test_time_positions_change_outputs_with_gaps_and_ignore_time_shifts():
    timed = make("rope.position=time").eval()
    indexed = make().eval()  # same seed, same weights
    x = tokens(1, 12)
    close = torch.cumsum(torch.full((1, 12), 0.5), dim=1)
    far = close.clone()
    far[:, 6:] += 365.0  # a year passes between token 5 and token 6
    with torch.no_grad():
        a, b = timed(tokens=x, times=close), timed(tokens=x, times=far)
        shifted = timed(tokens=x, times=far + 1000.0)
        i_a, i_b = indexed(tokens=x, times=close), indexed(tokens=x, times=far)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # before the gap: nothing differs
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)  # after it: the year is seen
    torch.testing.assert_close(shifted, b, atol=1e-4, rtol=1e-4)  # only differences of time matter
    torch.testing.assert_close(i_a, i_b)  # index positions ignore time


def test_time_positions_padding_invariance():
    model = make("rope.position=time").eval()
    n, pad = 10, 6
    x = tokens(1, n + pad)
    times = torch.cumsum(torch.rand(1, n + pad) * 30, dim=1)
    mask = torch.arange(n + pad)[None, :] < n
    with torch.no_grad():
        alone = model(tokens=x[:, :n], times=times[:, :n])
        padded = model(tokens=x, times=times * mask, mask=mask)  # padding times are zeros in EventBatch
    torch.testing.assert_close(padded[:, :n], alone, atol=1e-5, rtol=1e-5)
