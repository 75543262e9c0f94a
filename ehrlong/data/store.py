"""Token store: a whole MEDS dataset encoded once into memory-mappable flat arrays.

    python -m ehrlong.data tokenize data=DIR [tokenizer=cehr] [out=DIR]

A store is a directory:

    tokens.npy       int32   [N]     token ids, subject after subject
    times_us.npy     int64   [N]     microseconds since 1970-01-01 (absolute: compared exactly with
                                     prediction times, which MEDS also gives to the microsecond)
    offsets.npy      int64   [S+1]   subject i owns tokens[offsets[i]:offsets[i+1]]
    subject_ids.npy  int64   [S]     ascending
    splits.npy       int8    [S]     index into ehrlong.data.meds.SPLITS (train, tuning, held_out)
    tokenizer.json   the fitted EventTokenizer (fit on train subjects only)
    meta.json        source, recipe, counts, UNK report per split, excluded counts, versions

It is written to a temporary sibling directory and renamed into place, so a reader sees a complete store
or none. `TokenStore.window` returns the last L tokens at or before a time for one subject, reading only
that subject's slice of the memory map.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import meds
import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ehrlong import __version__
from ehrlong.config import MISSING
from ehrlong.data import loop_tokenizer
from ehrlong.data.meds import (
    SPLIT,
    SPLITS,
    SUBJECT_ID,
    data_files,
    dataset_name,
    read_footer,
    read_splits,
    scan_events,
    scan_shard,
)
from ehrlong.errors import ConfigError, DataError
from ehrlong.paths import cache_root
from ehrlong.tokenizer import (
    FORMAT_VERSION as TOKENIZER_FORMAT_VERSION,
)
from ehrlong.tokenizer import (
    EncodedEvents,
    EventTokenizer,
    TokenizerRecipe,
    collect_events,
    load_recipe,
    missing_subjects_error,
    recipe_dict,
    recipe_hash,
)

FORMAT = "ehrlong.token_store"
# 2: times as int64 microseconds (1 held float64 days, whose last bit is ~1.3 us at MIMIC-IV's dates).
FORMAT_VERSION = 2
ARRAYS = ("tokens", "times_us", "offsets", "subject_ids", "splits")
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
EPOCH = datetime(1970, 1, 1)
ONE_US = timedelta(microseconds=1)

# The encode stage works on groups of whole shards of up to this many events (shard_chunks), so it holds
# one group's events and intermediates at a time, not the cohort's: in one piece, encoding a 98M-event
# cohort peaked at 8.4 GB.
CHUNK_EVENTS = 10_000_000

# name -> (fit, encode). The loop is the readable reference the vectorised path is tested and timed against.
IMPLEMENTATIONS: dict[str, tuple[Callable, Callable]] = {
    "vectorised": (EventTokenizer.fit, EventTokenizer.encode),
    "loop": (loop_tokenizer.fit, loop_tokenizer.encode),
}


@dataclass
class Args:
    data: str = MISSING  # a MEDS root (the folder holding data/ and metadata/)
    tokenizer: str = "cehr"  # a recipe in tokenizers/ or a path to a recipe YAML
    out: str | None = None  # default: <cache>/stores/<dataset>-<recipe>-<key> (EHRLONG_CACHE)


# ---------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    out: Path
    meta: dict
    seconds: dict[str, float]  # stage -> seconds (read, fit, encode, write)


def build_store(
    data_root: str | Path,
    recipe: TokenizerRecipe | str = "cehr",
    out: str | Path | None = None,
    implementation: str = "vectorised",
    progress: bool = True,
    tokenizer: EventTokenizer | None = None,
) -> BuildResult:
    """Read a MEDS root, fit the recipe on its train subjects, encode every subject, write the store.

    With `tokenizer` (one already fitted, e.g. a trained run's tokenizer.json) nothing is fitted: the
    data is encoded with that vocabulary, so a run can be applied to a dataset it never saw; codes it
    does not know become UNK and are counted per split in meta.json, as always."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(
            f"unknown tokenizer implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}."
        )
    recipe = recipe if isinstance(recipe, TokenizerRecipe) else load_recipe(recipe)
    if tokenizer is not None:
        recipe = tokenizer.recipe
    out = Path(out) if out else default_store_dir(data_root, recipe, tokenizer)
    fit, encode = IMPLEMENTATIONS[implementation]
    seconds: dict[str, float] = {}
    with tqdm(total=4, desc="tokenize", unit="stage", disable=not progress) as bar:
        clock = _StageClock(bar, seconds)
        clock.start("read")
        # Unsorted read: encode() checks the order itself and only re-sorts when a subject's events are
        # out of time order; MEDS shards usually just list subjects out of id order, which is cheap to fix.
        events = scan_events(data_root, sort=False)  # lazy: fit collects the train subjects' events only
        splits = read_splits(data_root)
        files = data_files(data_root)
        owners = subject_shards(files)
        _check_split_coverage(owners, splits)
        chunks = shard_chunks(files, CHUNK_EVENTS, owners)
        clock.start("fit")
        fitted_here = tokenizer is None
        if fitted_here:
            tokenizer = fit(events, _train_subjects(splits, data_root), recipe)
        clock.start("encode")
        parts = [
            encode(tokenizer, collect_events(pl.concat([scan_shard(p) for p in chunk])), splits)
            for chunk in tqdm(
                chunks, desc="encode", unit="chunk", leave=False, disable=not progress or len(chunks) < 2
            )
        ]
        encoded = EncodedEvents.concat(parts)
        del parts
        clock.start("write")
        meta = _meta(data_root, recipe, tokenizer, encoded, splits, implementation)
        meta["tokenizer"]["fitted_here"] = fitted_here
        write_store(out, encoded, tokenizer, meta)
        clock.start(None)
    return BuildResult(out, meta, seconds)


def subject_shards(files: list[Path]) -> pl.DataFrame:
    """(subject_id, shard): which shards (indices into `files`) hold events of each subject."""
    return pl.concat(
        [
            scan_shard(path, with_text=False)
            .select(SUBJECT_ID)
            .unique()
            .with_columns(pl.lit(i).alias("shard"))
            for i, path in enumerate(files)
        ]
    ).collect()


def shard_chunks(
    files: list[Path], max_events: int = CHUNK_EVENTS, owners: pl.DataFrame | None = None
) -> list[list[Path]]:
    """Shards grouped for encoding, each group in path order: a subject's shards always share a group
    (MEDS keeps a subject in one shard; ehrlong merges one spread over several, as scan_events does), and
    groups are packed in order of their first shard up to `max_events` events (a bigger group stays whole).
    `owners`: subject_shards(files), when already read."""
    owners = subject_shards(files) if owners is None else owners
    parent = list(range(len(files)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    spread = owners.group_by(SUBJECT_ID).agg(pl.col("shard")).filter(pl.col("shard").list.len() > 1)
    for shards in spread["shard"].to_list():
        for other in shards[1:]:
            parent[root(other)] = root(shards[0])
    groups: dict[int, list[int]] = {}
    for i in range(len(files)):
        groups.setdefault(root(i), []).append(i)
    rows = [read_footer(path).num_rows for path in files]
    chunks: list[list[int]] = []
    size = 0
    for members in sorted(groups.values()):
        n = sum(rows[i] for i in members)
        if not chunks or size + n > max_events:
            chunks.append([])
            size = 0
        chunks[-1] += members
        size += n
    return [[files[i] for i in sorted(chunk)] for chunk in chunks]


def _check_split_coverage(owners: pl.DataFrame, splits: pl.DataFrame) -> None:
    """Every subject with events has a split: checked over the whole cohort at once, so the error lists
    all the missing subjects, not those of the first chunk that meets one."""
    ids = owners[SUBJECT_ID].unique()
    missing = ids.filter(~ids.is_in(splits[SUBJECT_ID].cast(pl.Int64).implode())).sort()
    if len(missing):
        raise missing_subjects_error(missing.to_list())


class _StageClock:
    """Times consecutive stages and moves the progress bar."""

    def __init__(self, bar: tqdm, seconds: dict[str, float]):
        self.bar, self.seconds, self.name, self.t0 = bar, seconds, None, 0.0

    def start(self, name: str | None) -> None:
        now = time.perf_counter()
        if self.name is not None:
            self.seconds[self.name] = now - self.t0
            self.bar.update()
        if name is not None:
            self.bar.set_postfix_str(name)
        self.name, self.t0 = name, now


def _train_subjects(splits: pl.DataFrame, data_root: str | Path) -> np.ndarray:
    ids = splits.filter(pl.col(SPLIT) == meds.train_split)[SUBJECT_ID].to_numpy()
    if len(ids) == 0:
        raise DataError(
            f"{data_root} has no subjects in the {meds.train_split!r} split; the tokenizer is fit on "
            f"train subjects only. Fix metadata/subject_splits.parquet (or delete it for a hash split)."
        )
    return ids


def _meta(data_root, recipe, tokenizer: EventTokenizer, enc: EncodedEvents, splits, implementation) -> dict:
    r = enc.report
    sizes = np.diff(enc.offsets)
    per_split = {}
    for i, name in enumerate(SPLITS):
        mine = enc.split_index == i
        per_split[name] = {
            "subjects": int(mine.sum()),
            "events": r.unk[name].events,
            "tokens": int(sizes[mine].sum()),
            "unk": r.unk[name].unk,
        }
    unused_splits = splits[SUBJECT_ID].n_unique() - r.n_subjects - len(r.excluded_subjects)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ehrlong_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "implementation": implementation,
        "source": {"path": str(Path(data_root).resolve()), "dataset_name": dataset_name(data_root)},
        "tokenizer": {
            "hash": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size,
            "recipe": recipe_dict(recipe),
            "fit_stats": tokenizer.fit_stats,
        },
        "counts": {
            "subjects": r.n_subjects,
            "events_read": r.n_events,
            "events": r.n_events - r.n_excluded_events,
            "tokens": r.n_tokens,
            "gap_tokens": r.n_gap_tokens,
            "per_split": per_split,
            "split_table_subjects_without_events": unused_splits,
        },
        "excluded": {"subjects_without_timed_events": r.excluded_subjects, "events": r.n_excluded_events},
        "encode_report": r.to_dict(),
        "notes": [
            "times are int64 microseconds since 1970-01-01T00:00 (absolute)",
            "static (null-time) events are stamped with their subject's first timestamp",
            "a time-gap token is stamped with the time of the event it precedes (causal)",
            "no [BOS]/[EOS] in the store: windows add them if a model wants them",
        ],
    }


# ---------------------------------------------------------------------------------------------------
# Write (atomic)
# ---------------------------------------------------------------------------------------------------


def write_store(out: str | Path, encoded: EncodedEvents, tokenizer: EventTokenizer, meta: dict) -> Path:
    """Write into a temporary sibling, then rename: a failure leaves no partial store behind."""
    out = Path(out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        arrays = {
            "tokens": encoded.tokens.astype(np.int32, copy=False),
            "times_us": encoded.times_us.astype(np.int64, copy=False),
            "offsets": encoded.offsets.astype(np.int64, copy=False),
            "subject_ids": encoded.subject_ids.astype(np.int64, copy=False),
            "splits": encoded.split_index.astype(np.int8, copy=False),
        }
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        tokenizer.save(tmp / TOKENIZER_FILE)
        # meta.json goes last: its presence marks a complete store (ensure_store relies on it).
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META_FILE).is_file())):
        raise DataError(
            f"out={out} exists and is not a token store; refusing to overwrite it. "
            f"Pass a new or empty folder (or omit out= to use the cache)."
        )


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------


def source_fingerprint(data_root: str | Path) -> str:
    """Changes when the dataset's files (paths, sizes, mtimes) or the split table change."""
    root = Path(data_root).resolve()
    files = [*data_files(root), root / meds.subject_splits_filepath]
    stats = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]
    return hashlib.sha256(json.dumps([str(root), stats]).encode()).hexdigest()


def default_store_dir(
    data_root: str | Path, recipe: TokenizerRecipe, tokenizer: EventTokenizer | None = None
) -> Path:
    """Cache folder of a store: keyed by the data's fingerprint and the recipe (fitted here), or by the
    given tokenizer's hash (encoded with a vocabulary fitted elsewhere)."""
    vocabulary = recipe_hash(recipe) if tokenizer is None else f"tokenizer:{tokenizer.hash}"
    key = hashlib.sha256(
        f"{source_fingerprint(data_root)}|{vocabulary}|{FORMAT_VERSION}|{TOKENIZER_FORMAT_VERSION}".encode()
    ).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset_name(data_root)).strip("_") or "dataset"
    return cache_root() / "stores" / f"{name}-{recipe.name}-{key}"


def ensure_store(
    data_root: str | Path,
    recipe_name: str = "cehr",
    progress: bool = True,
    tokenizer: EventTokenizer | None = None,
) -> Path:
    """The store for (dataset, recipe), or (dataset, fitted tokenizer), built on first use and reused
    while the data is unchanged."""
    recipe = load_recipe(recipe_name) if tokenizer is None else tokenizer.recipe
    out = default_store_dir(data_root, recipe, tokenizer)
    if not (out / META_FILE).is_file():
        build_store(data_root, recipe, out, progress=progress, tokenizer=tokenizer)
    return out


# ---------------------------------------------------------------------------------------------------
# Read
# ---------------------------------------------------------------------------------------------------


def to_us(value: int | np.integer | datetime | np.datetime64) -> int:
    """Microseconds since 1970-01-01, as the store's times are: a datetime (aware ones in UTC), a numpy
    datetime64, or an integer already in microseconds."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return (value - EPOCH) // ONE_US
    if isinstance(value, np.datetime64):
        if np.isnat(value):
            raise ValueError("time NaT is not a time")
        return int(value.astype("datetime64[us]").astype(np.int64))
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    raise TypeError(
        f"time {value!r}: give a datetime, a numpy datetime64 or integer microseconds since the epoch"
    )


class TokenStore:
    """A token store opened with memory maps; nothing is read until a slice is touched."""

    def __init__(self, root: Path, arrays: dict[str, np.ndarray], meta: dict):
        self.root = root
        self.meta = meta
        self.tokens = arrays["tokens"]
        self.times_us = arrays["times_us"]
        self.offsets = arrays["offsets"]
        self.subject_ids = arrays["subject_ids"]
        self.splits = arrays["splits"]
        self._tokenizer: EventTokenizer | None = None

    def drop_resident_pages(self) -> None:
        """Unmap the pages read so far from this process (the OS keeps them in its file cache). A pass over
        many subjects touches pages all over the store; without this they stay counted in the process's
        resident memory, which then grows with the cohort although nothing is held."""
        for array in (self.tokens, self.times_us):
            mapping = getattr(array, "_mmap", None)  # numpy's memmap keeps its mmap.mmap here
            if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
                mapping.madvise(mmap.MADV_DONTNEED)

    @classmethod
    def open(cls, root: str | Path) -> TokenStore:
        root = Path(root)
        if not (root / META_FILE).is_file():
            raise DataError(
                f"{root} is not a token store (no {META_FILE}). Build one with "
                f"`python -m ehrlong.data tokenize data=MEDS_ROOT out={root}`."
            )
        meta = json.loads((root / META_FILE).read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{root} is a token store of format {meta.get('format_version')!r}; this ehrlong reads "
                f"version {FORMAT_VERSION}. Rebuild it with `python -m ehrlong.data tokenize`."
            )
        arrays = {name: np.load(root / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        store = cls(root, arrays, meta)
        store._check()
        return store

    def _check(self) -> None:
        s = len(self.subject_ids)
        if (
            len(self.offsets) != s + 1
            or len(self.splits) != s
            or self.offsets[-1] != len(self.tokens)
            or len(self.times_us) != len(self.tokens)
        ):
            raise DataError(
                f"token store {self.root} has inconsistent array lengths (subjects {s}, offsets "
                f"{len(self.offsets)}, tokens {len(self.tokens)}, times {len(self.times_us)}); rebuild it."
            )

    @property
    def tokenizer(self) -> EventTokenizer:
        if self._tokenizer is None:
            self._tokenizer = EventTokenizer.load(self.root / TOKENIZER_FILE)
        return self._tokenizer

    @property
    def n_subjects(self) -> int:
        return len(self.subject_ids)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def split_indices(self, split: str) -> np.ndarray:
        """Indices (not ids) of the subjects in `split`, ascending."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")
        return np.flatnonzero(np.asarray(self.splits) == SPLITS.index(split))

    def subject_index(self, subject_id: int) -> int:
        i = int(np.searchsorted(self.subject_ids, subject_id))
        if i >= self.n_subjects or self.subject_ids[i] != subject_id:
            raise DataError(
                f"subject {subject_id} is not in token store {self.root} "
                f"(excluded subjects are listed in its {META_FILE})."
            )
        return i

    def subject_slice(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def window(self, subject_id: int, before, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The last `length` tokens of `subject_id` with time <= `before`, and their times in microseconds
        (read-only views).

        `before` is a datetime / numpy datetime64 or integer microseconds since the epoch (to_us). Reads
        only this subject's slice (binary search on its times); empty arrays when nothing precedes `before`.
        """
        if length < 1:
            raise ValueError(f"window length must be >= 1, got {length}")
        s = self.subject_slice(self.subject_index(subject_id))
        end = s.start + int(np.searchsorted(self.times_us[s], to_us(before), side="right"))
        start = max(s.start, end - length)
        return self.tokens[start:end], self.times_us[start:end]


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def summary(result: BuildResult, top: int = 5) -> str:
    m = result.meta
    c, tok, rep = m["counts"], m["tokenizer"], m["encode_report"]
    per = c["per_split"]
    total = sum(result.seconds.values())
    by_split = " / ".join(f"{name} {p['subjects']:,}" for name, p in per.items())
    lines = [
        f"tokenized {m['source']['dataset_name']} with recipe {tok['recipe']['name']!r} in {total:.2f} s "
        f"({', '.join(f'{k} {v:.2f}' for k, v in result.seconds.items())})",
        f"  subjects {c['subjects']:,} ({by_split}), "
        f"events {c['events']:,}, tokens {c['tokens']:,} ({c['gap_tokens']:,} time-gap tokens)",
        f"  vocab {tok['vocab_size']:,} tokens, {tok['fit_stats']['codes_kept']:,} codes kept of "
        f"{tok['fit_stats']['codes_seen']:,} seen in train (min count {tok['recipe']['min_code_count']}); "
        f"hash {tok['hash'][:12]}",
        f"  values: {rep['n_numeric_binned']:,} numeric bins, {rep['n_text_tokens']:,} text tokens; "
        f"{rep['n_static_events']:,} static events stamped with the subject's first time",
    ]
    counted = {
        "finite numeric on a code without train numerics (plain slot)": rep["n_numeric_no_bins"],
        "non-finite numeric values (treated as null)": rep["n_nonfinite_numeric"],
        "text values not in vocab (plain slot)": rep["n_text_unmatched"],
        "text values not used (numeric bin first, or text off)": rep["n_text_ignored"],
        "events of subjects without any timed event (excluded)": rep["n_excluded_events"],
    }
    lines += [f"  {label}: {n:,}" for label, n in counted.items() if n]
    if not rep["input_sorted"]:
        lines.append("  input was not sorted by (subject_id, time): re-sorted stably, null times first")
    for name, u in rep["unk"].items():
        rate = u["unk"] / u["events"] if u["events"] else 0.0
        worst = ", ".join(f"{code} ({n})" for code, n in list(u["codes"].items())[:top])
        lines.append(
            f"  UNK {name:8s} {rate:6.2%} ({u['unk']:,} of {u['events']:,})"
            + (f"  top: {worst}" if worst else "")
        )
    size = sum(p.stat().st_size for p in result.out.iterdir()) / 1e6
    lines.append(f"  wrote {result.out} ({size:.1f} MB)")
    return "\n".join(lines)


def run(args: Args) -> int:
    result = build_store(args.data, args.tokenizer, args.out)
    print(summary(result))
    return 0
