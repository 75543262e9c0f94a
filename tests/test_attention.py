"""Sparse attention patterns: each one equals dense SDPA under its own explicit mask (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from ehrlong.backbones.attention import ATTENTION_PATTERNS, DEFAULT_BLOCK, get_attention_pattern, pattern_mask

HEADS = 4

# (pattern, params for the attention function); block sizes chosen so T below is often not a multiple.
CASES = [
    ("dense", {}),
    ("sliding_window", {"window": 4}),
    ("sliding_window", {"window": 5, "block": 3}),
    ("sliding_window", {"window": 64}),  # wider than every T below
    ("sliding_window", {"window": 2, "block": 5}),  # blocks wider than the window
    ("lambda", {"window": 4, "sinks": 2}),
    ("lambda", {"window": 3, "sinks": 5, "block": 2}),  # sinks overlap the window early on
    ("lambda", {"window": 64, "sinks": 3}),
    ("longlora_shift", {"group": 4}),
    ("longlora_shift", {"group": 6}),
    ("longlora_shift", {"group": 64}),
]
LENGTHS = [1, 3, 7, 16, 23]


def _mask(name: str, seq_len: int, params: dict) -> torch.Tensor:
    extra = {"heads": HEADS} if name == "longlora_shift" else {}
    return pattern_mask(name, seq_len, **params, **extra)


def _qkv(seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, HEADS, seq_len, 8, generator=gen, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize(("name", "params"), CASES)
def test_pattern_equals_masked_dense_values_and_gradients(name, params, seq_len):
    q, k, v = _qkv(seq_len)
    out = ATTENTION_PATTERNS[name](q, k, v, **params)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(name, seq_len, params))
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)

    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "params"), [("sliding_window", {"window": 300}), ("lambda", {"window": 300, "sinks": 4})]
)
def test_default_block_size_over_several_blocks(name, params):
    """T and window past DEFAULT_BLOCK, so the default blocking (not just one block) is held to the mask."""
    seq_len = 2 * DEFAULT_BLOCK + 37
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, seq_len, 4, generator=gen, requires_grad=True) for _ in range(3))
    out = ATTENTION_PATTERNS[name](q, k, v, **params)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern_mask(name, seq_len, **params))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_scale_is_passed_through(name, params):
    q, k, v = _qkv(11)
    out = ATTENTION_PATTERNS[name](q, k, v, **params, scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(name, 11, params), scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_causal_and_right_padding(name, params):
    """Changing or appending later tokens (garbage right padding) never changes an earlier output."""
    seq_len, cut = 20, 9
    q, k, v = (x.detach() for x in _qkv(seq_len))
    fn = ATTENTION_PATTERNS[name]
    out = fn(q, k, v, **params)

    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, cut:] = 1e3 * torch.randn_like(x[:, :, cut:])
    torch.testing.assert_close(fn(q2, k2, v2, **params)[:, :, :cut], out[:, :, :cut], atol=1e-6, rtol=1e-6)

    garbage = [torch.cat([x[:, :, :cut], 1e3 * torch.randn(2, HEADS, 7, 8)], dim=2) for x in (q, k, v)]
    torch.testing.assert_close(fn(*garbage, **params)[:, :, :cut], out[:, :, :cut], atol=1e-6, rtol=1e-6)


def test_sparse_pattern_differs_from_dense():
    """The equality tests above would pass for a pattern that silently fell back to dense; this would not."""
    q, k, v = (x.detach() for x in _qkv(16))
    dense = ATTENTION_PATTERNS["dense"](q, k, v)
    for name, params in CASES[1:]:
        if params.get("window") == 64 or params.get("group") == 64:
            continue
        assert not torch.allclose(ATTENTION_PATTERNS[name](q, k, v, **params), dense, atol=1e-4), name


def test_sliding_window_mask_rows():
    mask = pattern_mask("sliding_window", 10, window=4)
    assert mask.dtype == torch.bool and mask.shape == (10, 10)
    assert mask.sum(1).tolist() == [min(t + 1, 4) for t in range(10)]
    assert not mask.triu(1).any()
    assert mask.diagonal().all()
    assert not mask[9, 5] and mask[9, 6]


def test_lambda_mask_includes_sinks_causally():
    mask = pattern_mask("lambda", 12, window=3, sinks=2)
    assert mask[:, :2].tril().equal(torch.ones(12, 2, dtype=torch.bool).tril())  # sinks, causally
    assert not mask[0, 1]  # a sink after the query stays hidden
    assert mask[11].nonzero().flatten().tolist() == [0, 1, 9, 10, 11]
    assert not mask.triu(1).any()


def test_longlora_mask_groups_and_no_future():
    mask = pattern_mask("longlora_shift", 10, group=4, heads=4)
    assert mask.shape == (4, 10, 10)
    assert not mask.triu(1).any()  # no wrap-around: nothing sees the future
    plain, shifted = mask[0], mask[2]
    assert mask[0].equal(mask[1]) and mask[2].equal(mask[3])
    assert plain[5].nonzero().flatten().tolist() == [4, 5]  # group [4, 8)
    assert shifted[5].nonzero().flatten().tolist() == [2, 3, 4, 5]  # shifted group [2, 6)
    assert shifted[1].nonzero().flatten().tolist() == [0, 1]  # first partial group [0, 2)
    assert shifted[9].nonzero().flatten().tolist() == [6, 7, 8, 9]  # last group [6, 10), no wrap


def test_dense_mask_is_causal():
    assert pattern_mask("dense", 5).equal(torch.ones(5, 5, dtype=torch.bool).tril())


@pytest.mark.parametrize(
    ("name", "params", "word"),
    [
        ("sliding_window", {"window": 0}, "window"),
        ("sliding_window", {"window": 2.5}, "window"),
        ("sliding_window", {"window": 4, "block": 0}, "block"),
        ("lambda", {"window": 4, "sinks": -1}, "sinks"),
        ("longlora_shift", {"group": 5}, "group"),
        ("longlora_shift", {"group": 1}, "group"),
    ],
)
def test_bad_params_raise_value_error_naming_the_param(name, params, word):
    q, k, v = _qkv(8)
    with pytest.raises(ValueError, match=word):
        ATTENTION_PATTERNS[name](q, k, v, **params)


def test_bad_inputs_and_names():
    q, k, v = _qkv(8)
    with pytest.raises(ValueError, match="heads"):
        ATTENTION_PATTERNS["longlora_shift"](q[:, :3], k[:, :3], v[:, :3], group=4)
    with pytest.raises(ValueError, match="repeat"):
        ATTENTION_PATTERNS["sliding_window"](q, k[:, :2], v[:, :2], window=4)
    with pytest.raises(ValueError, match="4-D"):
        ATTENTION_PATTERNS["dense"](q[0], k[0], v[0])
    with pytest.raises(ValueError, match="sliding_window"):
        get_attention_pattern("sliding")
    with pytest.raises(ValueError, match="valid patterns"):
        pattern_mask("band", 8)
    with pytest.raises(ValueError, match="heads"):
        pattern_mask("longlora_shift", 8, group=4, heads=3)
