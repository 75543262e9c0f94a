"""The Llama-style transformer backbone: scaled RoPE actually used, causality, padding, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ehrlong.backbones.transformer import SIZES, build
from ehrlong.config import RopeConfig, TrainConfig
from ehrlong.errors import ConfigError

VOCAB = 50
D, HEADS, HEAD_DIM = 64, 4, 16
UNSCALED = 1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)  # RoPE, Su et al. 2021


def make_cfg(attn: str = "sdpa", checkpointing: bool = False, **rope) -> TrainConfig:
    cfg = TrainConfig(backbone="transformer", size="tiny", context_length=64, rope=RopeConfig(**rope))
    cfg.model.d_model, cfg.model.n_layers, cfg.transformer.n_heads = D, 2, HEADS
    cfg.transformer.attn_implementation = attn
    cfg.model.activation_checkpointing = checkpointing
    return cfg


def make_model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(make_cfg(**kwargs), VOCAB).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# rope.* given -> the transformers rope_parameters and max_position_embeddings written out by hand, so the
# test checks the backbone's mapping instead of repeating it.
ROPE_CASES = {
    "default": ({}, {"rope_type": "default", "rope_theta": 10000.0}, 64),
    "linear": (
        {"type": "linear", "factor": 4.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        64,
    ),
    "dynamic": (
        {"type": "dynamic", "factor": 4.0, "original_context_length": 16},
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
        16,
    ),
    "yarn": (
        {"type": "yarn", "factor": 4.0, "original_context_length": 64, "beta_fast": 16.0, "beta_slow": 2.0},
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
        },
        256,
    ),
    "llama3": (
        {"type": "llama3", "factor": 4.0, "original_context_length": 64, "theta": 500000.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        256,
    ),
}


def expected_rope(rope_params: dict, max_positions: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling from transformers' own rope functions for these parameters."""
    hf = LlamaConfig(
        hidden_size=D,
        num_attention_heads=HEADS,
        max_position_embeddings=max_positions,
        rope_parameters=dict(rope_params),
    )
    if rope_params["rope_type"] == "default":
        return UNSCALED, 1.0
    return ROPE_INIT_FUNCTIONS[rope_params["rope_type"]](hf, None, seq_len=seq_len)


def captured_cos_sin(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) every decoder layer receives in a forward pass (checked identical across layers)."""
    seen = []

    def grab(module, args, kwargs):
        seen.append(kwargs["position_embeddings"])

    hooks = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.layers]
    with torch.no_grad():
        model(tokens=x)
    for h in hooks:
        h.remove()
    assert len(seen) == len(model.layers)
    for cos, sin in seen[1:]:
        assert torch.equal(cos, seen[0][0]) and torch.equal(sin, seen[0][1])
    return seen[0]


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_configured_rope_frequencies_are_used_in_forward(name):
    rope, params, max_positions = ROPE_CASES[name]
    model = make_model(**rope)
    length = 32
    cos, sin = captured_cos_sin(model, tokens(1, length))  # [1, T, head_dim]

    inv_freq, scaling = expected_rope(params, max_positions, seq_len=length)
    angles = torch.arange(length).float()[:, None] * inv_freq[None, :]  # [T, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # transformers' rotate_half layout
    torch.testing.assert_close(cos[0], angles.cos() * scaling, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin[0], angles.sin() * scaling, atol=1e-5, rtol=1e-5)

    if name == "default":
        return
    # Scaling really applies here, by the amounts the methods define.
    theta = params["rope_theta"]
    unscaled = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    assert not torch.allclose(inv_freq, unscaled)
    if name == "linear":
        torch.testing.assert_close(inv_freq, UNSCALED / 4)
    if name == "yarn":
        # YaRN's attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023) scales cos and sin.
        assert scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
        assert torch.allclose(cos[0], angles.cos() * scaling) and not torch.allclose(cos[0], angles.cos())
    if name == "llama3":
        # Llama 3.1: wavelengths below original / high_freq_factor are kept, above original / low are divided.
        assert inv_freq[0] == pytest.approx(unscaled[0].item())  # wavelength 2 pi < 64 / 4
        assert inv_freq[-1] == pytest.approx(unscaled[-1].item() / 4)  # wavelength > 64 / 1

    # Same weights, no scaling: the hidden states change, so the layers consume these cos/sin.
    plain = make_model()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model(tokens=tokens(1, length)), plain(tokens=tokens(1, length)), atol=1e-4)


def test_dynamic_rope_is_unscaled_up_to_the_original_length():
    rope, params, max_positions = ROPE_CASES["dynamic"]
    model = make_model(**rope)
    cos_short, _ = captured_cos_sin(model, tokens(1, 16))  # 16 = original_context_length: no scaling
    angles = torch.arange(16).float()[:, None] * UNSCALED[None, :]
    torch.testing.assert_close(cos_short[0], torch.cat([angles, angles], -1).cos(), atol=1e-5, rtol=1e-5)
    cos_long, _ = captured_cos_sin(model, tokens(1, 32))
    assert not torch.allclose(cos_long[0, :16], cos_short[0], atol=1e-4)  # longer sequence: base grown


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal(attn):
    model = make_model(attn=attn)
    x = tokens(2, 24)
    y = x.clone()
    t = 10
    y[:, t + 1] = (x[:, t + 1] % (VOCAB - 1)) + 1  # a different real token
    with torch.no_grad():
        hx, hy = model(tokens=x), model(tokens=y)
    torch.testing.assert_close(hx[:, : t + 1], hy[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(hx[:, t + 1], hy[:, t + 1], atol=1e-4)


@pytest.mark.parametrize(
    "attn,rope",
    [
        ("sdpa", {}),
        ("eager", {}),
        ("sdpa", {"type": "dynamic", "factor": 2.0, "original_context_length": 16}),
    ],
    ids=["sdpa", "eager", "sdpa-dynamic"],
)
def test_padding_invariance(attn, rope):
    """Real positions give the same outputs alone and right padded with garbage (no padding mask needed)."""
    model = make_model(attn=attn, **rope)
    n, pad = 20, 12  # n > 16, so dynamic RoPE is scaling
    real = tokens(1, n)
    padded = torch.cat([real, tokens(1, pad, seed=7)], dim=1)  # garbage, not PAD, in the padded slots
    mask = torch.arange(n + pad)[None, :] < n
    with torch.no_grad():
        alone = model(tokens=real)
        with_padding = model(tokens=padded, mask=mask)
    torch.testing.assert_close(with_padding[:, :n], alone, atol=1e-5, rtol=1e-5)

    # Two rows of different lengths in one batch: each real prefix matches its own unpadded run.
    other = tokens(1, n - 6, seed=3)
    batch = torch.cat([padded, torch.cat([other, torch.zeros(1, pad + 6, dtype=torch.long)], dim=1)])
    batch_mask = torch.stack([mask[0], torch.arange(n + pad) < n - 6])
    if not rope:  # dynamic RoPE scales by the longest row of the batch (one inv_freq per forward)
        with torch.no_grad():
            out = model(tokens=batch, mask=batch_mask)
            torch.testing.assert_close(out[1:, : n - 6], model(tokens=other), atol=1e-5, rtol=1e-5)


def test_left_padding_is_rejected():
    model = make_model()
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, :2] = False
    with pytest.raises(ValueError, match="right padding"):
        model(tokens=tokens(1, 8), mask=mask)


def test_embeddings_input_matches_tokens():
    model = make_model()
    x = tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(embeddings=model.embed(x)), model(tokens=x))


def test_gradients_reach_every_parameter_and_checkpointing_matches():
    grads = {}
    for checkpointing in (False, True):
        model = make_model(checkpointing=checkpointing).train()
        x = tokens(2, 16)
        mask = torch.ones(2, 16, dtype=torch.bool)
        mask[1, 12:] = False
        hidden = model(tokens=x, mask=mask)
        weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
        (hidden * weights * mask[..., None]).sum().backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters()}
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_base_parameter_count():
    cfg = TrainConfig(backbone="transformer", size="base")
    with torch.device("meta"):
        model = build(cfg, 40_000)
    d, layers = SIZES["base"].d_model, SIZES["base"].n_layers
    per_layer = 4 * d * d + 3 * d * (4 * d) + 2 * d  # q, k, v, o; SwiGLU gate, up, down; two RMSNorms
    count = sum(p.numel() for p in model.parameters())
    assert count == 40_000 * d + layers * per_layer + d
    assert 100e6 < count < 115e6  # ~106M; the tied LM head adds nothing


def test_registered_attention_function_is_used_by_name():
    """A later sparse attention plugs in through transformers' AttentionInterface, chosen by name."""
    calls = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)  # [B, heads, T, head_dim]
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("ehrlong_test_counting_sdpa", counting_sdpa)
    custom, reference = make_model(attn="ehrlong_test_counting_sdpa"), make_model()
    x = tokens(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(custom(tokens=x), reference(tokens=x))
    assert calls == [torch.Size([1, HEADS, 12, HEAD_DIM])] * 2


@pytest.mark.parametrize(
    "rope,key",
    [
        ({"type": "ntk"}, "linear, dynamic, yarn, llama3"),
        ({"type": "yarn", "factor": 4.0}, "rope.original_context_length"),
        ({"type": "llama3", "original_context_length": 64}, "rope.factor"),
        ({"type": "linear", "factor": 2.0, "beta_fast": 32.0}, "rope.beta_fast"),
        ({"type": "linear", "factor": 0.5}, "rope.factor"),
        (
            {"type": "llama3", "factor": 4.0, "original_context_length": 64, "low_freq_factor": 4.0},
            "high_freq_factor",
        ),
        ({"type": "longrope", "factor": 4.0}, "short_factor"),
        ({"theta": 0.0}, "rope.theta"),
    ],
)
def test_bad_rope_config_names_the_key(rope, key):
    with pytest.raises(ConfigError, match=key):
        build(make_cfg(**rope), VOCAB)


def test_bad_attention_and_head_config():
    with pytest.raises(ConfigError, match="sdpa"):
        build(make_cfg(attn="flashy"), VOCAB)
    cfg = make_cfg()
    cfg.transformer.n_heads = 3
    with pytest.raises(ConfigError, match="n_heads=3"):
        build(cfg, VOCAB)
    cfg = make_cfg()
    cfg.transformer.n_kv_heads = 3
    with pytest.raises(ConfigError, match="n_kv_heads=3"):
        build(cfg, VOCAB)
