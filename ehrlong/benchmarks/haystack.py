"""Haystacks: exactly n tokens of real patient timelines, drawn from one split of a token store.

A haystack of n tokens starts at a random subject. When its timeline holds at least n tokens, the
haystack is a random window of n consecutive tokens of it. When it is shorter, the whole timeline is
taken and further random subjects follow, each after one `[EOS]` separator token, until n tokens are
reached; the last subject contributes a random window of what is still needed. This is RULER's
(Hsieh et al. 2024) answer to a short essay: it concatenates Paul Graham essays until the haystack is
long enough. Nothing is dropped silently: every piece (subject, start, end within that subject's
timeline) and the number of separators are recorded in the sample's metadata and summarised per cell of
the results (`mean_subjects`, `share_concatenated`); on disk (per_sample.parquet) a subject is its position in
the token store, never its id. `[EOS]` ("this timeline ends") is the separator
because a haystack that would end one token after a full timeline simply ends with it.

Times are days since the first subject's first event, as training windows are (`batching.collate`);
each further subject starts at the time the previous piece ended, so times never decrease.
Subjects are drawn without replacement within a haystack; when a split holds fewer tokens than the
haystack needs, subjects are reused (counted in `repeated_subjects`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ehrlong.data.meds import SPLITS
from ehrlong.errors import ConfigError, DataError
from ehrlong.tokenizer import US_PER_DAY

SEPARATOR = "[EOS]"


@dataclass
class Piece:
    subject_id: int
    start: int  # token index within the subject's timeline
    end: int
    subject_index: int = -1  # the subject's position in the token store (subject_ids.npy)


@dataclass
class Draw:
    """One haystack: tokens [n] int64, times [n] float64 (days, non-decreasing) and where they came from."""

    tokens: np.ndarray
    times: np.ndarray
    pieces: list[Piece] = field(default_factory=list)
    separators: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # positions
    repeated_subjects: int = 0

    @property
    def subject_ids(self) -> list[int]:
        return [p.subject_id for p in self.pieces]

    def meta(self) -> dict:
        # subject_ids stay in memory (tests and callers check provenance with them); what is written to
        # disk is subject_indices, positions in the store, which name no one outside it (issue 8, privacy).
        return {
            "subject_ids": self.subject_ids,
            "subject_indices": [p.subject_index for p in self.pieces],
            "pieces": [(p.subject_id, p.start, p.end) for p in self.pieces],
            "n_subjects": len(self.pieces),
            "n_separators": int(len(self.separators)),
            "repeated_subjects": self.repeated_subjects,
        }


class Haystack:
    """Draws haystacks from the subjects of `split` of `store` (a TokenStore or anything with its arrays
    and `tokenizer`). Token counts of the train split (DESIGN.md §3: statistics from train only) give the
    pools of event codes that tasks plant or score."""

    def __init__(self, store, split: str = "held_out"):
        if split not in SPLITS:
            raise ConfigError(f"split={split!r}: valid splits are {', '.join(SPLITS)}.")
        self.store = store
        self.split = split
        self.tokenizer = store.tokenizer
        self.offsets = np.asarray(store.offsets, dtype=np.int64)
        lengths = np.diff(self.offsets)
        in_split = np.asarray(store.splits) == SPLITS.index(split)
        self.subjects = np.flatnonzero(in_split & (lengths > 0))
        if len(self.subjects) == 0:
            raise DataError(
                f"the {split} split of token store {getattr(store, 'root', '?')} has no subject with tokens "
                f"to build haystacks from; pick another split (valid: {', '.join(SPLITS)})."
            )
        self.n_tokens = int(lengths[self.subjects].sum())
        self.separator = int(self.tokenizer.token_to_id[SEPARATOR])
        self._train_counts: np.ndarray | None = None

    @property
    def train_counts(self) -> np.ndarray:
        """Occurrences of every token id in the train split (zeros when the store has no train subject)."""
        if self._train_counts is None:
            V = self.tokenizer.vocab_size
            train = np.asarray(self.store.splits) == SPLITS.index("train")
            in_train = np.repeat(train, np.diff(self.offsets))
            tokens = np.asarray(self.store.tokens)[in_train]
            self._train_counts = np.bincount(tokens, minlength=V)[:V].astype(np.int64)
        return self._train_counts

    def event_codes(self) -> np.ndarray:
        """Event-code token ids (ids from `first_code_id` on) seen in the train split, ascending."""
        first = self.tokenizer.first_code_id
        return first + np.flatnonzero(self.train_counts[first:] > 0)

    def draw(self, rng: np.random.Generator, n: int) -> Draw:
        if n < 1:
            raise ValueError(f"a haystack needs at least 1 token, got {n}")
        tokens_all, us_all, offsets = self.store.tokens, self.store.times_us, self.offsets
        ids = np.asarray(self.store.subject_ids)
        order = rng.permutation(self.subjects)
        tokens, times, pieces, seps = [], [], [], []
        remaining, k, base = n, 0, 0.0
        while remaining > 0:
            if pieces:  # a separator before every subject after the first
                seps.append(n - remaining)
                tokens.append(np.array([self.separator], dtype=np.int64))
                times.append(np.array([base]))
                remaining -= 1
                if remaining == 0:  # the haystack ends with the separator: the timeline ended there
                    break
            subj = int(order[k % len(order)])
            k += 1
            a, b = int(offsets[subj]), int(offsets[subj + 1])
            size = b - a
            if size <= remaining:
                start, end = 0, size
            else:  # a random window of what is still needed
                start = int(rng.integers(0, size - remaining + 1))
                end = start + remaining
            t_us = np.asarray(us_all[a + start : a + end], dtype=np.int64)
            if not pieces:  # days since this subject's first event, as in training
                t = (t_us - int(us_all[a])) / US_PER_DAY
            else:  # the next subject starts where the previous piece ended
                t = (t_us - t_us[0]) / US_PER_DAY + base
            tokens.append(np.asarray(tokens_all[a + start : a + end], dtype=np.int64))
            times.append(t)
            pieces.append(Piece(int(ids[subj]), start, end, subj))
            base = float(t[-1])
            remaining -= end - start
        return Draw(
            tokens=np.concatenate(tokens),
            times=np.concatenate(times),
            pieces=pieces,
            separators=np.asarray(seps, dtype=np.int64),
            repeated_subjects=max(0, k - len(order)),
        )


@dataclass
class Built:
    """A haystack with insertions: tokens, times, which positions were inserted, where each insertion's
    first token landed."""

    tokens: np.ndarray
    times: np.ndarray
    inserted: np.ndarray  # bool [L]
    starts: list[int]  # final position of each insertion's first token, in the order given


def insert(hay: Draw, insertions: list[tuple[int, np.ndarray]], tail: np.ndarray | None = None) -> Built:
    """Put each (haystack index p, tokens) before haystack token p (p = len: after the last one), then
    `tail` at the end. Insertions at the same index keep the order given. An inserted token takes the
    time of the haystack token before it (the first one's when p = 0), so times stay non-decreasing."""
    H = len(hay.tokens)
    order = sorted(range(len(insertions)), key=lambda i: insertions[i][0])  # stable
    toks, tims, ins = [], [], []
    starts = [0] * len(insertions)
    pos, cursor = 0, 0
    for i in order:
        p, what = insertions[i]
        if not 0 <= p <= H:
            raise ValueError(f"insertion index {p} outside the haystack [0, {H}]")
        what = np.asarray(what, dtype=np.int64)
        toks.append(hay.tokens[cursor:p])
        tims.append(hay.times[cursor:p])
        ins.append(np.zeros(p - cursor, dtype=bool))
        pos += p - cursor
        cursor = p
        starts[i] = pos
        toks.append(what)
        tims.append(np.full(len(what), hay.times[p - 1] if p > 0 else hay.times[0]))
        ins.append(np.ones(len(what), dtype=bool))
        pos += len(what)
    toks.append(hay.tokens[cursor:])
    tims.append(hay.times[cursor:])
    ins.append(np.zeros(H - cursor, dtype=bool))
    if tail is not None and len(tail):
        toks.append(np.asarray(tail, dtype=np.int64))
        tims.append(np.full(len(tail), hay.times[-1]))
        ins.append(np.ones(len(tail), dtype=bool))
    return Built(np.concatenate(toks), np.concatenate(tims), np.concatenate(ins), starts)


def depth_index(depth: float, size: int) -> int:
    """Haystack index for a depth in [0, 1]: round(depth * size), halves up (the needle-in-a-haystack
    convention: depth 0 = before the first token, 1 = after the last)."""
    return int(np.floor(depth * size + 0.5))
