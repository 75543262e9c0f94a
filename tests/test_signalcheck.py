"""ehrlong.evaluation.signalcheck: the model's own outcome probability, read with a long and a short window.

An oracle model whose logits follow two facts of its context (the signal token seen, an outcome token
seen) makes every score computable by hand, so the tests pin which positions are read and that no
outcome, and nothing after the outcome timestamp, reaches a score.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ehrlong.evaluation.signalcheck import outcome_scores

VOCAB, FILLER, SIGNAL, OUTCOME, OTHER_OUTCOME = 8, 1, 2, 3, 4
BOOST = 3.0  # logit added to OUTCOME per fact seen


class Oracle(torch.nn.Module):
    """hidden[t] = (signal seen at or before t, an outcome seen at or before t); the head turns each fact
    into BOOST on OUTCOME's logit."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(2, VOCAB, bias=False)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[OUTCOME] = BOOST

    def backbone(self, tokens, times, mask):
        seen_signal = (tokens == SIGNAL).cumsum(1) > 0
        seen_outcome = ((tokens == OUTCOME) | (tokens == OTHER_OUTCOME)).cumsum(1) > 0
        return torch.stack([seen_signal, seen_outcome], -1).float()


def p_outcome(facts: int) -> float:
    return math.exp(BOOST * facts) / (math.exp(BOOST * facts) + VOCAB - 1)


def timeline(next_visit: list[int], signal_at: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """100 filler tokens at times 0..99 (the signal at `signal_at`), the prediction time at 99, then
    `next_visit` all at time 200 and two more tokens at 300."""
    tokens = [SIGNAL if i == signal_at else FILLER for i in range(100)] + next_visit + [OUTCOME, FILLER]
    times = list(range(100)) + [200] * len(next_visit) + [300, 300]
    return np.array(tokens), np.array(times, dtype=np.int64)


IDS = np.array([OUTCOME, OTHER_OUTCOME])


def test_long_window_reads_the_early_signal_and_short_does_not():
    tokens, times = timeline([FILLER, FILLER, OUTCOME, FILLER])
    long, short = outcome_scores(Oracle(), tokens, times, 99, IDS, length=1000, short=10)
    # Three positions predict the next timestamp up to its first outcome: the prediction-time token and
    # the two fillers. None has seen an outcome; only the long read has seen the signal.
    assert long[0] == pytest.approx(3 * p_outcome(1), rel=1e-5)
    assert short[0] == pytest.approx(3 * p_outcome(0), rel=1e-5)
    assert long[1] == pytest.approx(3 * (1 - p_outcome(1)) / (VOCAB - 1), rel=1e-5)


def test_signal_inside_the_short_window_gives_equal_reads():
    tokens, times = timeline([FILLER, OUTCOME], signal_at=95)
    long, short = outcome_scores(Oracle(), tokens, times, 99, IDS, length=1000, short=10)
    np.testing.assert_allclose(long, short, rtol=1e-6)


def test_nothing_at_or_after_the_first_outcome_reaches_a_score():
    base = outcome_scores(Oracle(), *timeline([FILLER, OTHER_OUTCOME]), 99, IDS, length=1000, short=10)
    # Another first outcome code, more codes after it, and a different later timestamp: same scores.
    for next_visit in ([FILLER, OUTCOME, OUTCOME, SIGNAL], [FILLER, OTHER_OUTCOME, FILLER, FILLER]):
        got = outcome_scores(Oracle(), *timeline(next_visit), 99, IDS, length=1000, short=10)
        np.testing.assert_allclose(got[0], base[0], rtol=1e-6)
        np.testing.assert_allclose(got[1], base[1], rtol=1e-6)
    # Two positions (prediction token, filler), neither has seen an outcome.
    assert base[0][0] == pytest.approx(2 * p_outcome(1), rel=1e-5)


def test_the_long_read_is_the_runs_window():
    """length=50 ends at the scored positions and cannot reach a signal 100 tokens back."""
    tokens, times = timeline([FILLER, OUTCOME])
    long, short = outcome_scores(Oracle(), tokens, times, 99, IDS, length=50, short=10)
    np.testing.assert_allclose(long, short, rtol=1e-6)


def test_nothing_after_the_prediction_time_gives_none():
    tokens, times = timeline([FILLER])
    assert outcome_scores(Oracle(), tokens, times, 400, IDS, length=1000, short=10) is None
    assert outcome_scores(Oracle(), tokens, times, -1, IDS, length=1000, short=10) is None
