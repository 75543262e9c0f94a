"""The straightforward tokenizer: a per-subject Python loop over events, dict lookups and bisect.

It implements the rules in `ehrlong.tokenizer` the obvious way, one event at a time, so it is easy to
check by reading. It is the reference the vectorised `EventTokenizer.fit` / `encode` are tested
against (identical token stores) and the baseline `python -m ehrlong.data benchmark` times them
against. Nothing else should call it: it is 10x slower or more.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from ehrlong.data.meds import SPLITS
from ehrlong.tokenizer import (
    ALL_SPLITS,
    EncodedEvents,
    EncodeReport,
    EventTokenizer,
    SplitUnk,
    TokenizerRecipe,
    check_recipe,
    collect_events,
    missing_subjects_error,
    split_code,
    text_token,
)

EPOCH = datetime(1970, 1, 1)
ONE_US = timedelta(microseconds=1)


def fit(
    events: pl.LazyFrame | pl.DataFrame,
    train_subject_ids: Sequence[int] | np.ndarray,
    recipe: TokenizerRecipe,
) -> EventTokenizer:
    check_recipe(recipe)
    train = {int(s) for s in train_subject_ids}
    counts: Counter[str] = Counter()
    values: dict[str, list[float]] = defaultdict(list)
    text_counts: Counter[tuple[str, str]] = Counter()
    text_subjects: dict[tuple[str, str], set[int]] = defaultdict(set)
    for subject_id, _time, code, value, text in collect_events(events).iter_rows():
        if subject_id not in train:
            continue
        counts[code] += 1
        if value is not None and math.isfinite(value):
            values[code].append(value)
        elif text is not None:
            text_counts[(code, text)] += 1
            text_subjects[(code, text)].add(subject_id)

    codes = sorted(c for c, n in counts.items() if n >= recipe.min_code_count)
    edges: list[list[float] | None] = []
    for code in codes:
        vals = sorted(values.get(code, []))
        n = len(vals)
        edges.append([vals[k * (n - 1) // recipe.n_bins] for k in range(1, recipe.n_bins)] if n else None)
    texts: dict[str, list[str]] = defaultdict(list)
    if recipe.text_values:
        for (code, text), n in text_counts.items():
            if n >= recipe.min_text_count and len(text_subjects[(code, text)]) >= recipe.min_text_subjects:
                texts[code].append(text)
    stats = {
        "train_subjects": len(train),
        "train_events": sum(counts.values()),
        "codes_seen": len(counts),
        "codes_kept": len(codes),
        "codes_below_min_count": len(counts) - len(codes),
        "train_events_below_min_count": sum(n for c, n in counts.items() if n < recipe.min_code_count),
    }
    return EventTokenizer(recipe, codes, edges, [texts.get(c, []) for c in codes], stats)


def encode(
    tokenizer: EventTokenizer, events: pl.LazyFrame | pl.DataFrame, splits: pl.DataFrame | None = None
) -> EncodedEvents:
    df = collect_events(events)
    report = EncodeReport(n_events=df.height)
    by_subject = _group_by_subject(df, report)
    split_of = _split_names(splits, by_subject)
    report.unk = {name: SplitUnk() for name in (SPLITS if splits is not None else [ALL_SPLITS])}
    code_info = _code_info(tokenizer)
    tokens: list[int] = []
    times: list[int] = []  # microseconds since the epoch
    offsets = [0]
    subject_ids: list[int] = []
    for subject_id in sorted(by_subject):
        rows = sorted(by_subject[subject_id], key=lambda r: _time_key(r[1]))  # stable: ties keep input order
        if all(r[1] is None for r in rows):
            report.excluded_subjects.append(subject_id)
            report.n_excluded_events += len(rows)
            continue
        unk = report.unk[split_of.get(subject_id, ALL_SPLITS)]
        _encode_subject(rows, tokenizer, code_info, report, unk, tokens, times)
        subject_ids.append(subject_id)
        offsets.append(len(tokens))

    report.n_tokens, report.n_subjects = len(tokens), len(subject_ids)
    for part in report.unk.values():
        part.codes = dict(sorted(part.codes.items(), key=lambda kv: (-kv[1], kv[0])))
    split_index = None
    if splits is not None:
        split_index = np.array([split_code(split_of[s]) for s in subject_ids], dtype=np.int8)
    return EncodedEvents(
        np.array(tokens, dtype=np.int32),
        np.array(times, dtype=np.int64),
        np.array(offsets, dtype=np.int64),
        np.array(subject_ids, dtype=np.int64),
        split_index,
        report,
    )


def _group_by_subject(df: pl.DataFrame, report: EncodeReport) -> dict[int, list[tuple]]:
    """Rows per subject, in input order; notes in the report whether the input was already sorted."""
    by_subject: dict[int, list[tuple]] = defaultdict(list)
    previous_subject, previous_key = None, None
    for row in df.iter_rows():
        subject_id, key = row[0], _time_key(row[1])
        if subject_id != previous_subject and subject_id in by_subject:
            report.input_sorted = False  # subject seen before, in another run
        if subject_id == previous_subject and key < previous_key:
            report.input_sorted = False
        by_subject[subject_id].append(row)
        previous_subject, previous_key = subject_id, key
    return by_subject


def _encode_subject(rows, tokenizer, code_info, report: EncodeReport, unk: SplitUnk, tokens, times) -> None:
    """Append one subject's tokens and times (rows sorted by time, statics first)."""
    first_time = next(r[1] for r in rows if r[1] is not None)
    gap_us = tokenizer.gap_us.tolist()
    previous_us = None
    for _, time, code, value, text in rows:
        if time is None:
            report.n_static_events += 1
            time = first_time
        t_us = (time - EPOCH) // ONE_US
        if previous_us is not None and t_us != previous_us:
            bucket = bisect_right(gap_us, t_us - previous_us) - 1
            if bucket >= 0:
                tokens.append(int(tokenizer.gap_ids[bucket]))
                times.append(t_us)
                report.n_gap_tokens += 1
        previous_us = t_us
        tokens.append(_event_token(code_info, code, value, text, tokenizer.recipe, report, unk))
        times.append(t_us)
        unk.events += 1


def _time_key(time: datetime | None) -> tuple[int, datetime]:
    return (0, EPOCH) if time is None else (1, time)  # null (static) times first


def _split_names(splits: pl.DataFrame | None, by_subject: dict) -> dict[int, str]:
    if splits is None:
        return {}
    split_of = {}
    for subject_id, split in splits.select("subject_id", "split").iter_rows():
        split_of.setdefault(subject_id, split)
    missing = sorted(s for s in by_subject if s not in split_of)
    if missing:
        raise missing_subjects_error(missing)
    return split_of


def _code_info(tokenizer: EventTokenizer) -> dict[str, tuple[int, list[float] | None, dict[str, int]]]:
    """code -> (plain slot id, bin edges or None, {text: token id})."""
    info = {}
    for code, edges, texts in zip(tokenizer.codes, tokenizer.edges, tokenizer.texts, strict=True):
        slot = tokenizer.token_to_id[code]
        text_ids = {t: tokenizer.token_to_id[text_token(code, t)] for t in texts}
        info[code] = (slot, None if edges is None else edges.tolist(), text_ids)
    return info


def _event_token(code_info, code, value, text, recipe, report: EncodeReport, unk: SplitUnk) -> int:
    if value is not None and not math.isfinite(value):
        report.n_nonfinite_numeric += 1
        value = None
    if code not in code_info:
        unk.unk += 1
        unk.codes[code] = unk.codes.get(code, 0) + 1
        return EventTokenizer.unk_id
    slot, edges, text_ids = code_info[code]
    if value is not None and edges is not None:
        report.n_numeric_binned += 1
        if text is not None:
            report.n_text_ignored += 1
        return slot + 1 + bisect_right(edges, value)
    if value is not None:
        report.n_numeric_no_bins += 1
    if text is None:
        return slot
    if not recipe.text_values:
        report.n_text_ignored += 1
        return slot
    if text in text_ids:
        report.n_text_tokens += 1
        return text_ids[text]
    report.n_text_unmatched += 1
    return slot
