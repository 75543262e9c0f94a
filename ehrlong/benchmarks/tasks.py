"""Long-context probe tasks on the EHR vocabulary: one generator class per task, each with its scorer.

EHR models follow no instructions, so RULER's tasks (Hsieh et al. 2024, "RULER: What's the Real
Context Size of Your Long-Context Language Models?") are recast as *next-token* questions over a real
patient haystack, with the tokenizer's reserved `[PROBE_i]` tokens as keys and values (they never occur
in patient data, so a haystack cannot contain an accidental answer):

    [PROBE_0]                 the query marker of frequent_codes
    [PROBE_1 .. PROBE_h]      keys and variable names  (h = (n_probe - 1) // 2: 31 of the default 64)
    [PROBE_h+1 .. ]           values                   (32 of the default 64)

A sample is `tokens [L]` with positions whose next-token prediction is scored: the logits at position
p predict token p + 1, so a model is asked "what comes after the query" and the answer is never in the
sequence after its own question. Retrieval tasks are scored by exact retrieval: the arg max over the
*candidate* tokens (the values; frequent_codes: its candidate codes) must be the answer. Candidates,
not the whole vocabulary, because a forced choice makes chance exactly 1 / n_candidates whatever the
model's prior over event codes, as RULER's fixed answer format (its `answer_prefix`) makes a string
match meaningful; the stricter arg max over the whole vocabulary is reported beside it (`score_vocab`).
Several answers at one position (multi-value, frequent codes) are scored as RULER's `string_match_all`:
the share of the answers among the model's top-k candidates (k = number of answers). Ties are broken
towards the lower candidate index (stable sort), so a constant model always picks the same candidate.

Depth d in [0, 1] is the share of the haystack before the first inserted token of the target (the
needle-in-a-haystack convention: 0 = start, 1 = right before the query). Other inserted tokens
(distractor needles, later hops) go to random depths, as RULER places every needle at random.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ehrlong.benchmarks.haystack import Draw, Haystack, depth_index, insert
from ehrlong.errors import ConfigError, DataError

MIN_PROBE_TOKENS = 16


@dataclass
class Sample:
    """One probe: the sequence, the positions it is scored at, and what was planted where."""

    task: Task
    length: int
    depth: float
    index: int
    tokens: np.ndarray  # int64 [L]
    times: np.ndarray  # float64 [L] days, non-decreasing
    inserted: np.ndarray  # bool [L]: probe / planted tokens (False: haystack or separator)
    answer_positions: np.ndarray  # int64 [A]: the logits here predict the answer (the next token)
    answers: list[np.ndarray]  # per answer position, the set of correct next tokens
    candidates: np.ndarray  # token ids the answer is chosen among (empty: the whole vocabulary)
    reference_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    reference_answers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    control_tokens: np.ndarray | None = None  # likelihood: the same sequence without the planted code
    meta: dict = field(default_factory=dict)

    @property
    def positions(self) -> np.ndarray:
        """All scored positions: answer positions, then reference positions."""
        return np.concatenate([self.answer_positions, self.reference_positions]).astype(np.int64)


@dataclass(frozen=True)
class ProbeTokens:
    marker: int
    keys: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, tokenizer) -> ProbeTokens:
        ids = np.asarray(tokenizer.probe_ids, dtype=np.int64)
        if len(ids) < MIN_PROBE_TOKENS:
            raise ConfigError(
                f"the run's tokenizer reserves {len(ids)} probe tokens (n_probe_tokens={len(ids)}); the "
                f"benchmark tasks need at least {MIN_PROBE_TOKENS} for keys and values. Train with a "
                "tokenizer recipe that keeps n_probe_tokens >= 16 (the default is 64)."
            )
        h = (len(ids) - 1) // 2
        return cls(int(ids[0]), ids[1 : 1 + h], ids[1 + h :])


def _key(name: str) -> int:
    return zlib.crc32(name.encode())


def sample_rngs(seed: int, task: str, length: int, depth: float, index: int):
    """(haystack rng, insertion rng) of one sample. The haystack depends on (seed, task, length, index)
    only, so the depths of one sample index share their haystack (paired depths, as Kamradt's
    needle-in-a-haystack grid reuses one document); insertions also depend on the depth."""
    hay = np.random.default_rng([seed, _key(task), length, index])
    ins = np.random.default_rng([seed, _key(task), length, int(round(depth * 1_000_000)), index])
    return hay, ins


def top_k_recall(logits: np.ndarray, answers: np.ndarray, candidates: np.ndarray | None) -> float:
    """Share of `answers` among the top len(answers) of `logits` (over `candidates`, or every id)."""
    k = len(answers)
    if candidates is None or len(candidates) == 0:
        top = np.argsort(-logits, kind="stable")[:k]
    else:
        top = candidates[np.argsort(-logits[candidates], kind="stable")[:k]]
    return len(set(top.tolist()) & set(np.asarray(answers).tolist())) / k


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1).numpy()


class Task:
    """Base: subclasses set name/metric/trainable and implement n_inserted, build, chance, score."""

    name: str = ""
    metric: str = "accuracy"
    trainable: bool = True  # retrieval tasks get the short probe fine-tune; zero-shot ones do not
    description: str = ""

    def n_inserted(self) -> int:
        """Tokens a sample adds to its haystack (needles, tail): L = haystack + n_inserted."""
        raise NotImplementedError

    def min_length(self) -> int:
        # The haystack must be at least as long as what is planted in it.
        return 2 * self.n_inserted()

    def chance(self, probes: ProbeTokens) -> float:
        raise NotImplementedError

    def build(self, hay: Haystack, draw: Draw, length: int, depth: float, rng) -> dict:
        raise NotImplementedError

    def sample(self, hay: Haystack, length: int, depth: float, rng_hay, rng, index: int = 0) -> Sample:
        if length < self.min_length():
            raise ConfigError(
                f"length {length} is too short for task {self.name}: it plants {self.n_inserted()} tokens "
                f"and needs a haystack at least as long, so lengths >= {self.min_length()}."
            )
        if not 0.0 <= depth <= 1.0:
            raise ConfigError(f"depth {depth} is outside [0, 1] (share of the haystack before the target).")
        draw = hay.draw(rng_hay, length - self.n_inserted())
        parts = self.build(hay, draw, length, depth, rng)
        meta = {"task": self.name, "length": length, "depth": depth, "haystack": len(draw.tokens)}
        meta.update(draw.meta())
        meta.update(parts.pop("meta", {}))
        sample = Sample(task=self, length=length, depth=depth, index=index, meta=meta, **parts)
        if len(sample.tokens) != length:  # a bug, not user input
            raise RuntimeError(f"{self.name} built {len(sample.tokens)} tokens for length {length}")
        return sample

    def score(self, sample: Sample, logits: np.ndarray, control: np.ndarray | None) -> dict[str, float]:
        """Per-sample metrics from the logits [P, V] at `sample.positions` (and of the control row)."""
        raise NotImplementedError


class RetrievalTask(Task):
    """Scored by exact retrieval at every answer position (top-k recall for k answers)."""

    def score(self, sample: Sample, logits: np.ndarray, control: np.ndarray | None) -> dict[str, float]:
        hits = [top_k_recall(logits[i], a, sample.candidates) for i, a in enumerate(sample.answers)]
        strict = [top_k_recall(logits[i], a, None) for i, a in enumerate(sample.answers)]
        return {"score": float(np.mean(hits)), "score_vocab": float(np.mean(strict))}


# ---------------------------------------------------------------------------------------------------
# RULER retrieval: needle variants
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Needle(RetrievalTask):
    """RULER's NIAH retrieval: a key-value needle `k v` (two probe tokens) at depth d; the query `k` ends
    the sample and the value must come next.

    - single: one needle.
    - multikey: the target needle plus `n - 1` distractor needles with other keys at random depths
      (RULER niah_multikey_1: 4 keys inserted, 1 queried).
    - multivalue: one key with `n` values, `k v1 k v2 ... k vn` at depth d; all n values must rank in the
      top n candidates at the query (RULER niah_multivalue, string_match_all).
    - multiquery: `n` needles `k1 v1 ... kn vn` at depth d, queried in a shuffled order at the end,
      `ki vi kj vj ... kl`: each query is scored at its own position; the values between the queries
      are given (teacher forcing), they do not reveal the other keys' values (RULER niah_multiquery).
    """

    variant: str = "single"
    n: int = 4

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"needle_{self.variant}"

    @property
    def metric(self) -> str:  # type: ignore[override]
        return f"recall@{self.n}" if self.variant == "multivalue" else "accuracy"

    @property
    def description(self) -> str:  # type: ignore[override]
        return (self.__doc__ or "").split("\n\n")[0]

    def n_inserted(self) -> int:
        if self.variant == "single":
            return 3
        if self.variant == "multikey":
            return 2 * self.n + 1
        if self.variant == "multivalue":
            return 2 * self.n + 1
        return 2 * self.n + 2 * self.n - 1  # multiquery: needles, then n queries with n - 1 given values

    def chance(self, probes: ProbeTokens) -> float:
        k = self.n if self.variant == "multivalue" else 1
        return k / len(probes.values)

    def build(self, hay, draw, length, depth, rng) -> dict:
        probes = ProbeTokens.of(hay.tokenizer)
        H = len(draw.tokens)
        p = depth_index(depth, H)
        n_keys = 1 if self.variant in ("single", "multivalue") else self.n
        n_values = 1 if self.variant == "single" else self.n
        keys = rng.choice(probes.keys, n_keys, replace=False)
        values = rng.choice(probes.values, n_values, replace=False)
        insertions: list[tuple[int, np.ndarray]] = []
        tail: list[int]
        if self.variant == "single":
            insertions.append((p, np.array([keys[0], values[0]])))
            tail, answers = [keys[0]], [values[:1]]
        elif self.variant == "multikey":
            insertions.append((p, np.array([keys[0], values[0]])))
            for k, v in zip(keys[1:], values[1:], strict=True):  # distractors at random depths
                insertions.append((int(rng.integers(0, H + 1)), np.array([k, v])))
            tail, answers = [keys[0]], [values[:1]]
        elif self.variant == "multivalue":
            insertions.append((p, np.stack([np.full(self.n, keys[0]), values], axis=1).ravel()))
            tail, answers = [keys[0]], [np.sort(values)]
        else:  # multiquery
            insertions.append((p, np.stack([keys, values], axis=1).ravel()))
            order = rng.permutation(self.n)
            tail = []
            for j in order[:-1]:
                tail += [keys[j], values[j]]
            tail.append(keys[order[-1]])
            answers = [values[j : j + 1] for j in order]
        built = insert(draw, insertions, np.asarray(tail))
        tail_start = length - len(tail)
        if self.variant == "multiquery":
            answer_positions = tail_start + 2 * np.arange(self.n)
        else:
            answer_positions = np.array([length - 1])
        return {
            "tokens": built.tokens,
            "times": built.times,
            "inserted": built.inserted,
            "answer_positions": answer_positions.astype(np.int64),
            "answers": [np.asarray(a, dtype=np.int64) for a in answers],
            "candidates": probes.values,
            "meta": {
                "target_start": built.starts[0],
                "haystack_before_target": p,
                "insert_starts": built.starts,
            },
        }


# ---------------------------------------------------------------------------------------------------
# RULER variable tracking
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariableTracking(RetrievalTask):
    """RULER VT: chains of assignments `X1 = V, X2 = X1, ..., X{h+1} = X{h}` (h hops) spread through the
    haystack; RULER asks for every variable that holds V. Next-token form: each assignment is the pair
    `Xi Xi-1` (`X1 V` for the first), the query is the chain's last variable and the answer is the value
    V, reached only by following the h hops back. The first assignment sits at depth d, the later hops at
    random depths after it (in chain order). Distractor chains (other variables, other values) go to
    random depths. With RULER's default of 1 chain the only value in the sample is V, so a model can
    answer by finding it without following hops, just as RULER's 1-chain VT can be solved by listing
    every `VAR` statement; `variable_tracking_distractors` (4 chains) closes that shortcut."""

    name: str = "variable_tracking"
    chains: int = 1
    hops: int = 4
    metric: str = "accuracy"

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"RULER variable tracking: {self.chains} chain(s) of {self.hops} hops; query the last variable"

    def n_inserted(self) -> int:
        return 2 * (self.hops + 1) * self.chains + 1

    def chance(self, probes: ProbeTokens) -> float:
        return 1 / len(probes.values)

    def build(self, hay, draw, length, depth, rng) -> dict:
        probes = ProbeTokens.of(hay.tokenizer)
        n_vars = (self.hops + 1) * self.chains
        if n_vars > len(probes.keys) or self.chains > len(probes.values):
            raise ConfigError(
                f"task {self.name} needs {n_vars} variable tokens and {self.chains} values; the run's "
                f"tokenizer has {len(probes.keys)} keys and {len(probes.values)} values (n_probe_tokens)."
            )
        H = len(draw.tokens)
        names = rng.choice(probes.keys, n_vars, replace=False).reshape(self.chains, self.hops + 1)
        values = rng.choice(probes.values, self.chains, replace=False)
        insertions: list[tuple[int, np.ndarray]] = []
        p0 = depth_index(depth, H)
        for c in range(self.chains):
            first = p0 if c == 0 else int(rng.integers(0, H + 1))
            later = np.sort(rng.integers(first, H + 1, self.hops))
            insertions.append((first, np.array([names[c, 0], values[c]])))
            for h in range(self.hops):
                insertions.append((int(later[h]), np.array([names[c, h + 1], names[c, h]])))
        built = insert(draw, insertions, np.array([names[0, -1]]))
        return {
            "tokens": built.tokens,
            "times": built.times,
            "inserted": built.inserted,
            "answer_positions": np.array([length - 1], dtype=np.int64),
            "answers": [np.array([values[0]], dtype=np.int64)],
            "candidates": probes.values,
            "meta": {
                "target_start": built.starts[0],
                "haystack_before_target": p0,
                "hop_starts": built.starts[: self.hops + 1],
            },
        }


# ---------------------------------------------------------------------------------------------------
# RULER aggregation: frequent codes
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrequentCodes(RetrievalTask):
    """RULER's frequent-words extraction (FWE/CWE) on event codes: `n_candidates` real event codes that
    do not occur in the haystack window are planted in it, `k` of them `frequent` times each and the
    others `rare` times each, at random positions in the part of the haystack after depth d, one of
    them exactly at d (d = 1: all right before the query). The query marker `[PROBE_0]` ends the
    sample; the k planted-frequent codes are the k most frequent of the candidates in the window, and
    must be the model's top k candidates there (recall@k, RULER's string_match_all). Candidates are
    codes absent from the window so that their window counts are exactly what was planted: chance is
    k / n_candidates, and a model's prior over common codes cannot answer (the most frequent codes of
    a real window are mostly the globally common ones, which a model that ignores the context would
    already rank first)."""

    name: str = "frequent_codes"
    k: int = 3
    n_candidates: int = 16
    frequent: int = 4
    rare: int = 1

    @property
    def metric(self) -> str:  # type: ignore[override]
        return f"recall@{self.k}"

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"RULER frequent words on codes: top-{self.k} of {self.n_candidates} planted codes"

    def n_inserted(self) -> int:
        return self.k * self.frequent + (self.n_candidates - self.k) * self.rare + 1

    def chance(self, probes: ProbeTokens) -> float:
        return self.k / self.n_candidates

    def build(self, hay, draw, length, depth, rng) -> dict:
        probes = ProbeTokens.of(hay.tokenizer)
        pool = np.setdiff1d(hay.event_codes(), draw.tokens)
        if len(pool) < self.n_candidates:
            raise DataError(
                f"task {self.name} at length {length}: only {len(pool)} event codes seen in train are "
                f"absent from the haystack window, it needs {self.n_candidates}. Use shorter lengths or "
                "a dataset with a larger vocabulary."
            )
        candidates = rng.choice(pool, self.n_candidates, replace=False)
        top = candidates[: self.k]  # candidates are in random order: the first k are the frequent ones
        planted = np.concatenate([np.repeat(top, self.frequent), np.repeat(candidates[self.k :], self.rare)])
        planted = planted[rng.permutation(len(planted))]
        H = len(draw.tokens)
        p0 = depth_index(depth, H)
        where = rng.integers(p0, H + 1, len(planted))
        where[0] = p0  # the first planted code marks the depth exactly (which code it is, is random)
        built = insert(
            draw,
            [(int(w), np.array([t])) for w, t in zip(where, planted, strict=True)],
            np.array([probes.marker]),
        )
        return {
            "tokens": built.tokens,
            "times": built.times,
            "inserted": built.inserted,
            "answer_positions": np.array([length - 1], dtype=np.int64),
            "answers": [np.sort(top).astype(np.int64)],
            "candidates": np.sort(candidates).astype(np.int64),
            "meta": {"target_start": min(built.starts), "haystack_before_target": p0},
        }


# ---------------------------------------------------------------------------------------------------
# EHR-specific, zero-shot
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyForward(Task):
    """Copy-forward / induction: a block of `block` consecutive haystack events (the patient's own, as a
    copy-forwarded note re-records earlier diagnoses) reappears at the end of the sample. Its first
    occurrence starts at depth d of the range it can start in (d = 1: it ends right where the copy
    begins). Score = the loss drop in nats per token, mean CE over the first occurrence minus mean CE
    over the copy, both on block tokens 2..m (the first token of a block is not predictable from the
    block): > 0 when the model uses having seen the block. No fine-tune; chance is 0 (a model blind to
    the earlier block predicts both occurrences alike). `copy_accuracy` is the share of copy tokens that
    are the model's arg max over the vocabulary."""

    name: str = "copy_forward"
    block: int = 32
    metric: str = "loss_drop_nats"
    trainable: bool = False
    description: str = "a block of earlier events reappears at the end: loss drop on the copy"

    def n_inserted(self) -> int:
        return self.block

    def chance(self, probes: ProbeTokens) -> float:
        return 0.0

    def build(self, hay, draw, length, depth, rng) -> dict:
        H, m = len(draw.tokens), self.block
        s = depth_index(depth, H - m)
        block = draw.tokens[s : s + m].copy()
        built = insert(draw, [], block)
        j = np.arange(1, m)
        return {
            "tokens": built.tokens,
            "times": built.times,
            "inserted": built.inserted,
            "answer_positions": (H + j - 1).astype(np.int64),
            "answers": [block[i : i + 1].astype(np.int64) for i in j],
            "candidates": np.zeros(0, dtype=np.int64),
            "reference_positions": (s + j - 1).astype(np.int64),
            "reference_answers": block[j].astype(np.int64),
            "meta": {"target_start": s, "haystack_before_target": s, "copy_start": H},
        }

    def score(self, sample, logits, control) -> dict[str, float]:
        A = len(sample.answer_positions)
        logp = _log_softmax(logits)
        copy_ans = np.array([a[0] for a in sample.answers])
        ce_copy = -logp[np.arange(A), copy_ans]
        ce_first = -logp[A + np.arange(len(sample.reference_answers)), sample.reference_answers]
        return {
            "score": float(ce_first.mean() - ce_copy.mean()),
            "ce_first": float(ce_first.mean()),
            "ce_copy": float(ce_copy.mean()),
            "copy_accuracy": float((logits[:A].argmax(-1) == copy_ans).mean()),
            "first_accuracy": float((logits[A:].argmax(-1) == sample.reference_answers).mean()),
        }


@dataclass(frozen=True)
class Likelihood(Task):
    """Zero-shot needle sensitivity: a rare code c (the rarer half of the event codes seen in train,
    absent from the haystack window) is planted at depth d; score = Δ log p(c as the next token at the
    end) between that sequence and a control where an equally rare code c' takes c's place (so both
    rows have the same length and one planted rare event, and c is absent from the control). Δ > 0: the
    model remembers the earlier occurrence. `hit` = share of samples with Δ > 0. Works for any trained
    run, no probe training; chance is 0."""

    name: str = "likelihood"
    metric: str = "delta_logp_nats"
    trainable: bool = False
    description: str = "Δ log p of a rare code at the end, planted earlier at depth d vs absent"

    def n_inserted(self) -> int:
        return 1

    def chance(self, probes: ProbeTokens) -> float:
        return 0.0

    def build(self, hay, draw, length, depth, rng) -> dict:
        codes = hay.event_codes()
        counts = hay.train_counts[codes]
        rare = codes[np.argsort(counts, kind="stable")[: max(2, len(codes) // 2)]]
        pool = np.setdiff1d(rare, draw.tokens)
        if len(pool) < 2:
            raise DataError(
                f"task {self.name} at length {length}: fewer than 2 of the {len(rare)} rare event codes "
                "are absent from the haystack window. Use shorter lengths or a dataset with a larger "
                "vocabulary."
            )
        c, c2 = rng.choice(pool, 2, replace=False)
        p = depth_index(depth, len(draw.tokens))
        main = insert(draw, [(p, np.array([c]))])
        control = insert(draw, [(p, np.array([c2]))])
        return {
            "tokens": main.tokens,
            "times": main.times,
            "inserted": main.inserted,
            "answer_positions": np.array([length - 1], dtype=np.int64),
            "answers": [np.array([c], dtype=np.int64)],
            "candidates": np.zeros(0, dtype=np.int64),
            "control_tokens": control.tokens,
            "meta": {
                "target_start": main.starts[0],
                "haystack_before_target": p,
                "code": int(c),
                "control_code": int(c2),
            },
        }

    def score(self, sample, logits, control) -> dict[str, float]:
        c = int(sample.answers[0][0])
        with_c = float(_log_softmax(logits[0])[c])
        without = float(_log_softmax(control[0])[c])
        delta = with_c - without
        return {"score": delta, "logp_with": with_c, "logp_without": without, "hit": float(delta > 0)}
