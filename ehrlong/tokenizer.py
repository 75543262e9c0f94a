"""EventTokenizer: MEDS events -> one token per event (+ time-gap tokens), fit on the train split only.

Vocabulary layout (ids are stable for a fitted tokenizer and saved in tokenizer.json):

    [PAD]=0 [UNK] [BOS] [EOS] [MASK]  [PROBE_0] .. [PROBE_{n-1}]  [GAP_<name>] ..  code blocks ...

Each kept code owns a contiguous block: its plain slot (the code alone, used when the event has no
usable value), then one slot per numeric bin (`CODE|Q1` .. `CODE|Qk`) if the code had finite numeric
values in train, then one slot per frequent text value (`CODE|=TEXT`). An event's token is

    unknown code                               -> [UNK] (counted per code and split in the report)
    finite numeric_value and the code has bins -> its bin slot (bin = number of edges <= value)
    text_value whose (code, text) is in vocab  -> that text slot
    otherwise                                  -> the plain slot (each reason counted)

Bins are per-code quantiles of train values (edges at ranks floor(k(n-1)/n_bins), de-duplicated), as
in CLMBR / MOTOR (Steinberg et al.), so a value token says "low / normal / high for this lab".
Text values are first-class because over half of the MIMIC-IV demo's events carry one (categorical
chart values; blood pressure exists only as text): research/proto_tokenize_aces.md Part 1.

Time-gap tokens follow CEHR-BERT (Pang et al., 2021, "artificial time tokens"): before the first event
of a new timestamp whose gap to the subject's previous timestamp is at least the smallest bucket, one
`[GAP_<bucket>]` token, stamped with the time of the event it precedes so that a window cut at time t
never sees a gap token that announces an event after t. Static (null-time) events are stamped with the
subject's first timestamp. Times are int64 microseconds since the Unix epoch, MEDS's own resolution, so
a window cut at a prediction time compares them exactly (float64 days lose the last microsecond at
MIMIC-IV's shifted dates and could let an event 1 us after the cut in); batching makes them relative days.

The straightforward per-subject loop in `ehrlong.data.loop_tokenizer` implements the same rules and a
test holds this vectorised version to it byte for byte.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ehrlong import __version__
from ehrlong.config import TOKENIZERS_DIR, parse
from ehrlong.data.meds import CODE, EVENT_SCHEMA, NUMERIC_VALUE, SPLITS, SUBJECT_ID, TEXT_VALUE, TIME
from ehrlong.errors import ConfigError, DataError

FORMAT = "ehrlong.tokenizer"
FORMAT_VERSION = 1
US_PER_DAY = 86_400_000_000
SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = range(len(SPECIALS))
ALL_SPLITS = "all"  # report key when encode() is not given a split table


def bin_token(code: str, k: int) -> str:
    """Name of the k-th (1-based) numeric bin slot of `code`."""
    return f"{code}|Q{k}"


def text_token(code: str, text: str) -> str:
    return f"{code}|={text}"


def probe_token(i: int) -> str:
    return f"[PROBE_{i}]"


def gap_token(name: str) -> str:
    return f"[GAP_{name}]"


# ---------------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------------


@dataclass
class TimeGap:
    """One gap bucket: gaps in [min_days, next bucket's min_days) get the token [GAP_<name>]."""

    name: str = "1D"
    min_days: float = 1.0


def _cehr_gaps() -> list[TimeGap]:
    # CEHR-BERT's artificial time tokens (Pang et al., 2021) as the Context Clues ATT models use them
    # (research/anchor_context_clues.md §2.4): [DAY 1..6], [WEEK 1..4] for 7-29 days (gap // 7),
    # [MONTH 1..11] for 30-359 days (gap // 30), then [LONG TERM]. hf_ehr puts them between visits;
    # MEDS has no visit concept, so here they go between timestamps.
    days = [TimeGap(f"D{d}", d) for d in range(1, 7)]
    weeks = [TimeGap(f"W{w}", 7 * w) for w in range(1, 5)]
    months = [TimeGap(f"M{m}", 30 * m) for m in range(1, 12)]
    return [*days, *weeks, *months, TimeGap("LT", 360)]


@dataclass
class TokenizerRecipe:
    """How a tokenizer is fit. Recipes in tokenizers/NAME.yaml hold only overrides of these defaults."""

    name: str = ""  # empty: the recipe file's name
    description: str = ""
    min_code_count: int = 5  # codes seen fewer times in train map to [UNK]
    n_bins: int = 10  # numeric quantile bins per code (fewer when train values repeat)
    text_values: bool = True  # (code, text_value) tokens; false: text values are ignored (and counted)
    min_text_count: int = 5  # (code, text) pairs seen fewer times in train use the code's plain slot
    # ... or seen in fewer train subjects. A text slot's string is saved in tokenizer.json, which travels
    # with every run and its MLflow artifacts: at a real site, raise this (e.g. 5) so that a free-text
    # value only a few patients have never becomes one; their events keep the code's plain slot. 1 keeps
    # every recorded result reproducible (on the 100-patient MIMIC-IV demo, 5 would turn 1,111 of its
    # 2,392 text values, mostly chart categories one ICU stay used, into plain slots).
    min_text_subjects: int = 1
    n_probe_tokens: int = 64  # reserved [PROBE_i] tokens for long-context probes (needle-in-a-haystack)
    time_gaps: list[TimeGap] = field(default_factory=_cehr_gaps)  # [] = no time tokens (CLMBR-like)


def list_recipes(directory: Path = TOKENIZERS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def recipe_path(name_or_path: str | Path, directory: Path = TOKENIZERS_DIR) -> Path:
    """`cehr` -> tokenizers/cehr.yaml; a path to a .yaml file is taken as is."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"tokenizer recipe file {path} does not exist. Pass a recipe name "
                f"({', '.join(list_recipes(directory))}) or a path to a recipe YAML."
            )
        return path
    path = directory / f"{text}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown tokenizer recipe {text!r}. Valid recipes: {', '.join(list_recipes(directory))} "
            f"(files in {directory.name}/), or pass a path to a recipe YAML."
        )
    return path


def load_recipe(name_or_path: str | Path, directory: Path = TOKENIZERS_DIR) -> TokenizerRecipe:
    """A recipe by name (tokenizers/NAME.yaml) or path; unknown keys and bad values are errors."""
    path = recipe_path(name_or_path, directory)
    recipe = parse(
        TokenizerRecipe,
        [f"config={path.stem}"],
        presets_dir=path.parent,
        prog=f"tokenizer recipe {path}",
        preset_kind="tokenizer recipe",
    )
    if not recipe.name:
        recipe.name = path.stem
    check_recipe(recipe, where=str(path))
    return recipe


def check_recipe(recipe: TokenizerRecipe, where: str = "the tokenizer recipe") -> None:
    def bad(key: str, rule: str) -> ConfigError:
        return ConfigError(f"{key}={getattr(recipe, key)!r} in {where}: {rule}.")

    for key in ("min_code_count", "n_bins", "min_text_count", "min_text_subjects"):
        if getattr(recipe, key) < 1:
            raise bad(key, "must be >= 1")
    if recipe.n_probe_tokens < 0:
        raise bad("n_probe_tokens", "must be >= 0")
    days = [g.min_days for g in recipe.time_gaps]
    names = [g.name for g in recipe.time_gaps]
    if any(d <= 0 for d in days) or any(b <= a for a, b in itertools.pairwise(days)):
        raise ConfigError(f"time_gaps in {where}: min_days must be > 0 and strictly increasing, got {days}.")
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"time_gaps in {where}: names must be non-empty and unique, got {names}.")


def recipe_dict(recipe: TokenizerRecipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_from_dict(d: dict) -> TokenizerRecipe:
    d = dict(d)
    d.setdefault("min_text_subjects", 1)  # saved before the field existed: pairs were kept by count only
    d["time_gaps"] = [TimeGap(**g) for g in d.get("time_gaps", [])]
    return TokenizerRecipe(**d)


def recipe_hash(recipe: TokenizerRecipe) -> str:
    return hashlib.sha256(json.dumps(recipe_dict(recipe), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Encode output
# ---------------------------------------------------------------------------------------------------


@dataclass
class SplitUnk:
    events: int = 0  # events encoded in this split
    unk: int = 0  # of which [UNK]
    codes: dict[str, int] = field(default_factory=dict)  # unknown code -> count, most frequent first


@dataclass
class EncodeReport:
    """What encode() did with every event that did not simply become its code's token."""

    n_events: int = 0  # events read
    n_tokens: int = 0  # tokens written (events of kept subjects + gap tokens)
    n_gap_tokens: int = 0
    n_subjects: int = 0  # subjects encoded
    input_sorted: bool = True  # False: input was re-sorted stably by (subject_id, time), null times first
    n_static_events: int = 0  # null-time events, stamped with their subject's first timestamp
    n_numeric_binned: int = 0
    n_text_tokens: int = 0
    n_numeric_no_bins: int = 0  # finite value on a code with no train numerics -> plain slot
    n_nonfinite_numeric: int = 0  # NaN / inf values, treated as null
    n_text_unmatched: int = 0  # (code, text) not in vocab -> plain slot
    n_text_ignored: int = 0  # text value not used: the numeric bin took precedence, or text_values=false
    excluded_subjects: list[int] = field(default_factory=list)  # no timed event: cannot be placed in time
    n_excluded_events: int = 0
    unk: dict[str, SplitUnk] = field(default_factory=dict)  # split (or "all") -> unknown-code counts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def merge(cls, reports: Sequence[EncodeReport]) -> EncodeReport:
        """The report of encoding subject-disjoint parts one after the other: counts add up, unknown codes
        too (most frequent first, as one encode lists them); input_sorted holds if no part was re-sorted."""
        out = cls(input_sorted=all(r.input_sorted for r in reports))
        for f in dataclasses.fields(cls):
            if f.type == "int":
                setattr(out, f.name, sum(getattr(r, f.name) for r in reports))
        out.excluded_subjects = sorted(s for r in reports for s in r.excluded_subjects)
        for name in dict.fromkeys(k for r in reports for k in r.unk):
            parts = [r.unk[name] for r in reports if name in r.unk]
            codes: dict[str, int] = {}
            for part in parts:
                for code, n in part.codes.items():
                    codes[code] = codes.get(code, 0) + n
            out.unk[name] = SplitUnk(
                events=sum(p.events for p in parts),
                unk=sum(p.unk for p in parts),
                codes=dict(sorted(codes.items(), key=lambda kv: (-kv[1], kv[0]))),
            )
        return out


@dataclass
class EncodedEvents:
    """A whole dataset as flat arrays; subject i owns tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32 [N]
    times_us: np.ndarray  # int64 [N], microseconds since the Unix epoch
    offsets: np.ndarray  # int64 [S+1]
    subject_ids: np.ndarray  # int64 [S], ascending
    split_index: np.ndarray | None  # int8 [S] index into SPLITS, when encode() was given splits
    report: EncodeReport

    @classmethod
    def concat(cls, parts: Sequence[EncodedEvents]) -> EncodedEvents:
        """Subject-disjoint encodings as one, subjects ascending: what encode() gives for all their events."""
        if len(parts) == 1:  # one chunk (cohorts under store.CHUNK_EVENTS): nothing to join
            return parts[0]
        sizes = [len(p.tokens) for p in parts]
        shifts = np.cumsum([0, *sizes])
        offsets = np.concatenate(
            [p.offsets[:-1] + k for p, k in zip(parts, shifts, strict=False)] + [shifts[-1:]]
        )
        splits = (
            None
            if any(p.split_index is None for p in parts)
            else np.concatenate([p.split_index for p in parts])
        )
        report = EncodeReport.merge([p.report for p in parts])
        tokens, times_us, offsets, subject_ids, splits = _ascending_subjects(
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.times_us for p in parts]),
            offsets.astype(np.int64),
            np.concatenate([p.subject_ids for p in parts]),
            splits,
        )
        return cls(tokens, times_us, offsets, subject_ids, splits, report)


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


class EventTokenizer:
    """A fitted vocabulary plus the rules that turn events into ids. Build with `fit` or `load`."""

    def __init__(
        self,
        recipe: TokenizerRecipe,
        codes: Sequence[str],
        edges: Sequence[Sequence[float] | None],
        texts: Sequence[Sequence[str]],
        fit_stats: dict | None = None,
    ):
        """`codes` sorted; per code its bin edges (None: no train numerics) and its text values.

        Edges are put in canonical form here (float32, sorted, unique, no -0.0), so both fit
        implementations and a loaded tokenizer.json map values, and hash, identically.
        """
        if list(codes) != sorted(codes) or len(set(codes)) != len(codes):
            raise ValueError("codes must be sorted and unique")
        self.recipe = recipe
        self.codes = list(codes)
        # +0.0 turns -0.0 into 0.0 so equal edges de-duplicate and hash alike (research/proto_tokenize_aces.md
        # §2.1: -0.0 vs +0.0 was a real mismatch); polars folds `x + 0.0` away, numpy does not.
        self.edges = [
            None if e is None else np.unique(np.asarray(e, np.float32) + np.float32(0.0)) for e in edges
        ]
        self.texts = [sorted(t) for t in texts]
        self.fit_stats = fit_stats or {}
        self._build_vocab()

    # -- vocabulary ---------------------------------------------------------------------------------

    def _build_vocab(self) -> None:
        r = self.recipe
        vocab = list(SPECIALS) + [probe_token(i) for i in range(r.n_probe_tokens)]
        self.probe_ids = np.arange(len(SPECIALS), len(vocab), dtype=np.int32)
        self.gap_ids = np.arange(len(vocab), len(vocab) + len(r.time_gaps), dtype=np.int32)
        vocab += [gap_token(g.name) for g in r.time_gaps]
        # Gap thresholds in integer microseconds so bucket choice is exact (and identical in the loop).
        self.gap_us = np.array([round(g.min_days * US_PER_DAY) for g in r.time_gaps], dtype=np.int64)

        n = len(self.codes)
        self.code_slot = np.empty(n, dtype=np.int32)
        text_rows: list[tuple[int, str, int]] = []
        for i, code in enumerate(self.codes):
            self.code_slot[i] = len(vocab)
            vocab.append(code)
            if self.edges[i] is not None:
                vocab += [bin_token(code, k) for k in range(1, len(self.edges[i]) + 2)]
            for text in self.texts[i]:
                text_rows.append((i, text, len(vocab)))
                vocab.append(text_token(code, text))

        self.id_to_token = vocab
        self.token_to_id = {t: i for i, t in enumerate(vocab)}
        if len(self.token_to_id) != len(vocab):
            dup = sorted(t for t, n in collections.Counter(vocab).items() if n > 1)[:5]
            raise DataError(
                f"token names collide: {dup}. A code contains '|Q<k>' or '|=' or is named like a "
                f"special token; rename those codes in the MEDS data."
            )

        # Lookup tables indexed by code index; the extra last row serves index -1 (unknown code).
        self._slot = np.append(self.code_slot, np.int32(UNK_ID))
        self._has_bins = np.array([e is not None for e in self.edges] + [False])
        width = max([len(e) for e in self.edges if e is not None], default=0)
        self._edges_by_rank = np.full((width, n + 1), np.inf, dtype=np.float32)  # [k, code]: contiguous per k
        for i, e in enumerate(self.edges):
            if e is not None:
                self._edges_by_rank[: len(e), i] = e
        self._text_rows = text_rows
        self._code_index = dict(zip(self.codes, range(n), strict=True))  # code -> index, for replace_strict

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    @property
    def first_code_id(self) -> int:
        """Ids below this are specials, probe and time-gap tokens; ids from it on are event codes."""
        return len(SPECIALS) + len(self.probe_ids) + len(self.gap_ids)

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    mask_id = MASK_ID

    def decode(self, token_ids: Sequence[int] | np.ndarray) -> list[str]:
        ids = np.asarray(token_ids, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise DataError(
                f"token id {int(bad[0])} is outside this tokenizer's vocabulary "
                f"(0..{self.vocab_size - 1}); the tokens come from a different tokenizer."
            )
        return [self.id_to_token[i] for i in ids.tolist()]

    # -- fit ----------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        events: pl.LazyFrame | pl.DataFrame,
        train_subject_ids: Sequence[int] | np.ndarray,
        recipe: TokenizerRecipe,
    ) -> EventTokenizer:
        """Vocabulary, bin edges and text values from the events of `train_subject_ids` only."""
        check_recipe(recipe)
        ids = pl.Series(SUBJECT_ID, np.asarray(train_subject_ids, dtype=np.int64))
        train = collect_events(events.lazy().filter(pl.col(SUBJECT_ID).is_in(ids.implode())))
        code_ids = train[CODE].to_physical().to_numpy()  # categorical ids: counting is a bincount
        count_of_id = np.bincount(code_ids)
        present = train[CODE].unique()
        counts = count_of_id[present.to_physical().to_numpy()]
        kept = counts >= recipe.min_code_count
        codes = sorted(present.filter(kept).cast(pl.String).to_list())
        in_vocab = pl.Series(count_of_id[code_ids] >= recipe.min_code_count)
        finite = pl.col(NUMERIC_VALUE).is_finite().fill_null(False)

        # Edge k at rank floor(k (n-1) / n_bins) of the sorted values: the "lower" quantile, in integers.
        rank = (pl.int_range(1, recipe.n_bins, dtype=pl.Int64) * (pl.len() - 1)) // recipe.n_bins
        train = train.lazy()
        numeric_q = (
            train.filter(finite & in_vocab).group_by(CODE).agg(pl.col(NUMERIC_VALUE).sort().gather(rank))
        )
        text_q = (
            train.filter(pl.col(TEXT_VALUE).is_not_null() & ~finite & in_vocab)
            .group_by(CODE, TEXT_VALUE)
            .agg(pl.len().alias("n"), pl.col(SUBJECT_ID).n_unique().alias("subjects"))
            .filter((pl.col("n") >= recipe.min_text_count) & (pl.col("subjects") >= recipe.min_text_subjects))
            .group_by(CODE)
            .agg(pl.col(TEXT_VALUE))
        )
        queries = [numeric_q, text_q] if recipe.text_values else [numeric_q]
        numeric, *text = pl.collect_all(queries)
        edges_of = dict(zip(numeric[CODE].cast(pl.String), numeric[NUMERIC_VALUE].to_list(), strict=True))
        texts_of = {}
        if text:
            texts = text[0][TEXT_VALUE].cast(pl.List(pl.String)).to_list()
            texts_of = dict(zip(text[0][CODE].cast(pl.String), texts, strict=True))

        stats = {
            "train_subjects": ids.n_unique(),
            "train_events": len(code_ids),
            "codes_seen": len(counts),
            "codes_kept": len(codes),
            "codes_below_min_count": len(counts) - len(codes),
            "train_events_below_min_count": int(counts[~kept].sum()),
        }
        return cls(
            recipe, codes, [edges_of.get(c) for c in codes], [texts_of.get(c, []) for c in codes], stats
        )

    # -- encode -------------------------------------------------------------------------------------

    def encode(
        self, events: pl.LazyFrame | pl.DataFrame, splits: pl.DataFrame | None = None
    ) -> EncodedEvents:
        """Every event of every subject -> token ids, times and per-subject offsets (subjects ascending).

        `splits` (subject_id, split) adds per-split UNK counts and `split_index`; every subject with
        events must be in it.
        """
        df = collect_events(events)
        report = EncodeReport(n_events=df.height)
        df, cols = self._in_order(df, report)
        df, cols = _drop_subjects_without_time(df, cols, splits, report)

        sid = cols[SUBJECT_ID].to_numpy()
        vidx = self._code_indices(df[CODE])
        tokens = self._event_tokens(cols, vidx, report)
        starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]]) if len(sid) else np.zeros(0, np.int64)
        subject_ids = sid[starts]
        split_index = None if splits is None else _split_index(subject_ids, splits)
        report.unk = _unk_report(df, vidx, starts, split_index)
        report.n_static_events = int(cols["static"].sum())

        t_us = cols[TIME].to_numpy().astype(np.int64, copy=False)
        tokens, times, offsets = self._insert_gaps(tokens, t_us, starts)
        report.n_gap_tokens = len(tokens) - len(sid)
        report.n_tokens, report.n_subjects = len(tokens), len(subject_ids)
        tokens, times, offsets, subject_ids, split_index = _ascending_subjects(
            tokens, times, offsets, subject_ids, split_index
        )
        return EncodedEvents(tokens, times, offsets, subject_ids, split_index, report)

    def _in_order(self, df: pl.DataFrame, report: EncodeReport) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Events and their columns, each subject contiguous and time-ordered; re-sorted only if needed."""
        cols = self._columns(df)
        if _in_subject_time_order(cols):
            return df, cols
        report.input_sorted = False
        df = df.sort([SUBJECT_ID, TIME], nulls_last=False, maintain_order=True)
        return df, self._columns(df)

    def _columns(self, df: pl.DataFrame) -> pl.DataFrame:
        """Per event: subject, time in us (statics filled), whether it has a timed event, value flags."""
        t = pl.col(TIME).cast(pl.Int64)
        # Null times sort first within a subject, so a backward fill stamps statics with the subject's
        # first timestamp; a subject whose fill comes from another subject has no timestamp at all.
        owner = pl.when(t.is_not_null()).then(pl.col(SUBJECT_ID)).backward_fill()
        x = pl.col(NUMERIC_VALUE)
        return df.select(
            pl.col(SUBJECT_ID),
            t.backward_fill().alias(TIME),
            t.is_null().alias("static"),
            (owner == pl.col(SUBJECT_ID)).fill_null(False).alias("timed"),
            x,
            x.is_finite().fill_null(False).alias("finite"),
            (x.is_not_null() & ~x.is_finite()).fill_null(False).alias("nonfinite"),
            pl.col(TEXT_VALUE),
        )

    def _code_indices(self, codes: pl.Series) -> np.ndarray:
        """Index into self.codes per event, -1 for unknown codes: a lookup on the categorical's ids."""
        present = codes.unique()
        ids = present.to_physical().to_numpy()
        lookup = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int32)
        lookup[ids] = present.cast(pl.String).replace_strict(
            self._code_index, default=-1, return_dtype=pl.Int32
        )
        return lookup[codes.to_physical().to_numpy()]

    def _event_tokens(self, cols: pl.DataFrame, vidx: np.ndarray, report: EncodeReport) -> np.ndarray:
        known = vidx >= 0
        finite = cols["finite"].to_numpy()
        has_text = cols[TEXT_VALUE].is_not_null().to_numpy() & known
        tokens = self._slot[vidx]  # index -1 reads the appended [UNK] row
        binned = finite & self._has_bins[vidx]
        rows = np.flatnonzero(binned)
        values = cols[NUMERIC_VALUE].gather(rows).to_numpy()
        tokens[rows] += 1 + self._bin_of(vidx[rows], values)

        report.n_numeric_binned = len(rows)
        report.n_numeric_no_bins = int((finite & known & ~binned).sum())
        report.n_nonfinite_numeric = int(cols["nonfinite"].sum())
        if not self.recipe.text_values:
            report.n_text_ignored = int(has_text.sum())
            return tokens
        report.n_text_ignored = int((has_text & binned).sum())
        text_rows = np.flatnonzero(has_text & ~binned)
        keys = _pair_keys(vidx[text_rows], cols[TEXT_VALUE].gather(text_rows))
        table_keys, table_tokens = self._text_lookup()
        pos = np.minimum(np.searchsorted(table_keys, keys), max(len(table_keys) - 1, 0))
        hit = table_keys[pos] == keys if len(table_keys) else np.zeros(len(keys), dtype=bool)
        tokens[text_rows[hit]] = table_tokens[pos[hit]]
        report.n_text_tokens = int(hit.sum())
        report.n_text_unmatched = len(text_rows) - report.n_text_tokens
        return tokens

    def _text_lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted (code, text) pair keys, their token ids) in this process's categorical text ids."""
        vidx, texts, ids = zip(*self._text_rows, strict=True) if self._text_rows else ((), (), ())
        keys = _pair_keys(
            np.array(vidx, dtype=np.int64), pl.Series(texts, dtype=pl.String).cast(pl.Categorical)
        )
        order = np.argsort(keys)
        return keys[order], np.array(ids, dtype=np.int32)[order]

    def _bin_of(self, vidx: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Number of the code's edges <= x; one pass per edge keeps memory at O(rows)."""
        out = np.zeros(len(x), dtype=np.int32)
        for edge_k in self._edges_by_rank:
            out += x >= edge_k[vidx]  # padding is +inf and x is finite: never counted
        return out

    def _insert_gaps(self, tokens: np.ndarray, t_us: np.ndarray, starts: np.ndarray):
        """Gap tokens before the first event of a new timestamp, stamped with that event's time."""
        gap = np.diff(t_us, prepend=t_us[:1])
        gap[starts] = 0  # no gap token before a subject's first event
        at = np.flatnonzero(gap >= self.gap_us[0]) if len(self.gap_us) else np.zeros(0, dtype=np.int64)
        gap_tokens = self.gap_ids[np.searchsorted(self.gap_us, gap[at], side="right") - 1]
        tokens = np.insert(tokens, at, gap_tokens)
        times_us = np.insert(t_us, at, t_us[at])
        # A subject's first event never gets a gap token, so every gap inserted at index < start
        # belongs to an earlier subject.
        offsets = np.append(starts + np.searchsorted(at, starts, side="left"), len(tokens)).astype(np.int64)
        return tokens, times_us, offsets

    # -- save / load --------------------------------------------------------------------------------

    @functools.cached_property
    def hash(self) -> str:
        """Identity of the event -> id mapping: vocabulary, bin edges and gap thresholds.

        A checkpoint stores it so that loading it with a different tokenizer is detected.
        """
        content = {
            "format_version": FORMAT_VERSION,
            "vocab": self.id_to_token,
            "edges": [None if e is None else e.tolist() for e in self.edges],
            "gap_us": self.gap_us.tolist(),
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "ehrlong_version": __version__,
            "hash": self.hash,
            "vocab_size": self.vocab_size,
            "recipe": recipe_dict(self.recipe),
            "fit_stats": self.fit_stats,
            "codes": [
                {"code": c, "edges": None if e is None else e.tolist(), "texts": t}
                for c, e, t in zip(self.codes, self.edges, self.texts, strict=True)
            ],
            "vocab": self.id_to_token,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> EventTokenizer:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(
                f"cannot read tokenizer {path}: {e}. It is written by `python -m ehrlong.data "
                f"tokenize` and saved beside every checkpoint; re-create it there."
            ) from None
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            got = (d.get("format"), d.get("format_version")) if isinstance(d, dict) else type(d).__name__
            raise DataError(
                f"{path} is not an ehrlong tokenizer of format version {FORMAT_VERSION} (found {got!r}); "
                "re-create it with `python -m ehrlong.data tokenize` (a run directory keeps the one it was "
                "trained with)."
            )
        try:
            codes = d["codes"]
            tok = cls(
                recipe_from_dict(d["recipe"]),
                [c["code"] for c in codes],
                [c["edges"] for c in codes],
                [c["texts"] for c in codes],
                d.get("fit_stats"),
            )
            consistent = tok.id_to_token == d["vocab"] and tok.hash == d["hash"]
        except (KeyError, TypeError, ValueError, ConfigError) as e:  # a field missing or of the wrong kind
            raise DataError(
                f"{path} is damaged ({type(e).__name__}: {e}): not the tokenizer ehrlong wrote. Re-create it "
                "with `python -m ehrlong.data tokenize`, or copy it back from the run it belongs to."
            ) from None
        if not consistent:
            raise DataError(
                f"{path} is inconsistent: its vocabulary or hash does not match its codes and "
                f"recipe (edited or corrupted). Re-create it with `python -m ehrlong.data tokenize`."
            )
        return tok


# ---------------------------------------------------------------------------------------------------
# Helpers shared with the loop reference
# ---------------------------------------------------------------------------------------------------


def collect_events(events: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """The five event columns in EVENT_SCHEMA, except `code` and `text_value` as Categorical.

    Codes and text values are few and repeat; one string hash per event here turns every later
    operation on them (counts, vocabulary lookups) into integer work. Categorical columns are kept.
    """
    lf = events.lazy()
    schema = lf.collect_schema()
    missing = [c for c in (SUBJECT_ID, TIME, CODE) if c not in schema]
    if missing:
        raise DataError(f"events lack column(s) {missing}; read them with ehrlong.data.meds.scan_events.")
    dtypes = {**EVENT_SCHEMA, CODE: pl.Categorical, TEXT_VALUE: pl.Categorical}
    cols = [
        (pl.col(c) if schema[c] == dtypes[c] else pl.col(c).cast(dtypes[c]))
        if c in schema
        else pl.lit(None, dtypes[c]).alias(c)
        for c in (SUBJECT_ID, TIME, CODE, NUMERIC_VALUE, TEXT_VALUE)
    ]
    try:
        df = lf.select(cols).collect()
    except (pl.exceptions.ComputeError, OSError) as e:
        # Footers, columns and types were checked when the shards were scanned (ehrlong.data.meds), so
        # this is a data page that cannot be decoded: a corrupt file.
        raise DataError(
            f"the MEDS events could not be read ({str(e).strip().splitlines()[0]}): a shard is probably "
            "corrupt. `python -m ehrlong.data validate data=ROOT` names the file; copy it again or re-run "
            "the ETL that wrote it."
        ) from None
    nulls = {c: df[c].null_count() for c in (SUBJECT_ID, CODE)}
    if any(nulls.values()):
        found = ", ".join(f"{n:,} null {c!r}" for c, n in nulls.items() if n)
        raise DataError(
            f"the MEDS events have {found} values: MEDS requires subject_id and code on every event. "
            "`python -m ehrlong.data validate data=ROOT` names the file and row of each; fix the ETL or drop "
            "those rows."
        )
    return df


def _pair_keys(vidx: np.ndarray, texts: pl.Series) -> np.ndarray:
    """One int64 per (code index, categorical text id): exact keys for a sorted lookup."""
    return (vidx.astype(np.int64) << 32) | texts.to_physical().to_numpy().astype(np.int64)


def _in_subject_time_order(cols: pl.DataFrame) -> bool:
    """Each subject's events contiguous and in time order, statics first? Subject order is free."""
    sid, t, static = (cols[c].to_numpy() for c in (SUBJECT_ID, TIME, "static"))
    same = sid[1:] == sid[:-1]
    backwards = same & ~static[:-1] & (static[1:] | (t[1:] < t[:-1]))
    if backwards.any():
        return False
    runs = sid[np.r_[True, ~same]] if len(sid) else sid
    return len(np.unique(runs)) == len(runs)


def _drop_subjects_without_time(df, cols, splits, report: EncodeReport) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Subjects with only static events cannot be placed in time: excluded, listed in the report."""
    keep = cols["timed"].to_numpy()
    if keep.all():
        return df, cols
    report.excluded_subjects = np.unique(cols[SUBJECT_ID].to_numpy()[~keep]).tolist()
    report.n_excluded_events = int((~keep).sum())
    if splits is not None:  # the split table must still cover them
        _split_index(np.array(report.excluded_subjects, dtype=np.int64), splits)
    return df.filter(keep), cols.filter(keep)


def missing_subjects_error(missing: Sequence[int]) -> DataError:
    shown = ", ".join(str(s) for s in list(missing)[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return DataError(
        f"{len(missing)} subject(s) with events are not in the split table: {shown}{more}. Every subject "
        f"must have a split (metadata/subject_splits.parquet); add them, or delete the file to use "
        f"ehrlong's hash-based 80/10/10 split."
    )


def split_code(name: str) -> int:
    if name not in SPLITS:
        raise DataError(f"unknown split {name!r} in the split table; MEDS splits are {', '.join(SPLITS)}.")
    return SPLITS.index(name)


def _split_index(subject_ids: np.ndarray, splits: pl.DataFrame) -> np.ndarray:
    table = splits.select(pl.col(SUBJECT_ID).cast(pl.Int64), pl.col("split")).sort(SUBJECT_ID)
    ids = table[SUBJECT_ID].to_numpy()
    pos = np.minimum(np.searchsorted(ids, subject_ids), max(len(ids) - 1, 0))
    found = (ids[pos] == subject_ids) if len(ids) else np.zeros(len(subject_ids), dtype=bool)
    if not found.all():
        raise missing_subjects_error(np.sort(subject_ids[~found]).tolist())
    names = table["split"].unique().to_list()
    codes = pl.Series([split_code(n) for n in names], dtype=pl.Int8)
    return table["split"].replace_strict(names, codes, return_dtype=pl.Int8).to_numpy()[pos]


def _unk_report(
    df: pl.DataFrame, vidx: np.ndarray, starts: np.ndarray, split_index: np.ndarray | None
) -> dict:
    """{split: SplitUnk} from per-event code indices (-1 = unknown)."""
    sizes = np.diff(np.append(starts, len(vidx)))
    names = list(SPLITS) if split_index is not None else [ALL_SPLITS]
    subject_split = split_index if split_index is not None else np.zeros(len(starts), dtype=np.int8)
    event_split = np.repeat(subject_split, sizes)
    unk_rows = np.flatnonzero(vidx < 0)
    per_split = np.bincount(event_split, minlength=len(names))
    unk_split = np.bincount(event_split[unk_rows], minlength=len(names))
    counts = (
        pl.DataFrame({"s": event_split[unk_rows], CODE: df[CODE].gather(unk_rows)})
        .group_by("s", CODE)
        .agg(pl.len().alias("n"))
        .sort(["s", "n", CODE], descending=[False, True, False])
    )
    out = {}
    for i, name in enumerate(names):
        part = counts.filter(pl.col("s") == i)
        codes = dict(zip(part[CODE].to_list(), part["n"].to_list(), strict=True))
        out[name] = SplitUnk(events=int(per_split[i]), unk=int(unk_split[i]), codes=codes)
    return out


def _ascending_subjects(tokens, times, offsets, subject_ids, split_index):
    """Reorder whole subject blocks so subject_ids ascend (MEDS shards need not be in id order)."""
    if len(subject_ids) < 2 or (np.diff(subject_ids) > 0).all():
        return tokens, times, offsets, subject_ids, split_index
    order = np.argsort(subject_ids, kind="stable")
    sizes = np.diff(offsets)[order]
    new_offsets = np.append(0, np.cumsum(sizes)).astype(np.int64)
    gather = np.repeat(offsets[:-1][order] - new_offsets[:-1], sizes) + np.arange(len(tokens))
    split_index = None if split_index is None else split_index[order]
    return tokens[gather], times[gather], new_offsets, subject_ids[order], split_index
