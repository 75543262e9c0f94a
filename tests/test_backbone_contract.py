"""One contract, every registered backbone (DESIGN.md §7.6): shapes, causality, padding invariance,
gradients, determinism, and a short fit whose loss falls. A new backbone joins by registering."""

from __future__ import annotations

import pytest
import torch

from ehrlong.backbones import BACKBONES, build_backbone
from ehrlong.config import TrainConfig, parse
from ehrlong.data.batching import EventBatch
from ehrlong.module import EHRLitModule

VOCAB = 50
# hmt: segments short enough that the 32-64 token inputs below span 4-8 segments, so recall runs over
# several memories (with one memory its softmax is 1 and W_q, W_k, T would get no gradient).
CONTRACT_OVERRIDES = {
    "hmt": ["hmt.segment_length=8", "hmt.sensory=4", "hmt.memory_window=2", "hmt.bptt_segments=2"]
}


def tiny_cfg(name: str, *extra: str) -> TrainConfig:
    base = [f"backbone={name}", "model.d_model=32", "model.n_layers=2", "context_length=64"]
    return parse(TrainConfig, [*base, *CONTRACT_OVERRIDES.get(name, []), *extra])


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(tiny_cfg(name), VOCAB).eval()


def batch_of(tokens: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T = tokens.shape
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    times = torch.cumsum(torch.rand(B, T), dim=1) * mask
    return tokens * mask, times, mask


@pytest.fixture(params=sorted(BACKBONES))
def name(request):
    return request.param


def test_output_shape_and_d_model(name):
    bb = make(name)
    tokens, times, mask = batch_of(torch.randint(1, VOCAB, (3, 40)), [40, 40, 40])
    out = bb(tokens=tokens, times=times, mask=mask)
    assert out.shape == (3, 40, bb.d_model) and bb.d_model == 32
    # The embeddings entry point gives the same function as the tokens one.
    out2 = bb(embeddings=bb.embed(tokens), times=times, mask=mask)
    torch.testing.assert_close(out, out2)


def test_causal(name):
    bb = make(name)
    tokens, times, mask = batch_of(torch.randint(1, VOCAB, (2, 48)), [48, 48])
    ref = bb(tokens=tokens, times=times, mask=mask)
    # t = 17 sits early in an hmt segment (length 8): HMT's published summary of the current segment's
    # first half would leak tokens 18-19 into positions 16-17 there.
    for t in (17, 20):
        changed = tokens.clone()
        changed[:, t + 1 :] = torch.randint(1, VOCAB, changed[:, t + 1 :].shape)
        out = bb(tokens=changed, times=times, mask=mask)
        torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[:, t + 1 :], ref[:, t + 1 :])


def test_padding_invariance(name):
    bb = make(name)
    tokens, times, mask = batch_of(torch.randint(1, VOCAB, (2, 40)), [40, 25])
    padded = bb(tokens=tokens, times=times, mask=mask)
    alone = bb(tokens=tokens[1:, :25], times=times[1:, :25], mask=mask[1:, :25])
    torch.testing.assert_close(padded[1:, :25], alone, atol=1e-5, rtol=1e-5)
    # Garbage in the padded positions changes nothing at real positions either.
    garbage = tokens.clone()
    garbage[1, 25:] = torch.randint(1, VOCAB, (15,))
    again = bb(tokens=garbage, times=times, mask=mask)
    torch.testing.assert_close(again[1, :25], padded[1, :25], atol=1e-5, rtol=1e-5)


def _module(name: str, steps: int = 100, lr: float = 1e-2) -> EHRLitModule:
    cfg = tiny_cfg(name, f"optim.lr={lr}", "optim.warmup_steps=5")
    torch.manual_seed(0)
    return EHRLitModule(build_backbone(cfg, VOCAB), VOCAB, cfg.optim, steps, cfg.context_length)


def _event_batch(tokens: torch.Tensor, lengths: list[int]) -> EventBatch:
    tokens, times, mask = batch_of(tokens, lengths)
    return EventBatch(tokens, times, mask, step_targets=int(sum(n - 1 for n in lengths)))


def test_gradients_reach_every_parameter(name):
    module = _module(name)
    batch = _event_batch(torch.randint(1, VOCAB, (2, 32)), [32, 20])
    losses, _ = module.token_losses(batch)
    losses.mean().backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


def test_deterministic_under_seed(name):
    a, b = make(name, seed=3), make(name, seed=3)
    tokens, times, mask = batch_of(torch.randint(1, VOCAB, (2, 24)), [24, 24])
    torch.testing.assert_close(
        a(tokens=tokens, times=times, mask=mask), b(tokens=tokens, times=times, mask=mask)
    )
    c = make(name, seed=4)
    assert not torch.allclose(
        a(tokens=tokens, times=times, mask=mask), c(tokens=tokens, times=times, mask=mask)
    )


def test_short_fit_loss_falls(name):
    # A periodic sequence is learnable only from context: the loss must fall well below its start.
    module = _module(name, steps=60)
    opt = module.configure_optimizers()["optimizer"]
    pattern = torch.randint(1, VOCAB, (7,))
    seq = pattern.repeat(10)[:64].unsqueeze(0).repeat(2, 1)
    batch = _event_batch(seq, [64, 64])
    first = None
    for _ in range(60):
        losses, _ = module.token_losses(batch)
        loss = losses.mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first, (first, loss.item())
