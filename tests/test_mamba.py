"""Mamba backbone: same function as transformers' MambaModel, and step() equals forward()."""

from __future__ import annotations

import pytest
import torch
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaModel

from ehrlong.backbones import build_backbone
from ehrlong.backbones.mamba import SIZES
from ehrlong.config import TrainConfig, parse
from ehrlong.errors import ConfigError

VOCAB = 50


def tiny(*extra: str):
    torch.manual_seed(0)
    cfg = parse(TrainConfig, ["backbone=mamba", "model.d_model=32", "model.n_layers=2", *extra])
    return build_backbone(cfg, VOCAB).eval()


def test_matches_transformers_mamba_with_the_same_weights():
    # Parameter names mirror MambaForCausalLM, so HF weights load 1:1; the chunked scan must give the
    # same hidden states as transformers' reference path.
    ours = tiny()
    hf = MambaModel(
        HFMambaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            state_size=16,
            expand=2,
            conv_kernel=4,
            time_step_rank=2,
        )
    ).eval()
    state = {k.replace("embed.", "embeddings."): v for k, v in ours.state_dict().items()}
    result = hf.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    tokens = torch.randint(1, VOCAB, (2, 300))  # longer than one scan segment (128)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(tokens=tokens), hf(input_ids=tokens).last_hidden_state, atol=2e-5, rtol=1e-4
        )


def test_step_by_step_equals_forward():
    bb = tiny()
    tokens = torch.randint(1, VOCAB, (3, 40))
    with torch.no_grad():
        full = bb(tokens=tokens)
        state = bb.init_state(3)
        steps = []
        for t in range(tokens.shape[1]):
            h, state = bb.step(tokens[:, t], state)
            steps.append(h)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_base_is_the_mamba_130m_shape():
    assert (SIZES["base"].d_model, SIZES["base"].n_layers) == (768, 24)
    cfg = parse(TrainConfig, ["backbone=mamba", "size=base"])
    with torch.device("meta"):
        bb = build_backbone(cfg, 40_000)
    n = sum(p.numel() for p in bb.parameters())
    assert 110e6 <= n <= 135e6, n


def test_bad_kernel_choice_is_a_config_error():
    with pytest.raises(ConfigError, match="mamba.kernels"):
        tiny("mamba.kernels=triton")


def test_no_weight_decay_on_A_log_and_D():
    bb = tiny()
    assert all(getattr(layer.mixer.A_log, "_no_weight_decay", False) for layer in bb.layers)
    assert all(getattr(layer.mixer.D, "_no_weight_decay", False) for layer in bb.layers)
