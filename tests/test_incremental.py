"""Incremental prediction with the Mamba backbone (issue 6): a carried state plus M new tokens gives what
forward() over the whole timeline gives at those tokens, at a cost that depends on M only.

float64 runs check the algebra to rounding (1e-12); a float32 run checks the dtype the model runs in.
"""

from __future__ import annotations

import pytest
import torch

from ehrlong.backbones import build_backbone, mamba
from ehrlong.backbones.scan import selective_scan_ref
from ehrlong.config import TrainConfig, parse

VOCAB = 50
D_CONV = 4  # MambaConfig.d_conv default; several cases below use fewer tokens than this


def tiny(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = parse(TrainConfig, ["backbone=mamba", "model.d_model=32", "model.n_layers=2", "model.dropout=0.0"])
    bb = build_backbone(cfg, VOCAB).to(dtype).eval()
    assert bb.layers[0].mixer.dims.d_conv == D_CONV
    return bb


def timeline(batch, length, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def forward(bb, tokens):
    with torch.no_grad():
        return bb(tokens=tokens)


def assert_states_close(got, want, atol):
    assert len(got) == len(want)
    for (conv, ssm), (conv_w, ssm_w) in zip(got, want, strict=True):
        assert conv.shape == conv_w.shape and ssm.shape == ssm_w.shape
        torch.testing.assert_close(conv, conv_w, atol=atol, rtol=0)
        torch.testing.assert_close(ssm, ssm_w, atol=atol, rtol=0)


# ---- prefill continues a state --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, m",
    [(1, 1), (2, 3), (3, 1), (5, 2), (40, 1), (1, 60), (3, 50), (37, 33), (64, 16), (130, 70)],
)
def test_prefill_from_a_state_equals_forward_over_the_whole_timeline(n, m):
    # n or m below d_conv: the conv window reaches back into the carried conv state (and, for n < d_conv,
    # into its zero start). 130 + 70 crosses scan segments (128 tokens) and chunks (16) off their borders.
    bb = tiny()
    tokens = timeline(2, n + m)
    full = forward(bb, tokens)

    first, state = bb.prefill(tokens[:, :n])
    second, state = bb.prefill(tokens[:, n:], state)

    torch.testing.assert_close(first, full[:, :n], atol=1e-12, rtol=0)
    torch.testing.assert_close(second, full[:, n:], atol=1e-12, rtol=0)
    # The state after two pieces is the state after one piece of the same tokens.
    _, at_once = bb.prefill(tokens)
    assert_states_close(state, at_once, atol=1e-12)


def test_prefill_in_float32_matches_forward():
    bb = tiny(torch.float32)
    tokens = timeline(3, 300, seed=1)
    full = forward(bb, tokens)
    _, state = bb.prefill(tokens[:, :261])
    h, state = bb.prefill(tokens[:, 261:], state)
    torch.testing.assert_close(h, full[:, 261:], atol=1e-5, rtol=1e-4)
    assert state[0][0].dtype == torch.float32 and state[0][1].dtype == torch.float32


def test_prefill_and_step_mix_freely():
    # The state layout is shared: any interleaving of prefill() and step() walks the same timeline.
    bb = tiny()
    tokens = timeline(2, 60, seed=2)
    full = forward(bb, tokens)

    plan = ["prefill:10", "step:2", "prefill:1", "step:5", "prefill:3", "prefill:30", "step:9"]
    state, pos, got = bb.init_state(2), 0, []
    for item in plan:
        kind, count = item.split(":")
        for _ in range(int(count)) if kind == "step" else [None]:
            if kind == "step":
                h, state = bb.step(tokens[:, pos], state)
                got.append(h[:, None])
                pos += 1
            else:
                h, state = bb.prefill(tokens[:, pos : pos + int(count)], state)
                got.append(h)
                pos += int(count)
    assert pos == tokens.shape[1]
    torch.testing.assert_close(torch.cat(got, 1), full, atol=1e-12, rtol=0)


def test_steps_then_prefill_equals_prefill_then_steps_state():
    bb = tiny()
    tokens = timeline(2, 12, seed=3)
    state = bb.init_state(2)
    for t in range(7):
        _, state = bb.step(tokens[:, t], state)
    _, by_steps = bb.prefill(tokens[:, 7:], state)
    _, by_prefill = bb.prefill(tokens)
    assert_states_close(by_steps, by_prefill, atol=1e-12)


# ---- right-padded batches ------------------------------------------------------------------------------


def test_padded_batch_gives_each_row_the_state_it_gets_alone():
    bb = tiny()
    history, new = [9, 2, 40, 5], [17, 3, 1, 0]  # lengths below d_conv, one and zero included
    tokens = timeline(4, 60, seed=4)

    batch_first = torch.zeros(4, max(history), dtype=torch.long)
    batch_new = torch.zeros(4, max(new), dtype=torch.long)
    for i, (n, m) in enumerate(zip(history, new, strict=True)):
        batch_first[i, :n] = tokens[i, :n]
        batch_new[i, :m] = tokens[i, n : n + m]
    _, state = bb.prefill(batch_first, lengths=torch.tensor(history))
    before = [(conv.clone(), ssm.clone()) for conv, ssm in state]
    h, state = bb.prefill(batch_new, state, lengths=torch.tensor(new))

    for i, (n, m) in enumerate(zip(history, new, strict=True)):
        row = tokens[i : i + 1, : n + m]
        alone_h, alone_state = bb.prefill(row)
        torch.testing.assert_close(h[i, :m], alone_h[0, n:], atol=1e-12, rtol=0)
        assert_states_close([(c[i : i + 1], s[i : i + 1]) for c, s in state], alone_state, atol=1e-12)
        if m == 0:  # nothing new: the row's state is untouched, bit for bit
            for (conv, ssm), (conv_b, ssm_b) in zip(state, before, strict=True):
                assert torch.equal(conv[i], conv_b[i]) and torch.equal(ssm[i], ssm_b[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padding_tokens_never_change_the_state(dtype):
    # Padding positions get dt = 0 and are left out of the conv window, so what they hold cannot matter.
    bb = tiny(dtype)
    lengths = torch.tensor([20, 6, 1])
    tokens = timeline(3, 20, seed=5)
    pad = torch.arange(20) >= lengths[:, None]
    _, start = bb.prefill(timeline(3, 25, seed=6))
    h_zero, s_zero = bb.prefill(tokens.masked_fill(pad, 0), start, lengths=lengths)
    h_junk, s_junk = bb.prefill(torch.where(pad, timeline(3, 20, seed=7), tokens), start, lengths=lengths)
    for (conv_a, ssm_a), (conv_b, ssm_b) in zip(s_zero, s_junk, strict=True):
        assert torch.equal(conv_a, conv_b) and torch.equal(ssm_a, ssm_b)
    assert torch.equal(h_zero[~pad], h_junk[~pad])
    # ... and the padded rows really did stop at their lengths: without lengths the states differ.
    _, s_unmasked = bb.prefill(tokens.masked_fill(pad, 0), start)
    assert not torch.allclose(s_unmasked[0][1][1], s_zero[0][1][1])


# ---- cost: the update touches the new tokens only ------------------------------------------------------


def test_update_processes_only_the_new_tokens(monkeypatch):
    bb = tiny()
    tokens = timeline(2, 307, seed=8)
    _, state = bb.prefill(tokens[:, :300])

    scanned, projected = [], []
    real_scan = mamba.selective_scan

    def spy_scan(u, *args, **kwargs):
        scanned.append((u.shape[-1], kwargs.get("h0") is not None))
        return real_scan(u, *args, **kwargs)

    monkeypatch.setattr(mamba, "selective_scan", spy_scan)
    hooks = [
        layer.mixer.in_proj.register_forward_hook(lambda mod, args, out: projected.append(args[0].shape[1]))
        for layer in bb.layers
    ]
    h, new_state = bb.prefill(tokens[:, 300:], state)
    for hook in hooks:
        hook.remove()

    n_layers = len(bb.layers)
    assert scanned == [(7, True)] * n_layers  # each layer scans the 7 new positions, from the carried state
    assert projected == [7] * n_layers
    assert h.shape == (2, 7, bb.d_model)
    # The state is a fixed size whatever the history: O(1) memory, O(M) work per update.
    fresh = bb.init_state(2)
    assert [tuple(t.shape) for s in new_state for t in s] == [tuple(t.shape) for s in fresh for t in s]


# ---- the training path did not move ---------------------------------------------------------------------


def test_training_forward_and_backward_match_the_reference_scan(monkeypatch):
    # prefill() added a second caller of the scan; forward() and its gradients must still be the function
    # the sequential reference defines.
    def outputs_and_grads(bb):
        bb.train()
        tokens = timeline(2, 150, seed=9)
        h = bb(tokens=tokens)
        (
            h * torch.randn(h.shape, generator=torch.Generator().manual_seed(10), dtype=h.dtype)
        ).sum().backward()
        return {"hidden": h.detach(), **{name: p.grad for name, p in bb.named_parameters()}}

    got = outputs_and_grads(tiny())

    def reference(*args, chunk_size=None, segment_size=None, **kwargs):
        return selective_scan_ref(*args, **kwargs)

    monkeypatch.setattr(mamba, "selective_scan", reference)
    want = outputs_and_grads(tiny())
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-10, rtol=1e-10, msg=name)


# ---- errors ---------------------------------------------------------------------------------------------


def test_bad_inputs_are_value_errors_that_name_the_value():
    bb = tiny()
    tokens = timeline(2, 5)
    _, state = bb.prefill(tokens)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, M\]"):
        bb.prefill(tokens[0], state)
    with pytest.raises(ValueError, match=r"M >= 1"):
        bb.prefill(tokens[:, :0], state)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\].*\[6, 2\]"):
        bb.prefill(tokens, state, lengths=torch.tensor([6, 2]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\]"):
        bb.prefill(tokens, state, lengths=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        bb.prefill(tokens, state, lengths=torch.tensor([5]))
    with pytest.raises(ValueError, match=r"integer"):
        bb.prefill(tokens, state, lengths=torch.tensor([5.0, 2.0]))
    with pytest.raises(ValueError, match=r"1 layer states but the model has 2 layers"):
        bb.prefill(tokens, state[:1])
