"""EventTokenizer: train-only statistics, value tokens, time-gap tokens, round trips, recipes."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ehrlong.data import loop_tokenizer
from ehrlong.data.meds import EVENT_SCHEMA
from ehrlong.errors import ConfigError, DataError
from ehrlong.tokenizer import (
    PAD_ID,
    UNK_ID,
    EventTokenizer,
    TimeGap,
    TokenizerRecipe,
    bin_token,
    gap_token,
    load_recipe,
    text_token,
)

T0 = datetime(2030, 1, 1, 8, 0)
TRAIN, TUNING, HELD_OUT = 1, 2, 3  # one subject per split unless a test adds more


def events(rows: list[tuple]) -> pl.DataFrame:
    """rows of (subject_id, time | None, code, numeric_value | None, text_value | None)."""
    return pl.DataFrame(rows, schema=EVENT_SCHEMA, orient="row")


def splits(mapping: dict[int, str]) -> pl.DataFrame:
    return pl.DataFrame(
        {"subject_id": list(mapping), "split": list(mapping.values())},
        schema={"subject_id": pl.Int64, "split": pl.String},
    )


def recipe(**overrides) -> TokenizerRecipe:
    base = {
        "name": "test",
        "min_code_count": 1,
        "min_text_count": 1,
        "min_text_subjects": 1,
        "n_bins": 4,
        "n_probe_tokens": 3,
    }
    return TokenizerRecipe(**{**base, **overrides})


def day(d: float) -> datetime:
    return T0 + timedelta(days=d)


def lab_rows(subject: int, values: list[float], code: str = "LAB//A") -> list[tuple]:
    return [(subject, day(i), code, v, None) for i, v in enumerate(values)]


SPLITS3 = {TRAIN: "train", TUNING: "tuning", HELD_OUT: "held_out"}


# ---------------------------------------------------------------------------------------------------
# Fit on train only
# ---------------------------------------------------------------------------------------------------


def test_code_seen_only_in_held_out_is_unknown_and_counted():
    df = events(
        [
            (TRAIN, day(0), "DX//A", None, None),
            (TRAIN, day(1), "DX//B", None, None),
            (HELD_OUT, day(0), "DX//A", None, None),
            (HELD_OUT, day(1), "DX//ONLY_HELD_OUT", None, None),
            (HELD_OUT, day(2), "DX//ONLY_HELD_OUT", None, None),
            (TUNING, day(0), "DX//B", None, None),
        ]
    )
    tok = EventTokenizer.fit(df, [TRAIN], recipe(time_gaps=[]))
    assert "DX//ONLY_HELD_OUT" not in tok.token_to_id
    enc = tok.encode(df, splits(SPLITS3))
    held = enc.tokens[enc.offsets[2] : enc.offsets[3]]
    assert held.tolist() == [tok.token_to_id["DX//A"], UNK_ID, UNK_ID]
    unk = enc.report.unk
    assert unk["held_out"].unk == 2 and unk["held_out"].codes == {"DX//ONLY_HELD_OUT": 2}
    assert unk["held_out"].events == 3
    assert unk["train"].unk == 0 and unk["tuning"].unk == 0


def test_min_code_count_counts_train_events_only():
    df = events(
        [
            (TRAIN, day(0), "DX//A", None, None),
            (TRAIN, day(1), "DX//A", None, None),
            (TRAIN, day(2), "DX//B", None, None),
        ]
        + [(TUNING, day(i), "DX//B", None, None) for i in range(5)]
    )
    tok = EventTokenizer.fit(df, [TRAIN], recipe(min_code_count=2))
    assert tok.codes == ["DX//A"]
    assert tok.fit_stats["codes_below_min_count"] == 1 and tok.fit_stats["train_events_below_min_count"] == 1


def test_extreme_values_outside_train_do_not_move_bin_edges():
    train_values = [float(v) for v in range(1, 21)]
    base = events(lab_rows(TRAIN, train_values))
    leaky = events(
        lab_rows(TRAIN, train_values) + lab_rows(TUNING, [1e9] * 50) + lab_rows(HELD_OUT, [-1e9] * 50)
    )
    edges_clean = EventTokenizer.fit(base, [TRAIN], recipe()).edges[0]
    tok = EventTokenizer.fit(leaky, [TRAIN], recipe(time_gaps=[]))
    np.testing.assert_array_equal(tok.edges[0], edges_clean)
    # ranks floor(k * 19 / 4) = 4, 9, 14 of 1..20
    assert tok.edges[0].tolist() == [5.0, 10.0, 15.0]
    enc = tok.encode(leaky, splits(SPLITS3))
    top, bottom = tok.token_to_id[bin_token("LAB//A", 4)], tok.token_to_id[bin_token("LAB//A", 1)]
    assert set(enc.tokens[enc.offsets[1] : enc.offsets[2]].tolist()) == {top}
    assert set(enc.tokens[enc.offsets[2] : enc.offsets[3]].tolist()) == {bottom}


def test_text_tokens_need_the_train_count_threshold():
    rows = [(TRAIN, day(i), "CHART//X", None, "Normal") for i in range(3)]
    rows += [(TRAIN, day(3), "CHART//X", None, "Rare")]
    rows += [(HELD_OUT, day(i), "CHART//X", None, "Unseen") for i in range(10)]
    tok = EventTokenizer.fit(events(rows), [TRAIN], recipe(min_text_count=2, time_gaps=[]))
    assert tok.texts == [["Normal"]]
    enc = tok.encode(events(rows), splits({TRAIN: "train", HELD_OUT: "held_out"}))
    normal, plain = tok.token_to_id[text_token("CHART//X", "Normal")], tok.token_to_id["CHART//X"]
    assert enc.tokens.tolist() == [normal] * 3 + [plain] + [plain] * 10
    assert enc.report.n_text_tokens == 3 and enc.report.n_text_unmatched == 11


def test_a_text_value_few_subjects_have_never_becomes_a_vocabulary_string(tmp_path):
    """Counted by subjects, not events: one patient's free text, however often recorded, stays out of
    tokenizer.json (which is saved with every run); its events keep the code's plain slot."""
    others = [TRAIN + 10 * k for k in range(1, 3)]  # two more train subjects
    rows = [(TRAIN, day(i), "NOTE//X", None, "only this patient") for i in range(8)]
    rows += [(s, day(i), "NOTE//X", None, "Negative") for s in (TRAIN, *others) for i in range(2)]
    for r in (recipe(min_text_subjects=3, time_gaps=[]), recipe(min_text_subjects=4, time_gaps=[])):
        fast = EventTokenizer.fit(events(rows), [TRAIN, *others], r)
        slow = loop_tokenizer.fit(events(rows), [TRAIN, *others], r)
        assert fast.hash == slow.hash
        assert fast.texts == ([["Negative"]] if r.min_text_subjects == 3 else [[]])
        saved = fast.save(tmp_path / "tokenizer.json").read_text()
        assert "only this patient" not in saved
        enc = fast.encode(events(rows))
        assert enc.report.n_text_unmatched == 8 + (6 if r.min_text_subjects == 4 else 0)
    # A tokenizer.json written before the field existed reads as the rule it was fitted with.
    d = json.loads(saved)
    del d["recipe"]["min_text_subjects"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert EventTokenizer.load(tmp_path / "old.json").recipe.min_text_subjects == 1
    with pytest.raises(ConfigError, match="min_text_subjects=0"):
        EventTokenizer.fit(events(rows), [TRAIN], recipe(min_text_subjects=0))


# ---------------------------------------------------------------------------------------------------
# Value tokens
# ---------------------------------------------------------------------------------------------------


def test_negative_and_positive_zero_bin_identically():
    # The median rank of [-1, -0.0, 1] is the negative zero: the edge must come out as +0.0.
    tok = EventTokenizer.fit(events(lab_rows(TRAIN, [-1.0, -0.0, 1.0])), [TRAIN], recipe(n_bins=2))
    assert tok.edges[0].tolist() == [0.0] and not np.signbit(tok.edges[0]).any()
    probe = events([(TRAIN, day(0), "LAB//A", -0.0, None), (TRAIN, day(0), "LAB//A", 0.0, None)])
    for enc in (tok.encode(probe), loop_tokenizer.encode(tok, probe)):
        assert enc.tokens.tolist() == [tok.token_to_id[bin_token("LAB//A", 2)]] * 2
    # The sign of a zero in train must not change the fitted tokenizer either.
    positive = EventTokenizer.fit(events(lab_rows(TRAIN, [-1.0, 0.0, 1.0])), [TRAIN], recipe(n_bins=2))
    assert positive.hash == tok.hash


def test_value_precedence_and_counted_fallbacks():
    rows = lab_rows(TRAIN, [1.0, 2.0, 3.0, 4.0]) + [
        (TRAIN, day(10), "LAB//A", 2.5, "H"),  # numeric wins over text (text counted as not used)
        (TRAIN, day(11), "LAB//A", float("nan"), None),  # NaN -> null -> plain slot
        (TRAIN, day(12), "LAB//A", float("inf"), None),
        (TRAIN, day(13), "DX//NOVALUE", None, None),
        (TUNING, day(0), "DX//NOVALUE", 7.0, None),  # numeric on a code without train numerics
    ]
    df = events(rows)
    tok = EventTokenizer.fit(df, [TRAIN], recipe(time_gaps=[]))
    assert tok.edges[tok.codes.index("DX//NOVALUE")] is None
    enc = tok.encode(df, splits({TRAIN: "train", TUNING: "tuning"}))
    r = enc.report
    assert (r.n_nonfinite_numeric, r.n_numeric_no_bins, r.n_text_ignored) == (2, 1, 1)
    plain_a, plain_dx = tok.token_to_id["LAB//A"], tok.token_to_id["DX//NOVALUE"]
    assert enc.tokens[5].tolist() == plain_a and enc.tokens[6].tolist() == plain_a
    assert enc.tokens[-1] == plain_dx
    assert tok.decode([enc.tokens[4]])[0].startswith("LAB//A|Q")


def test_encode_decode_round_trip_and_vocab_layout():
    rows = lab_rows(TRAIN, [1.0, 5.0, 9.0]) + [
        (TRAIN, day(30), "CHART//BP", None, "120/80"),
        (TRAIN, day(31), "DX//I10", None, None),
    ]
    df = events(rows)
    tok = EventTokenizer.fit(df, [TRAIN], recipe())
    assert tok.pad_id == PAD_ID == 0 and tok.decode([0, 1]) == ["[PAD]", "[UNK]"]
    assert tok.decode(tok.probe_ids) == ["[PROBE_0]", "[PROBE_1]", "[PROBE_2]"]
    assert tok.decode(tok.gap_ids)[0] == gap_token("D1") and tok.decode(tok.gap_ids)[-1] == gap_token("LT")
    assert len(set(tok.id_to_token)) == tok.vocab_size
    enc = tok.encode(df)
    names = tok.decode(enc.tokens)
    assert [tok.token_to_id[n] for n in names] == enc.tokens.tolist()
    # Edges are ranks floor(k * 2 / 4) of [1, 5, 9] = [1, 5, 5] -> [1, 5]; a bin counts edges <= value.
    assert [n for n in names if not n.startswith("[GAP")] == [
        bin_token("LAB//A", 2),
        bin_token("LAB//A", 3),
        bin_token("LAB//A", 3),
        text_token("CHART//BP", "120/80"),
        "DX//I10",
    ]
    with pytest.raises(DataError, match="outside"):
        tok.decode([tok.vocab_size])


# ---------------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------------


def test_gap_tokens_are_inserted_before_new_timestamps_and_stamped_causally():
    rows = [
        (TRAIN, None, "STATIC//SEX", None, None),
        (TRAIN, day(0), "A", None, None),
        (TRAIN, day(0), "B", None, None),  # same timestamp: no gap token
        (TRAIN, day(2), "C", None, None),  # 2 days -> 1D
        (TRAIN, day(2) + timedelta(hours=3), "D", None, None),  # 3 hours: below the smallest bucket
        (TRAIN, day(2 + 3 / 24 + 7), "E", None, None),  # exactly 7 days -> 1W (lower bound inclusive)
        (TRAIN, day(9.125 + 6.99), "F", None, None),  # 6.99 days -> 1D
        (TRAIN, day(9.125 + 6.99 + 1000), "G", None, None),  # -> LT
    ]
    df = events(rows)
    gaps = [TimeGap("1D", 1.0), TimeGap("1W", 7.0), TimeGap("LT", 730.0)]
    tok = EventTokenizer.fit(df, [TRAIN], recipe(time_gaps=gaps))
    enc = tok.encode(df)
    assert tok.decode(enc.tokens) == [
        "STATIC//SEX",
        "A",
        "B",
        "[GAP_1D]",
        "C",
        "D",
        "[GAP_1W]",
        "E",
        "[GAP_1D]",
        "F",
        "[GAP_LT]",
        "G",
    ]
    gaps = np.flatnonzero(np.isin(enc.tokens, tok.gap_ids))
    np.testing.assert_array_equal(enc.times_us[gaps], enc.times_us[gaps + 1])  # stamped with the next event
    assert enc.times_us[0] == enc.times_us[1]  # static stamped with the subject's first time
    assert np.all(np.diff(enc.times_us) >= 0)
    assert enc.report.n_gap_tokens == 4 and enc.report.n_static_events == 1


def test_cehr_recipe_buckets_follow_cehr_bert():
    gaps = [0.5, 1.0, 6.875, 7.0, 29.875, 30.0, 359.875, 360.0, 5000.0]  # exact in binary: sums stay exact
    rows, t = [(TRAIN, day(0), "A", None, None)], 0.0
    for g in gaps:
        t += g
        rows.append((TRAIN, day(t), "A", None, None))
    tok = EventTokenizer.fit(events(rows), [TRAIN], load_recipe("cehr"))
    got = [n for n in tok.decode(tok.encode(events(rows)).tokens) if n != "A"]

    def cehr_bert(days: int) -> str:  # hf_ehr's day/week/month ATT rule on whole days
        return (
            f"D{days}"
            if days < 7
            else f"W{days // 7}"
            if days < 30
            else f"M{days // 30}"
            if days < 360
            else "LT"
        )

    assert got == [gap_token(cehr_bert(int(g))) for g in gaps if g >= 1]


def test_clmbr_recipe_inserts_no_time_tokens():
    df = events([(TRAIN, day(0), "A", None, None), (TRAIN, day(400), "A", None, None)])
    tok = EventTokenizer.fit(df, [TRAIN], load_recipe("clmbr"))
    enc = tok.encode(df)
    assert len(tok.gap_ids) == 0 and len(enc.tokens) == df.height and enc.report.n_gap_tokens == 0


def test_times_are_exact_microseconds_since_epoch():
    # 2180 (MIMIC-IV's shifted dates): float64 days there cannot tell t from t + 1 us; the store can.
    late = datetime(2180, 5, 17, 8, 30, 0, 1)
    df = events(
        [
            (TRAIN, datetime(1970, 1, 3, 12), "A", None, None),
            (TRAIN, late, "A", None, None),
            (TRAIN, late + timedelta(microseconds=1), "A", None, None),
        ]
    )
    tok = EventTokenizer.fit(df, [TRAIN], recipe())
    enc = tok.encode(df)
    want = [int(2.5 * 86_400_000_000), (late - datetime(1970, 1, 1)) // timedelta(microseconds=1)]
    assert enc.times_us.dtype == np.int64 and enc.times_us[0] == want[0]
    assert enc.times_us[-2:].tolist() == [want[1], want[1] + 1]


def test_subject_without_any_timed_event_is_excluded_and_reported():
    df = events([(TRAIN, day(0), "A", None, None), (5, None, "A", None, None), (5, None, "B", None, None)])
    enc = EventTokenizer.fit(df, [TRAIN], recipe()).encode(df)
    assert enc.subject_ids.tolist() == [TRAIN]
    assert enc.report.excluded_subjects == [5] and enc.report.n_excluded_events == 2


def test_unsorted_input_is_sorted_stably_and_reported():
    rows = [
        (2, day(1), "A", None, None),
        (2, day(0), "B", None, None),
        (1, day(0), "A", None, None),
        (2, None, "S", None, None),
        (1, day(0), "B", None, None),
        (2, day(1), "B", None, None),
    ]
    df = events(rows)
    tok = EventTokenizer.fit(df, [1, 2], recipe(time_gaps=[]))
    enc = tok.encode(df)
    assert not enc.report.input_sorted
    assert enc.subject_ids.tolist() == [1, 2]
    assert tok.decode(enc.tokens) == ["A", "B", "S", "B", "A", "B"]  # ties keep input order
    # Subjects merely out of id order (each contiguous and time-sorted) are reordered, not re-sorted.
    blocks = events(rows[2:3] + rows[4:5])
    ordered = tok.encode(pl.concat([events([(3, day(0), "A", None, None)]), blocks]))
    assert ordered.report.input_sorted and ordered.subject_ids.tolist() == [1, 3]
    assert tok.decode(ordered.tokens) == ["A", "B", "A"] and ordered.offsets.tolist() == [0, 2, 3]


def test_subject_missing_from_split_table_is_an_error_naming_it():
    df = events([(TRAIN, day(0), "A", None, None), (77, day(0), "A", None, None)])
    tok = EventTokenizer.fit(df, [TRAIN], recipe())
    with pytest.raises(DataError, match="77"):
        tok.encode(df, splits({TRAIN: "train"}))


def test_loop_reference_matches_vectorised_on_mixed_events():
    rng = np.random.default_rng(3)
    rows = []
    for s in range(1, 13):
        t = day(float(rng.integers(0, 50)))
        rows.append((s, None, "STATIC", None, None))
        for _ in range(int(rng.integers(1, 30))):
            t += timedelta(hours=float(rng.choice([0, 0, 1, 30, 24 * 40])))
            code = f"C{int(rng.integers(0, 8))}" if s < 10 else f"NEW{int(rng.integers(0, 3))}"
            value = float(rng.normal()) if code in ("C1", "C2") else None
            text = str(rng.choice(["lo", "hi", "x"])) if code in ("C3", "C2") else None
            rows.append((s, t, code, value, text))
    df = events(rows)
    table = splits({s: "train" if s < 8 else "tuning" if s < 11 else "held_out" for s in range(1, 13)})
    r = recipe(min_code_count=2, min_text_count=2, min_text_subjects=3)
    fast, slow = EventTokenizer.fit(df, list(range(1, 8)), r), loop_tokenizer.fit(df, list(range(1, 8)), r)
    assert fast.hash == slow.hash
    a, b = fast.encode(df, table), loop_tokenizer.encode(fast, df, table)
    for name in ("tokens", "times_us", "offsets", "subject_ids", "split_index"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert a.report == b.report
    assert a.report.unk["held_out"].unk > 0


# ---------------------------------------------------------------------------------------------------
# Persistence and recipes
# ---------------------------------------------------------------------------------------------------


def test_save_load_gives_identical_hash_and_encoding(tmp_path):
    df = events(lab_rows(TRAIN, [3.0, 1.0, 2.0, 8.0]) + [(TRAIN, day(9), "CHART//X", None, "Warm")])
    tok = EventTokenizer.fit(df, [TRAIN], recipe())
    back = EventTokenizer.load(tok.save(tmp_path / "tokenizer.json"))
    assert back.hash == tok.hash and back.id_to_token == tok.id_to_token
    a, b = tok.encode(df), back.encode(df)
    assert a.tokens.tobytes() == b.tokens.tobytes() and a.times_us.tobytes() == b.times_us.tobytes()
    # An edit that changes the mapping is detected.
    d = json.loads((tmp_path / "tokenizer.json").read_text())
    lab = next(c for c in d["codes"] if c["code"] == "LAB//A")
    lab["edges"][0] = 2.5
    (tmp_path / "edited.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match="inconsistent"):
        EventTokenizer.load(tmp_path / "edited.json")


def test_hash_changes_with_the_mapping():
    df = events(lab_rows(TRAIN, [1.0, 2.0, 3.0, 4.0, 5.0]))
    a = EventTokenizer.fit(df, [TRAIN], recipe())
    assert EventTokenizer.fit(df, [TRAIN], recipe(n_bins=2)).hash != a.hash
    assert EventTokenizer.fit(df, [TRAIN], recipe(time_gaps=[TimeGap("1D", 2.0)])).hash != a.hash
    assert EventTokenizer.fit(df, [TRAIN], recipe(description="other words")).hash == a.hash


def test_shipped_recipes_load():
    cehr, clmbr = load_recipe("cehr"), load_recipe("clmbr")
    assert (
        cehr.name == "cehr" and cehr.time_gaps == TokenizerRecipe().time_gaps
    )  # the YAML restates the defaults
    # CEHR-BERT buckets: day 1-6, week 1-4 (7-29 d), month 1-11 (30-359 d), long term.
    names = [g.name for g in cehr.time_gaps]
    assert names[:7] == ["D1", "D2", "D3", "D4", "D5", "D6", "W1"] and names[-2:] == ["M11", "LT"]
    assert {g.name: g.min_days for g in cehr.time_gaps}["W4"] == 28 and cehr.time_gaps[-1].min_days == 360
    assert clmbr.name == "clmbr" and clmbr.time_gaps == []


def test_unknown_recipe_and_unknown_key_are_errors_listing_valid_options(tmp_path):
    with pytest.raises(ConfigError, match="cehr, clmbr"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("min_code_cont: 3\n")
    with pytest.raises(ConfigError, match="min_code_count"):
        load_recipe(bad)
    bad.write_text("time_gaps: [{name: A, min_days: 5}, {name: B, min_days: 2}]\n")
    with pytest.raises(ConfigError, match="increasing"):
        load_recipe(bad)
    good = tmp_path / "mine.yaml"
    good.write_text("n_bins: 3\n")
    assert load_recipe(good).name == "mine" and load_recipe(good).n_bins == 3


def test_text_values_off_ignores_and_counts_them():
    rows = [(TRAIN, day(i), "CHART//X", None, "Normal") for i in range(3)]
    tok = EventTokenizer.fit(events(rows), [TRAIN], recipe(text_values=False, time_gaps=[]))
    enc = tok.encode(events(rows))
    assert tok.texts == [[]] and tok.decode(enc.tokens) == ["CHART//X"] * 3
    assert enc.report.n_text_ignored == 3 and enc.report.n_text_tokens == 0


def test_colliding_token_names_are_an_error():
    rows = lab_rows(TRAIN, [1.0, 2.0]) + [(TRAIN, day(5), "LAB//A|Q1", None, None)]
    with pytest.raises(DataError, match="collide"):
        EventTokenizer.fit(events(rows), [TRAIN], recipe())
