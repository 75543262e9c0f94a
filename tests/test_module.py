"""EHRLitModule: padding out of the loss, exact per-step token weighting, optimizer groups, schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ehrlong.config import OptimConfig
from ehrlong.data.batching import EventBatch
from ehrlong.module import EHRLitModule, chunked_cross_entropy, param_groups, position_buckets, warmup_cosine

VOCAB = 20


class BagBackbone(nn.Module):
    """A minimal causal backbone (cumulative mean of embeddings) to test the module in isolation."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.d_model = d
        self.embed = nn.Embedding(VOCAB, d, padding_idx=0)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, tokens=None, times=None, mask=None, embeddings=None):
        x = self.embed(tokens) if embeddings is None else embeddings
        x = x.cumsum(1) / torch.arange(1, x.shape[1] + 1)[None, :, None]
        return self.norm(self.proj(x))


def module(tie: bool = True, context_length: int = 64) -> EHRLitModule:
    torch.manual_seed(0)
    return EHRLitModule(BagBackbone(), VOCAB, OptimConfig(), 10, context_length, tie_embeddings=tie)


def batch(tokens: list[list[int]], lengths: list[int], step_targets: int | None = None) -> EventBatch:
    t = torch.tensor(tokens)
    mask = torch.arange(t.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    n = sum(max(0, x - 1) for x in lengths) if step_targets is None else step_targets
    return EventBatch(t, torch.zeros(t.shape, dtype=torch.float32), mask, step_targets=n)


def test_padding_never_enters_the_loss():
    m = module()
    a = batch([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12]], [4, 6])
    b = batch([[3, 4, 5, 6, 19, 2], [7, 8, 9, 10, 11, 12]], [4, 6])  # garbage where the mask is False
    la, _ = m.token_losses(a)
    lb, _ = m.token_losses(b)
    assert la.numel() == 3 + 5  # next-token targets at real positions only
    torch.testing.assert_close(la, lb)


def test_accumulated_micro_batches_equal_one_big_step():
    """Two micro-batches of different sizes, accumulated, give the gradient of the mean loss over all
    of the step's targets (what one big batch would give), not the mean of the two means."""
    rows = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 0, 0, 0], [12, 13, 14, 15, 16, 17]]
    lengths = [6, 3, 6]
    total = 5 + 2 + 5

    ref = module()
    losses, _ = ref.token_losses(batch(rows, lengths))
    losses.mean().backward()

    acc = module()
    acc._trainer = None  # outside a Trainer: accumulate = 1 per call, so scale by hand as Lightning would
    for part, plen in (([rows[0]], [6]), (rows[1:], [3, 6])):
        b = batch(part, plen, step_targets=total)
        part_losses, _ = acc.token_losses(b)
        (part_losses.sum() / b.step_targets).backward()
    for (n, p), q in zip(ref.named_parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_training_step_undoes_lightnings_division_by_accumulation_and_ranks():
    m = module()

    class T:  # the attributes training_step reads from the trainer
        accumulate_grad_batches = 4
        world_size = 2  # DDP averages gradients over ranks; step_targets counts every rank's targets

    m._trainer = T()
    m.log = lambda *a, **k: None
    b = batch([[3, 4, 5, 6]], [4], step_targets=12)
    loss = m.training_step(b, 0)
    losses, _ = m.token_losses(b)
    torch.testing.assert_close(loss, losses.sum() * 4 * 2 / 12)


def test_chunked_cross_entropy_matches_full(monkeypatch):
    import ehrlong.module as mod

    monkeypatch.setattr(mod, "LOSS_CHUNK", 7)
    h = torch.randn(30, 8, requires_grad=True)
    w = torch.randn(VOCAB, 8, requires_grad=True)
    y = torch.randint(0, VOCAB, (30,))
    full = nn.functional.cross_entropy(h @ w.T, y, reduction="none")
    chunked = chunked_cross_entropy(h, w, y)
    torch.testing.assert_close(chunked, full)
    with torch.no_grad():  # evaluation takes the plain chunked path
        torch.testing.assert_close(chunked_cross_entropy(h, w, y), full.detach())
    g_full = torch.autograd.grad(full.sum(), (h, w))
    g_chunk = torch.autograd.grad(chunked_cross_entropy(h, w, y).sum(), (h, w))
    for a, b in zip(g_full, g_chunk, strict=True):
        torch.testing.assert_close(a, b)


def test_no_weight_decay_on_norms_biases_embeddings_or_flagged():
    m = module()
    flagged = nn.Parameter(torch.ones(3, 3))
    flagged._no_weight_decay = True
    m.extra = nn.ParameterList([flagged])
    decay, no_decay = param_groups(m, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    assert id(m.backbone.proj.weight) in decay_ids
    for p in (m.backbone.proj.bias, m.backbone.norm.weight, m.backbone.embed.weight, flagged):
        assert id(p) not in decay_ids
    assert no_decay["weight_decay"] == 0.0
    # The tied head is the embedding: counted once, not decayed.
    assert m.head.weight is m.backbone.embed.weight
    n_params = len({id(p) for p in m.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def test_warmup_then_cosine_to_floor():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_position_buckets_cover_the_context():
    assert position_buckets(1024) == [0, 64, 128, 256, 512, 1024]
    assert position_buckets(16384)[-1] == 16384


def test_validation_loss_by_position_is_the_token_weighted_mean():
    m = module(context_length=128)
    m.log = lambda *a, **k: None
    b = batch([list(range(1, 20)) * 4], [76])
    m.on_validation_epoch_start()
    m.validation_step(b, 0)
    losses, positions = m.token_losses(b)
    losses = losses.detach()  # compared as plain floats below
    by_pos = m.val_loss_by_position()
    assert by_pos["0-64"] == pytest.approx(float(losses[positions < 64].mean()), rel=1e-5)
    assert by_pos["64-128"] == pytest.approx(float(losses[positions >= 64].mean()), rel=1e-5)
