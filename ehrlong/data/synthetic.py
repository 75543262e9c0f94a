"""The embedded synthetic MEDS cohort: `python -m ehrlong.data synth out=DIR [n_subjects=N seed=S
copy_forward=F irregularity=I progression=P visits=V rerecord=R]`.

Writes a real MEDS root (DESIGN.md §3-4) whose three EHR properties are set by dials, one per stratum
of `ehrlong.evaluation.strata` (Context Clues, research/anchor_context_clues.md §5), with task labels
whose ground truth sits early in long timelines:

    data/<split>/<k>.parquet          events, sorted by (subject_id, time), the static row first
    metadata/codes.parquet            every code of the vocabulary (code, description, parent_codes)
    metadata/dataset.json             MEDS dataset metadata (no wall-clock time: output is reproducible)
    metadata/subject_splits.parquet   train / tuning / held_out, ~80/10/10 by a hash of the subject id
    metadata/subject_dials.parquet    per subject: the dial values used and the latent ground truth
    metadata/synthetic.json           the config, generator version, summary and a file manifest
    labels/<task>.parquet             MEDS label schema (subject_id, prediction_time, boolean_value)
    labels/tasks.json                 per task: one line, where its signal lies, prevalence

A subject's timeline: a static sex row, MEDS_BIRTH, then 110-130 visits (outpatient, or inpatient with an
admission, daily morning draws and a discharge). Every visit-start and daily timestamp records vital
signs and a suffix of the subject's ordered lab and chart panels (numeric labs, categorical text charts);
visit starts add the visit's problem/medication/procedure list. Labels are predicted at the end of a
late visit (6-14 visits before the end); outcomes are coded at the next visit; some subjects die after
their last visit.

The dials, each varied per subject around the cohort setting and recorded in subject_dials.parquet
(logistic noise on the logit scale at low-discrepancy quantiles, see `draw_dials`; a setting of 0 or 1
is exact), each move one property and leave the other two alone:

- copy_forward: the chance that each item of a visit's problem list is re-recorded at the next visit.
  Copies take slots that fresh items would have filled (the slot count is drawn before), so it changes
  which codes appear, never how many. A fresh item is a code the subject never had, so a type repeats
  only through copying, and copying is local (from the previous visit): the share of repeated n-grams
  depends on the dial, not on the length of the timeline.
- irregularity: the share of visits that come in bursts, a day or two after the previous one; the other
  gaps stretch so every subject's mean gap stays MEAN_GAP_DAYS. The dispersion of gaps grows with it,
  their mean does not. It only moves timestamps; the timestamps inside a visit depend on no dial.
- progression: the growth rate of events per timestamp (more panels per draw later in the timeline)
  and of the share of new problems that are complications. The added events are panels whose n-grams
  every subject has anyway: routine visits cycle through every panel level twice before the prediction
  time, and variable-length blocks sit between fixed headers, so more events add no new n-gram types
  and repetition stays put. Timestamps do not depend on it, so neither does irregularity.

`visits` sets the timeline's length (default 120 visits, ~4k events). The progression guarantee above
(every panel level recorded twice before the prediction time) needs ~100 visits; shorter cohorts
(visits=40: ~1.3k events) are for quick runs and for early-signal checks at shorter context lengths.

`rerecord` (default 0) is the chance that each visit after the prediction time takes the history again:
the family-history code (if present), smoking status and an HbA1c at the subject's level. It changes
nothing at or before any prediction time, so the early tasks keep their signal in early history; it
gives a language model a reason, beyond one outcome token, to remember that history (`draw_rerecords`).

Each concern draws from its own random stream, `np.random.default_rng([seed, subject_index, stream])`,
so a subject is the same whatever the chunking, and a dial changes only what it should (with
copy_forward changed, the event counts and times are identical, not merely equal in distribution).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

import ehrlong
from ehrlong.config import MISSING, SyntheticConfig
from ehrlong.data.meds import SPLITS, hash_splits
from ehrlong.errors import ConfigError, DataError
from ehrlong.paths import data_root

# Bump when the output for a given config changes, so cached cohorts are regenerated (ensure_cohort).
GENERATOR_VERSION = 2
DATASET_NAME = "ehrlong-synthetic"
FIRST_SUBJECT_ID = 1_000_000
SHARD_SUBJECTS = 500  # subjects per data shard
VOCAB_SEED = 20_240_101  # the code vocabulary is the same for every cohort
LONG_CONTEXT = 16_384  # the summary reports the share of subjects with more events than this

MINUTE_US = 60_000_000
EPOCH_DAY_1990 = 7305  # days from 1970-01-01 to 1990-01-01

# Per-subject dial spread: scale of the logistic noise added to the setting's logit (sd ~1 on the logit
# scale). Wide enough that the per-subject values, not sampling noise, rank the measured strata.
DIAL_SPREAD = 0.75
HALTON_BASES = (2, 3, 5)  # one per dial

# Visits. `visits` (default 120) +- 1/12 of it per subject, at a mean 30-day gap: ~10 years of care.
VISIT_SPREAD = 12  # a subject has visits +- visits // VISIT_SPREAD visits (120: 110-130)
N_VISITS_AFTER_PREDICTION = (6, 15)
BASELINE_VISITS = 3  # outpatient visits that carry the early task signals
# The fewest visits a cohort may ask for: with visits // VISIT_SPREAD fewer and the most visits after
# the prediction time, the prediction visit still comes after the baseline visits.
MIN_VISITS = 20
INPATIENT_RATE = 0.15
MEAN_STAY_DAYS = 3.0
MEAN_GAP_DAYS = 30.0
MIN_GAP_DAYS = 1.0
MAX_BURST_SHARE = 0.9  # share of short (burst) gaps at irregularity = 1
BURST_EXTRA_DAYS = 1.0  # mean of the exponential added to MIN_GAP_DAYS for a burst gap
LONG_GAP_SHAPE = 25.0  # gamma shape of the long gaps' jitter (coefficient of variation 0.2)
OUTPATIENT_ITEMS = 2.0  # Poisson mean of problem-list items, plus 1
INPATIENT_ITEMS = 4.0  # ... plus 2

# Panels: a subject has N_PANELS ordered panels (the basic metabolic panel last). A draw records the last
# `level` of them; levels are few so that the n-grams at a block's start come from a small fixed set.
N_PANELS = 24
LEVELS = np.array([1, 2, 4, 8, 16, 24])
ROUTINE_EVERY = 7  # every 7th visit is a routine check-up whose level cycles through LEVELS
PANEL_BASE = 0.02  # share of the extra panels drawn at growth 1 (the start of the timeline)
PANEL_NOISE = 0.3  # log-normal noise on that share, per timestamp
MAX_GROWTH = 6.0  # log growth of the panel share over the timeline at progression = 1
MAX_COMPLICATION = 0.6  # share of new problems that are complications at the end, progression = 1


# ---------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------

VISIT_OUTPATIENT, VISIT_INPATIENT, DISCHARGE = "VISIT//OUTPATIENT", "VISIT//INPATIENT", "HOSPITAL_DISCHARGE"
BP, HEART_RATE, TEMPERATURE = "VITALS//BLOOD_PRESSURE", "VITALS//HEART_RATE//bpm", "VITALS//TEMPERATURE//degC"
SEX_CODES = ("SEX//F", "SEX//M")
CREATININE = "LAB//2160-0//mg/dL"
HBA1C = "LAB//4548-4//%"
TOBACCO = "SOCIAL//TOBACCO_USE"
FAMILY_HISTORY_CHD = "DIAGNOSIS//ICD10CM//Z82.49"

# (code, description, mean, sd, decimals): the basic metabolic panel, recorded at every draw;
# creatinine carries the recent task's signal.
BASIC_PANEL = (
    ("LAB//2951-2//mmol/L", "sodium", 140.0, 3.0, 0),
    ("LAB//2823-3//mmol/L", "potassium", 4.2, 0.4, 1),
    ("LAB//2075-0//mmol/L", "chloride", 103.0, 3.0, 0),
    ("LAB//2028-9//mmol/L", "bicarbonate", 25.0, 2.5, 0),
    ("LAB//3094-0//mg/dL", "urea nitrogen", 15.0, 5.0, 0),
    ("LAB//2345-7//mg/dL", "glucose", 100.0, 20.0, 0),
    (CREATININE, "creatinine", 0.9, 0.15, 2),
)
# Numeric codes outside the panels, same layout.
NUMERIC_CODES = (
    (HEART_RATE, "heart rate", 75.0, 12.0, 0),
    (TEMPERATURE, "body temperature", 36.8, 0.4, 1),
    (HBA1C, "haemoglobin A1c", 5.4, 0.3, 1),
)

CHART_VALUE_SETS = (
    ("Normal", "Abnormal"),
    ("None", "Mild", "Moderate", "Severe"),
    ("Clear", "Crackles", "Wheeze", "Diminished", "Rhonchi"),
    ("Warm", "Cool", "Cold", "Hot"),
    ("Alert", "Drowsy", "Confused", "Unresponsive"),
    ("No", "Yes"),
    ("Regular", "Irregular"),
    ("SR (Sinus Rhythm)", "AF (Atrial Fibrillation)", "ST (Sinus Tachycardia)", "SB (Sinus Bradycardia)"),
    ("Intact", "Impaired"),
    ("Dry", "Moist", "Diaphoretic"),
)
LAB_UNITS = ("mg/dL", "mmol/L", "g/dL", "K/uL", "U/L", "%", "mEq/L", "ng/mL", "pg/mL", "sec")
SYSTOLIC = np.arange(80, 202, 2)
DIASTOLIC = np.arange(40, 122, 2)
BP_TEXTS = tuple(f"{s}/{d}" for s in SYSTOLIC for d in DIASTOLIC)  # blood pressure is text, as in MIMIC
N_LAB_PANELS, N_CHART_PANELS = 30, 20
SMOKING = ("Never smoker", "Former smoker", "Current every day smoker")


@dataclass(frozen=True)
class Task:
    """A binary task. The latent level (drawn per subject) sets the outcome probability and is written
    into the timeline only as the task's signal; the outcome code is recorded at the first visit after
    the prediction time and nowhere else."""

    description: str
    signal: str  # "early" (first visits) or "recent" (last draw before the prediction time)
    signal_events: str
    signal_visit: int | None  # early tasks: the last visit that carries the signal
    outcome_code: str
    outcome_name: str
    levels: tuple[str, ...]
    level_probs: tuple[float, ...]
    outcome_probs: tuple[float, ...]  # P(outcome) per level


TASKS: dict[str, Task] = {
    "family_history_mi": Task(
        description="myocardial infarction after the prediction time; risk set by a family-history code",
        signal="early",
        signal_events=f"{FAMILY_HISTORY_CHD} at the first visit (never re-recorded)",
        signal_visit=0,
        outcome_code="DIAGNOSIS//ICD10CM//I21.4",
        outcome_name="non-ST elevation myocardial infarction",
        levels=("absent", "present"),
        level_probs=(0.7, 0.3),
        outcome_probs=(0.08, 0.7),
    ),
    "diabetic_kidney": Task(
        description="diabetic kidney disease after the prediction time; risk set by baseline HbA1c",
        signal="early",
        signal_events=f"{HBA1C} numeric_value at the first {BASELINE_VISITS} visits (only measured then)",
        signal_visit=BASELINE_VISITS - 1,
        outcome_code="DIAGNOSIS//ICD10CM//E11.22",
        outcome_name="type 2 diabetes with diabetic chronic kidney disease",
        levels=("normal", "high"),
        level_probs=(0.65, 0.35),
        outcome_probs=(0.05, 0.6),
    ),
    "lung_cancer": Task(
        description="lung cancer after the prediction time; risk set by smoking status at intake",
        signal="early",
        signal_events=f"{TOBACCO} text_value at the first visit (only recorded then)",
        signal_visit=0,
        outcome_code="DIAGNOSIS//ICD10CM//C34.90",
        outcome_name="malignant neoplasm of bronchus or lung",
        levels=SMOKING,
        level_probs=(0.55, 0.2, 0.25),
        outcome_probs=(0.03, 0.15, 0.6),
    ),
    "acute_kidney_injury": Task(
        description="acute kidney injury at the next visit; signalled by the latest creatinine",
        signal="recent",
        signal_events=f"{CREATININE} numeric_value at the last draw at or before the prediction time",
        signal_visit=None,
        outcome_code="DIAGNOSIS//ICD10CM//N17.9",
        outcome_name="acute kidney failure",
        levels=("normal", "raised"),
        level_probs=(0.75, 0.25),
        outcome_probs=(0.06, 0.75),
    ),
}
HBA1C_HIGH = (7.8, 0.8)  # mean, sd of baseline HbA1c when the diabetic_kidney level is "high"
CREATININE_RAISED = (2.6, 0.5)  # mean, sd of the last creatinine when acute_kidney_injury is "raised"
DEATH_RATE = (0.06, 0.3)  # P(death after the last visit) without / with any outcome


@dataclass(frozen=True)
class Vocabulary:
    """Every code, with its value distribution and place in panels. Arrays are indexed by code id."""

    codes: np.ndarray  # str
    descriptions: list[str]
    parents: list[list[str]]
    mean: np.ndarray  # numeric codes: value distribution; NaN elsewhere
    sd: np.ndarray
    scale: np.ndarray  # 10 ** decimals of the value
    text_offset: np.ndarray  # categorical codes: first value in `texts`; -1 elsewhere
    text_count: np.ndarray
    texts: np.ndarray  # str, every text_value (chart categories, blood pressures, smoking status)
    general: np.ndarray  # ids of problem-list codes (diagnoses, medications, procedures) ...
    general_weight: np.ndarray  # ... and their Zipf weights
    complications: np.ndarray
    complication_weight: np.ndarray
    panels: list[np.ndarray]  # code ids per panel; panel 0 is the basic metabolic panel
    panel_weight: np.ndarray  # Zipf weights of panels 1.. (panel 0 is everyone's)
    index: dict[str, int]


@dataclass(frozen=True)
class _Code:
    code: str
    description: str
    parents: tuple[str, ...] = ()
    mean: float = np.nan
    sd: float = np.nan
    decimals: int = 0
    values: tuple[str, ...] = ()  # categorical text values


def _zipf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf weights in a random order, so popularity is not tied to how codes were enumerated."""
    return rng.permutation(1.0 / np.arange(1, n + 1) ** exponent)


def _diagnosis(icd: str, description: str) -> _Code:
    return _Code(f"DIAGNOSIS//ICD10CM//{icd}", f"{description} {icd}", (f"ICD10CM/{icd.split('.')[0]}",))


def _icd10(n: int, letters: str, rng: np.random.Generator) -> list[str]:
    """Up to n distinct ICD-10-like codes (letter, two digits, a dot and a subcode) in chapters `letters`."""
    chapter = rng.integers(0, len(letters), n)
    category, sub = rng.integers(0, 100, n), rng.integers(0, 100, n)
    return sorted({f"{letters[c]}{k:02d}.{s}" for c, k, s in zip(chapter, category, sub, strict=True)})


def _lab_panel(number: int, rng: np.random.Generator, loinc: list[int]) -> list[_Code]:
    panel = []
    for _ in range(int(rng.integers(5, 17))):
        mean = float(np.exp(rng.uniform(-1, 6)))  # 0.4 .. 400 in some unit
        unit = LAB_UNITS[rng.integers(len(LAB_UNITS))]
        panel.append(
            _Code(
                f"LAB//{loinc.pop()}-{rng.integers(10)}//{unit}",
                f"lab in panel {number}",
                (f"PANEL/LAB{number}",),
                mean=mean,
                sd=mean * rng.uniform(0.05, 0.3),
                decimals=int(np.clip(2 - np.floor(np.log10(mean)), 0, 3)),
            )
        )
    return panel


def _chart_panel(number: int, rng: np.random.Generator, item_ids: list[int]) -> list[_Code]:
    sets = rng.integers(0, len(CHART_VALUE_SETS), int(rng.integers(5, 17)))
    return [
        _Code(
            f"CHART//{item_ids.pop()}",
            f"chart item in panel {number}",
            (f"PANEL/CHART{number}",),
            values=CHART_VALUE_SETS[s],
        )
        for s in sets
    ]


def _fixed_codes() -> list[_Code]:
    """Codes every cohort has: MEDS anchors, sex, visits, vitals, the task signals and outcomes."""
    plain = ("MEDS_BIRTH", "MEDS_DEATH", *SEX_CODES, VISIT_OUTPATIENT, VISIT_INPATIENT, DISCHARGE)
    codes = [_Code(c, c.replace("//", " ").replace("_", " ").lower()) for c in plain]
    codes.append(_Code(BP, "blood pressure, systolic/diastolic mmHg", values=BP_TEXTS))
    codes += [_Code(c, name, mean=m, sd=s, decimals=d) for c, name, m, s, d in NUMERIC_CODES]
    codes.append(_Code(TOBACCO, "tobacco use", values=SMOKING))
    codes.append(_diagnosis(FAMILY_HISTORY_CHD.split("//")[-1], "family history of ischaemic heart disease"))
    codes += [_diagnosis(t.outcome_code.split("//")[-1], t.outcome_name) for t in TASKS.values()]
    return codes


@functools.cache
def build_vocabulary() -> Vocabulary:
    """The cohort vocabulary (~4.6k codes), deterministic and shared by every seed."""
    rng = np.random.default_rng(VOCAB_SEED)
    entries = _fixed_codes()
    taken = {e.code for e in entries}

    def add(new: list[_Code]) -> np.ndarray:
        new = [e for e in new if e.code not in taken]  # a generated code may hit a task code
        taken.update(e.code for e in new)
        entries.extend(new)
        return np.arange(len(entries) - len(new), len(entries))

    general = [
        add([_diagnosis(icd, "diagnosis") for icd in _icd10(2400, "ABCDEFGHJKLMNOPQRSTZ", rng)]),
        add(
            [
                _Code(f"MEDICATION//RXNORM//{m}", f"medication RxNorm {m}", ("RXNORM",))
                for m in np.sort(rng.choice(np.arange(100_000, 2_000_000), 1000, replace=False))
            ]
        ),
        add(
            [
                _Code(f"PROCEDURE//CPT4//{c}", f"procedure CPT {c}", ("CPT4",))
                for c in np.sort(rng.choice(np.arange(10_000, 100_000), 500, replace=False))
            ]
        ),
    ]
    # ICD-10 chapter Y holds complications of medical care (Y40-Y84).
    complications = add([_diagnosis(icd, "complication") for icd in _icd10(300, "Y", rng)])
    basic = [
        _Code(c, f"{name} (basic metabolic panel)", ("PANEL/BMP",), m, s, d)
        for c, name, m, s, d in BASIC_PANEL
    ]
    panels = [add(basic)]
    loinc = list(rng.choice(np.arange(10_000, 100_000), 2000, replace=False))
    panels += [add(_lab_panel(p + 1, rng, loinc)) for p in range(N_LAB_PANELS)]
    chart_ids = list(rng.choice(np.arange(220_000, 230_000), 1000, replace=False))
    panels += [add(_chart_panel(p + 1, rng, chart_ids)) for p in range(N_CHART_PANELS)]

    text_count = np.array([len(e.values) for e in entries])
    general_ids = np.concatenate(general)
    return Vocabulary(
        codes=np.array([e.code for e in entries]),
        descriptions=[e.description for e in entries],
        parents=[list(e.parents) for e in entries],
        mean=np.array([e.mean for e in entries]),
        sd=np.array([e.sd for e in entries]),
        scale=10.0 ** np.array([e.decimals for e in entries]),
        text_offset=np.where(text_count > 0, np.cumsum(text_count) - text_count, -1),
        text_count=text_count,
        texts=np.array([v for e in entries for v in e.values]),
        general=general_ids,
        general_weight=_zipf(len(general_ids), 1.0, rng),
        complications=complications,
        complication_weight=_zipf(len(complications), 1.0, rng),
        panels=panels,
        panel_weight=_zipf(len(panels) - 1, 0.8, rng),
        index={e.code: i for i, e in enumerate(entries)},
    )


# ---------------------------------------------------------------------------------------------------
# One subject
# ---------------------------------------------------------------------------------------------------

STREAMS = ("dials", "visits", "times", "content", "panels", "values", "tasks", "static", "rerecord")
DIALS = ("copy_forward", "irregularity", "progression")  # SyntheticConfig fields, each a Dials field
START, DAILY, END = 0, 1, 2  # timestamp kinds: visit start, inpatient morning draw, discharge


@dataclass(frozen=True)
class Dials:
    copy_forward: float
    irregularity: float
    progression: float


@dataclass(frozen=True)
class Plan:
    """Visit structure, drawn before any dial is applied."""

    inpatient: np.ndarray  # bool per visit
    stay: np.ndarray  # days per inpatient visit (0 for outpatient)
    n_items: np.ndarray  # problem-list slots per visit
    prediction_visit: int  # labels are predicted at the end of this visit

    @property
    def n_visits(self) -> int:
        return len(self.inpatient)


@dataclass(frozen=True)
class Timestamps:
    """One row per distinct time in the subject's care (visit starts, morning draws, discharges)."""

    visit: np.ndarray
    kind: np.ndarray
    day: np.ndarray  # float days since 1970-01-01, rounded to the minute


@dataclass(frozen=True)
class Latent:
    """The ground truth behind the labels: per task the latent level (index into Task.levels) and the
    outcome, plus death. `noise` holds the standard normals that signal values are made from, so a
    counterfactual (dataclasses.replace with other levels) stays consistent."""

    level: dict[str, int]
    outcome: dict[str, bool]
    death: bool
    noise: np.ndarray  # BASELINE_VISITS for HbA1c, one for the raised creatinine, one for the death time

    def hba1c(self, vocab: Vocabulary, noise: np.ndarray | None = None) -> np.ndarray:
        """HbA1c at the subject's level: at the first BASELINE_VISITS visits, or made from `noise`."""
        code = vocab.index[HBA1C]
        mean, sd = HBA1C_HIGH if self.level["diabetic_kidney"] == 1 else (vocab.mean[code], vocab.sd[code])
        return np.round(mean + sd * (self.noise[:BASELINE_VISITS] if noise is None else noise), 1)

    def raised_creatinine(self) -> float:
        return round(CREATININE_RAISED[0] + CREATININE_RAISED[1] * abs(float(self.noise[BASELINE_VISITS])), 2)

    def death_delay_days(self) -> float:
        return 1 + 60 * abs(float(self.noise[-1]))


@dataclass
class Subject:
    """A subject's events (code ids, times in days, values) and what was drawn to make them."""

    codes: np.ndarray
    days: np.ndarray  # NaN for the static row
    numeric: np.ndarray  # NaN = null
    text: np.ndarray  # index into Vocabulary.texts, -1 = null
    dials: Dials
    latent: Latent
    prediction_day: float
    record: dict


def _rng(seed: int, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, index, STREAMS.index(stream)])


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def _radical_inverse(index: int, base: int) -> float:
    """The index-th point of the van der Corput sequence in `base` (one coordinate of a Halton point)."""
    out, scale = 0.0, 1.0
    while index > 0:
        scale /= base
        out += scale * (index % base)
        index //= base
    return out


def _subject_dial(setting: float, u: float) -> float:
    """Logit-logistic around the setting at quantile u; 0 and 1 stay exact (a dial at 0 is off)."""
    if setting <= 0.0 or setting >= 1.0:
        return float(setting)
    u = min(max(u, 1e-9), 1 - 1e-9)
    return float(1.0 / (1.0 + np.exp(-(_logit(setting) + DIAL_SPREAD * _logit(u)))))


def draw_dials(cfg: SyntheticConfig, index: int) -> Dials:
    """Subject `index`'s dial values around the cohort settings.

    The quantiles are a Halton point shifted by a per-seed random offset (Cranley-Patterson rotation):
    low-discrepancy, so in any cohort, even a small one, the three dials spread evenly and are nearly
    uncorrelated across subjects, while each subject's values depend only on (seed, index).
    """
    shift = np.random.default_rng([cfg.seed, STREAMS.index("dials")]).random(len(HALTON_BASES))
    u = [(_radical_inverse(index + 1, b) + s) % 1.0 for b, s in zip(HALTON_BASES, shift, strict=True)]
    return Dials(**{dial: _subject_dial(getattr(cfg, dial), q) for dial, q in zip(DIALS, u, strict=True)})


def plan_visits(rng: np.random.Generator, visits: int) -> Plan:
    spread = visits // VISIT_SPREAD
    n = int(rng.integers(visits - spread, visits + spread + 1))
    inpatient = rng.random(n) < INPATIENT_RATE
    routine = np.arange(n) % ROUTINE_EVERY == 0
    inpatient[:BASELINE_VISITS] = False
    inpatient[routine] = False
    stay = np.where(inpatient, 1 + rng.poisson(MEAN_STAY_DAYS - 1, n), 0)
    items = np.where(inpatient, 2 + rng.poisson(INPATIENT_ITEMS, n), 1 + rng.poisson(OUTPATIENT_ITEMS, n))
    return Plan(inpatient, stay, items, n - 1 - int(rng.integers(*N_VISITS_AFTER_PREDICTION)))


def visit_timestamps(rng: np.random.Generator, plan: Plan, irregularity: float) -> tuple[Timestamps, float]:
    """Times of every timestamp, and the birth day.

    The gaps between visits come from `visit_gaps`. Visits start in clinic hours, inpatient morning
    draws at 06:00, discharges at 14:00.
    """
    n = plan.n_visits
    first = EPOCH_DAY_1990 + rng.uniform(0, 3650)
    age = rng.uniform(18, 75) * 365.25
    clock = rng.uniform(8 / 24, 17 / 24, n)
    gaps = visit_gaps(rng, n - 1, irregularity)
    length = np.where(plan.inpatient, plan.stay + 0.5, 0.0)
    chain = first + np.concatenate([[0.0], np.cumsum(length[:-1] + gaps)])
    start = np.floor(chain) + clock

    per_visit = np.where(plan.inpatient, plan.stay + 2, 1)
    visit = np.repeat(np.arange(n), per_visit)
    step = np.arange(len(visit)) - np.repeat(np.cumsum(per_visit) - per_visit, per_visit)
    last = step == per_visit[visit] - 1
    kind = np.where(step == 0, START, np.where(last & plan.inpatient[visit], END, DAILY))
    offset = np.where(kind == DAILY, step + 6 / 24, np.where(kind == END, plan.stay[visit] + 14 / 24, 0.0))
    day = np.where(kind == START, start[visit], np.floor(start[visit]) + offset)
    day = np.round(day * 1440) / 1440
    return Timestamps(visit, kind, day), float(np.floor(first - age))


def visit_gaps(rng: np.random.Generator, n: int, irregularity: float) -> np.ndarray:
    """n gaps (days) from one visit's end to the next start, with mean exactly MEAN_GAP_DAYS.

    A share MAX_BURST_SHARE * irregularity of them (exactly, at random places) are bursts of
    MIN_GAP_DAYS plus a short exponential; the rest share what is left of the total, with a mild gamma
    jitter. The std of the gaps then rises steadily with the dial: (mean - burst) * sqrt(s / (1 - s)) for
    a burst share s. An exact count and an exact total, rather than independent draws, keep each
    subject's measured std close to what its dial implies (heavy-tailed gaps would make the sample std
    too noisy to rank subjects by), and the draws do not depend on the dial, so a higher irregularity
    turns a superset of the same gaps into bursts.
    """
    order = rng.permutation(n)
    burst = MIN_GAP_DAYS + rng.exponential(BURST_EXTRA_DAYS, n)
    jitter = rng.gamma(LONG_GAP_SHAPE, 1.0 / LONG_GAP_SHAPE, n)
    is_burst = np.zeros(n, dtype=bool)
    is_burst[order[: int(round(MAX_BURST_SHARE * irregularity * n))]] = (
        True  # MAX_BURST_SHARE < 1: some stay long
    )
    room = MEAN_GAP_DAYS * n - burst[is_burst].sum()  # what the long gaps must add up to
    gaps = burst.copy()
    gaps[~is_burst] = jitter[~is_burst] * room / jitter[~is_burst].sum()
    return gaps


def _weighted_order(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """A random permutation where heavier items tend to come first (Efraimidis and Spirakis, 2006)."""
    return np.argsort(-np.log(rng.random(len(weights))) / weights, kind="stable")


def problem_lists(
    rng: np.random.Generator, plan: Plan, dials: Dials, vocab: Vocabulary
) -> tuple[np.ndarray, int]:
    """Code ids of every visit's problem-list slots (visit-major), and how many fresh draws reused a code.

    Each slot of a visit is kept for the next visit with probability copy_forward; kept slots fill the
    next visit's first slots in their order (copy-paste of the previous note), fresh codes the rest.
    A fresh code is new to the subject: complications with a share growing over the timeline with
    progression, otherwise a problem from the Zipf-weighted vocabulary.
    """
    n_items = plan.n_items
    n = int(n_items.sum())
    start = np.cumsum(n_items) - n_items
    visit = np.repeat(np.arange(plan.n_visits), n_items)
    general = vocab.general[_weighted_order(rng, vocab.general_weight)]
    complications = vocab.complications[_weighted_order(rng, vocab.complication_weight)]
    keep = rng.random(n) < dials.copy_forward
    complication_draw = rng.random(n)

    kept_rank = np.cumsum(keep) - 1
    kept_rank -= np.concatenate([[0], np.cumsum(keep)])[start][visit]
    nxt = np.minimum(visit + 1, plan.n_visits - 1)
    copied = keep & (visit + 1 < plan.n_visits) & (kept_rank < n_items[nxt])
    source = np.arange(n)
    source[start[nxt[copied]] + kept_rank[copied]] = np.flatnonzero(copied)
    while not np.array_equal(source[source], source):  # follow copies of copies back to the fresh slot
        source = source[source]
    fresh = source == np.arange(n)

    share = MAX_COMPLICATION * dials.progression * visit / max(plan.n_visits - 1, 1)
    is_complication = complication_draw < share
    out = np.empty(n, dtype=np.int64)
    reused = 0
    for mask, order in ((fresh & is_complication, complications), (fresh & ~is_complication, general)):
        ranks = np.arange(int(mask.sum()))
        reused += int((ranks >= len(order)).sum())
        out[mask] = order[ranks % len(order)]
    return out[source], reused


def panel_levels(rng: np.random.Generator, ts: Timestamps, plan: Plan, progression: float) -> np.ndarray:
    """How many of the subject's panels (a value of LEVELS) each timestamp records; 0 at discharges.

    Routine visits cycle through LEVELS, so every subject records every level at least twice before the
    prediction time whatever its progression; elsewhere the level grows as exp(growth * position).
    """
    noise = rng.standard_normal(len(ts.visit))
    position = ts.visit / max(plan.n_visits - 1, 1)
    share = PANEL_BASE * np.exp(MAX_GROWTH * progression * position + PANEL_NOISE * noise)
    wanted = 1 + (N_PANELS - 1) * np.minimum(share, 1.0)
    level = LEVELS[np.searchsorted(LEVELS, wanted, side="right") - 1]
    routine = ts.visit % ROUTINE_EVERY == 0
    cycle = LEVELS[::-1][(ts.visit // ROUTINE_EVERY) % len(LEVELS)]
    level = np.where(routine, cycle, level)
    return np.where(ts.kind == END, 0, level)


def draw_latent(rng: np.random.Generator) -> Latent:
    """Task levels, and outcomes that depend on nothing but the level; death, likelier after an outcome."""
    level, outcome = {}, {}
    for name, task in TASKS.items():
        level[name] = int(np.searchsorted(np.cumsum(task.level_probs), rng.random(), side="right"))
        outcome[name] = bool(rng.random() < task.outcome_probs[level[name]])
    death = bool(rng.random() < DEATH_RATE[int(any(outcome.values()))])
    return Latent(level, outcome, death, rng.standard_normal(BASELINE_VISITS + 2))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges: starts[i] .. starts[i] + lengths[i] - 1, in order."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


def subject_panels(rng: np.random.Generator, vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """The subject's ordered panel block (N_PANELS - 1 Zipf-drawn panels, then the basic panel) and
    `suffix[k]`: how many codes the last k panels of the block hold."""
    chosen = np.sort(1 + _weighted_order(rng, vocab.panel_weight)[: N_PANELS - 1])
    block = np.concatenate([vocab.panels[p] for p in chosen] + [vocab.panels[0]])
    suffix = np.concatenate([[0], np.cumsum([len(vocab.panels[p]) for p in [0, *chosen[::-1]]])])
    return block, suffix


@dataclass(frozen=True)
class TaskEvents:
    """Events the tasks add at visit starts, in visit order: signals in the first visits, outcomes at the
    visit after the prediction visit. Nothing else in the timeline depends on the latent levels."""

    visit: np.ndarray
    code: np.ndarray
    numeric: np.ndarray  # NaN = none
    text: np.ndarray  # -1 = none


def early_signals(visit: int, latent: Latent, hba1c: float, vocab: Vocabulary) -> list[tuple]:
    """The early tasks' signal events at one visit: the family-history code (when present), an HbA1c
    value at the subject's level and the smoking status, as (visit, code, numeric, text) rows."""
    idx = vocab.index
    rows = [(visit, idx[FAMILY_HISTORY_CHD], np.nan, -1)] if latent.level["family_history_mi"] == 1 else []
    rows.append((visit, idx[HBA1C], hba1c, -1))
    rows.append((visit, idx[TOBACCO], np.nan, vocab.text_offset[idx[TOBACCO]] + latent.level["lung_cancer"]))
    return rows


@dataclass(frozen=True)
class Rerecords:
    """Visits after the prediction time that record the early signals again, with the standard normals
    their HbA1c values are made from."""

    visit: np.ndarray
    noise: np.ndarray


def draw_rerecords(rng: np.random.Generator, plan: Plan, rerecord: float) -> Rerecords:
    """Each visit after the prediction time re-takes the history (records the early signals again) with
    chance `rerecord`.

    Only visits after the prediction time: a label's history is the same as with rerecord=0, so the
    early tasks' signal stays early. What the dial adds is a reason for a language model to remember
    the signal. The outcome alone is one token per timeline, too weak a gradient for a small
    pretraining budget to learn that it depends on the first visit (README, the early-signal check).
    """
    after = np.arange(plan.prediction_visit + 1, plan.n_visits)
    visit = after[rng.random(len(after)) < rerecord]
    return Rerecords(visit, rng.standard_normal(len(visit)))


def task_events(plan: Plan, latent: Latent, vocab: Vocabulary, rerecords: Rerecords) -> TaskEvents:
    idx = vocab.index
    baseline = latent.hba1c(vocab)
    # (visit, code, numeric, text): every early signal at the first visit, HbA1c at the other baseline ones
    rows = early_signals(0, latent, float(baseline[0]), vocab)
    rows += [(v, idx[HBA1C], float(x), -1) for v, x in enumerate(baseline[1:], start=1)]
    for v, x in zip(rerecords.visit, latent.hba1c(vocab, rerecords.noise), strict=True):
        rows += early_signals(int(v), latent, float(x), vocab)
    rows += [
        (plan.prediction_visit + 1, idx[task.outcome_code], np.nan, -1)
        for name, task in TASKS.items()
        if latent.outcome[name]
    ]
    rows.sort(key=lambda r: r[0])
    visit, code, numeric, text = (np.array(col) for col in zip(*rows, strict=True))
    return TaskEvents(
        visit.astype(np.int64), code.astype(np.int64), numeric.astype(np.float64), text.astype(np.int64)
    )


# What opens each timestamp, by kind. Vitals sit between the visit code and the panels, so the n-grams
# that reach from a problem list into the next timestamp never touch the variable-length panel block.
HEADERS = (
    (VISIT_OUTPATIENT, BP, HEART_RATE, TEMPERATURE),
    (VISIT_INPATIENT, BP, HEART_RATE, TEMPERATURE),
    (BP, HEART_RATE, TEMPERATURE),  # inpatient morning draw
    (DISCHARGE,),
)


def assemble(
    ts: Timestamps,
    plan: Plan,
    level: np.ndarray,
    panels: tuple[np.ndarray, np.ndarray],
    items: np.ndarray,
    tasks: TaskEvents,
    vocab: Vocabulary,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes and days of every visit event, timestamp by timestamp, and for each event its row in
    `tasks` (-1 for the events that do not come from a task).

    A timestamp is up to four segments, in order: its header, the last `level` panels of the block,
    the visit's problem list and task events (both at visit starts only). Every segment is a slice of
    one pool of codes, so the timeline is a single gather.
    """
    block, suffix = panels
    header_codes = np.array([vocab.index[c] for h in HEADERS for c in h])
    header_len = np.array([len(h) for h in HEADERS])
    pool = np.concatenate([header_codes, block, items, tasks.code])
    base = np.cumsum([0, len(header_codes), len(block), len(items)])  # where each part starts in the pool

    is_start = ts.kind == START
    header = np.where(is_start, plan.inpatient[ts.visit], np.where(ts.kind == DAILY, 2, 3))
    item_start = np.cumsum(plan.n_items) - plan.n_items
    task_count = np.bincount(tasks.visit, minlength=plan.n_visits)
    task_start = np.cumsum(task_count) - task_count
    seg_start = np.stack(
        [
            base[0] + (np.cumsum(header_len) - header_len)[header],
            base[1] + len(block) - suffix[level],
            base[2] + item_start[ts.visit],
            base[3] + task_start[ts.visit],
        ],
        axis=1,
    )
    seg_len = np.stack(
        [
            header_len[header],
            suffix[level],
            np.where(is_start, plan.n_items[ts.visit], 0),
            np.where(is_start, task_count[ts.visit], 0),
        ],
        axis=1,
    )
    gather = _ranges(seg_start.ravel(), seg_len.ravel())
    days = np.repeat(ts.day, seg_len.sum(axis=1))
    return pool[gather], days, np.where(gather >= base[3], gather - base[3], -1)


def draw_values(
    rng: np.random.Generator, codes: np.ndarray, vocab: Vocabulary
) -> tuple[np.ndarray, np.ndarray]:
    """numeric_value (per-code normal, rounded) and text_value (per-code categories, skewed to the
    first; blood pressure as "systolic/diastolic"), as floats (NaN = null) and text ids (-1 = null)."""
    z, z2, u = rng.standard_normal(len(codes)), rng.standard_normal(len(codes)), rng.random(len(codes))
    scale = vocab.scale[codes]
    numeric = np.round((vocab.mean[codes] + vocab.sd[codes] * z) * scale) / scale
    category = np.floor(vocab.text_count[codes] * u**2).astype(np.int64)
    text = np.where(vocab.text_offset[codes] >= 0, vocab.text_offset[codes] + category, -1)
    is_bp = codes == vocab.index[BP]
    systolic = np.clip(np.round((125 + 15 * z[is_bp] - SYSTOLIC[0]) / 2), 0, len(SYSTOLIC) - 1)
    diastolic = np.clip(np.round((78 + 10 * z2[is_bp] - DIASTOLIC[0]) / 2), 0, len(DIASTOLIC) - 1)
    text[is_bp] = vocab.text_offset[vocab.index[BP]] + (systolic * len(DIASTOLIC) + diastolic).astype(
        np.int64
    )
    return numeric, text


def _minute(days: float | np.ndarray) -> float | np.ndarray:
    return np.round(np.asarray(days) * 1440) / 1440


def generate_subject(
    cfg: SyntheticConfig, index: int, vocab: Vocabulary | None = None, latent: Latent | None = None
) -> Subject:
    """Every event of subject `index` (0-based) in MEDS order, plus its dials and latent ground truth.

    `latent` replaces the drawn ground truth: the same subject under another truth (a counterfactual),
    which is how the tests show that only the intended signals carry a label.
    """
    vocab = vocab or build_vocabulary()
    idx = vocab.index
    dials = draw_dials(cfg, index)
    plan = plan_visits(_rng(cfg.seed, index, "visits"), cfg.visits)
    ts, birth_day = visit_timestamps(_rng(cfg.seed, index, "times"), plan, dials.irregularity)
    items, reused = problem_lists(_rng(cfg.seed, index, "content"), plan, dials, vocab)
    panels_rng = _rng(cfg.seed, index, "panels")
    panels = subject_panels(panels_rng, vocab)
    level = panel_levels(panels_rng, ts, plan, dials.progression)
    latent = latent or draw_latent(_rng(cfg.seed, index, "tasks"))

    rerecords = draw_rerecords(_rng(cfg.seed, index, "rerecord"), plan, cfg.rerecord)
    tasks = task_events(plan, latent, vocab, rerecords)
    codes, days, task_row = assemble(ts, plan, level, panels, items, tasks, vocab)
    # Values are drawn for the routine events only, whose number does not depend on the latent truth,
    # so a counterfactual truth changes no value but its own signals.
    numeric, text = np.full(len(codes), np.nan), np.full(len(codes), -1)
    routine = task_row < 0
    numeric[routine], text[routine] = draw_values(_rng(cfg.seed, index, "values"), codes[routine], vocab)
    numeric[~routine], text[~routine] = tasks.numeric[task_row[~routine]], tasks.text[task_row[~routine]]
    prediction_day = float(ts.day[ts.visit == plan.prediction_visit].max())
    if latent.level["acute_kidney_injury"] == 1:
        numeric[np.flatnonzero((codes == idx[CREATININE]) & (days <= prediction_day))[-1]] = (
            latent.raised_creatinine()
        )

    # The static sex row and MEDS_BIRTH open the timeline; MEDS_DEATH (for some) closes it.
    sex = SEX_CODES[int(_rng(cfg.seed, index, "static").random() < 0.5)]
    tail = [idx["MEDS_DEATH"]] if latent.death else []
    death_day = [_minute(ts.day[-1] + latent.death_delay_days())] if latent.death else []
    codes = np.concatenate([[idx[sex], idx["MEDS_BIRTH"]], codes, tail]).astype(np.int64)
    days = np.concatenate([[np.nan, birth_day], days, death_day])
    numeric = np.concatenate([[np.nan, np.nan], numeric, [np.nan] * len(tail)])
    text = np.concatenate([[-1, -1], text, [-1] * len(tail)]).astype(np.int64)
    record = subject_record(plan, dials, latent, ts, days, prediction_day, reused)
    return Subject(codes, days, numeric, text, dials, latent, prediction_day, record)


def subject_record(
    plan: Plan,
    dials: Dials,
    latent: Latent,
    ts: Timestamps,
    days: np.ndarray,
    prediction_day: float,
    reused: int,
) -> dict:
    """What metadata/subject_dials.parquet keeps beside the dials: counts, and per early task the number
    of events after its signal's timestamp up to the prediction time (what a context must span)."""
    n_before = int(np.sum(days <= prediction_day)) + 1  # + the static row
    record = {
        "n_visits": plan.n_visits,
        "prediction_visit": plan.prediction_visit,
        "n_events": len(days),
        "n_events_before_prediction": n_before,
        "burst_share": MAX_BURST_SHARE * dials.irregularity,
        "growth": MAX_GROWTH * dials.progression,
        "problem_codes_reused": reused,
        "death": latent.death,
    }
    for name, task in TASKS.items():
        if task.signal_visit is not None:
            signal_day = ts.day[(ts.visit == task.signal_visit) & (ts.kind == START)][0]
            record[f"{name}_events_after_signal"] = n_before - (int(np.sum(days <= signal_day)) + 1)
    return record


# ---------------------------------------------------------------------------------------------------
# Writing a cohort
# ---------------------------------------------------------------------------------------------------


@dataclass
class Args(SyntheticConfig):
    out: str = MISSING  # the MEDS root to write (a new or empty folder, or an identical earlier cohort)


def cohort_name(cfg: SyntheticConfig) -> str:
    """A folder name that spells out the config, e.g. n1000-seed0-cf0.5-irr0.5-prog0.5 (with -visits40
    or -rerecord0.5 appended when those are not the default, so default cohorts keep their earlier names)."""
    name = f"n{cfg.n_subjects}-seed{cfg.seed}-cf{cfg.copy_forward:g}-irr{cfg.irregularity:g}-prog{cfg.progression:g}"
    name = name if cfg.visits == SyntheticConfig.visits else f"{name}-visits{cfg.visits}"
    return name if cfg.rerecord == SyntheticConfig.rerecord else f"{name}-rerecord{cfg.rerecord:g}"


def check_config(cfg: SyntheticConfig) -> None:
    if cfg.n_subjects < 1:
        raise ConfigError(
            f"n_subjects={cfg.n_subjects}: a cohort needs at least one subject; pass n_subjects=1000."
        )
    if cfg.seed < 0:
        raise ConfigError(
            f"seed={cfg.seed}: seeds are non-negative integers (numpy SeedSequence); pass e.g. seed=0."
        )
    for name in (*DIALS, "rerecord"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(
                f"{name}={value}: dials run from 0 (property off) to 1 (strongest); pass a value in [0, 1]."
            )
    if cfg.visits < MIN_VISITS:
        raise ConfigError(
            f"visits={cfg.visits}: a timeline needs at least {MIN_VISITS} visits ({BASELINE_VISITS} baseline "
            f"visits carry the early signals and up to {N_VISITS_AFTER_PREDICTION[1] - 1} come after the "
            f"prediction time); pass visits={MIN_VISITS} or more (default {SyntheticConfig.visits})."
        )


def subject_ids(n_subjects: int) -> np.ndarray:
    return FIRST_SUBJECT_ID + np.arange(n_subjects, dtype=np.int64)


def shard_plan(cfg: SyntheticConfig) -> list[tuple[str, int, np.ndarray]]:
    """(split, shard number, subject indices) for every data shard: hash splits, SHARD_SUBJECTS per shard."""
    split = hash_splits(subject_ids(cfg.n_subjects))  # as ehrlong.data.meds splits a root without a file
    out = []
    for name in SPLITS:
        members = np.flatnonzero(split == name)
        n_shards = max(1, -(-len(members) // SHARD_SUBJECTS))
        out += [(name, k, chunk) for k, chunk in enumerate(np.array_split(members, n_shards)) if len(chunk)]
    return out


def _time_us(days: np.ndarray) -> np.ndarray:
    return np.round(np.nan_to_num(days) * 1440).astype(np.int64) * MINUTE_US


def _events_table(subjects: list[Subject], ids: np.ndarray, vocab: Vocabulary) -> pa.Table:
    codes = np.concatenate([s.codes for s in subjects])
    days = np.concatenate([s.days for s in subjects])
    numeric = np.concatenate([s.numeric for s in subjects]).astype(np.float32)
    text = np.concatenate([s.text for s in subjects])
    table = pa.table(
        {
            "subject_id": pa.array(np.repeat(ids, [len(s.codes) for s in subjects]), pa.int64()),
            "time": pa.array(_time_us(days), pa.timestamp("us"), mask=np.isnan(days)),
            "code": pa.array(vocab.codes).take(pa.array(codes)),
            "numeric_value": pa.array(numeric, pa.float32(), mask=np.isnan(numeric)),
            "text_value": pa.array(vocab.texts, pa.large_string()).take(pa.array(text, mask=text < 0)),
        }
    )
    meds.DataSchema.validate(table)
    return table


def _record_table(subjects: list[Subject], ids: np.ndarray, split: str) -> pa.Table:
    """One metadata/subject_dials.parquet row per subject: dials, prediction time, latent levels, counts."""
    columns = {
        "subject_id": pa.array(ids, pa.int64()),
        "split": pa.array([split] * len(ids), pa.string()),
        **{dial: [getattr(s.dials, dial) for s in subjects] for dial in DIALS},
        "prediction_time": pa.array(
            _time_us(np.array([s.prediction_day for s in subjects])), pa.timestamp("us")
        ),
        **{
            f"{name}_level": [task.levels[s.latent.level[name]] for s in subjects]
            for name, task in TASKS.items()
        },
        **{key: [s.record[key] for s in subjects] for key in subjects[0].record},
    }
    return pa.table(columns)


def _label_tables(records: pa.Table, outcomes: dict[str, list[bool]]) -> dict[str, pa.Table]:
    out = {}
    for name in TASKS:
        table = pa.table(
            {
                "subject_id": records["subject_id"],
                "prediction_time": records["prediction_time"],
                "boolean_value": pa.array(outcomes[name], pa.bool_()),
            }
        )
        meds.LabelSchema.validate(table)
        out[name] = table
    return out


def _codes_table(vocab: Vocabulary) -> pa.Table:
    table = pa.table(
        {
            "code": pa.array(vocab.codes, pa.string()),
            "description": pa.array(vocab.descriptions, pa.string()),
            "parent_codes": pa.array(vocab.parents, pa.list_(pa.string())),
        }
    )
    meds.CodeMetadataSchema.validate(table)
    return table


def _quantiles(x: np.ndarray) -> dict[str, float]:
    q = {"min": 0, "p10": 10, "median": 50, "p90": 90, "max": 100}
    return {k: float(np.percentile(x, v)) for k, v in q.items()}


def _summary(records: pa.Table, labels: dict[str, pa.Table], counts: dict[str, int]) -> dict:
    n_events = np.asarray(records["n_events"])
    early = {
        name: _quantiles(np.asarray(records[f"{name}_events_after_signal"]))
        for name, task in TASKS.items()
        if task.signal == "early"
    }
    return {
        "subjects": records.num_rows,
        "events": int(n_events.sum()),
        "events_per_subject": _quantiles(n_events),
        "share_over_16k_events": float(np.mean(n_events > LONG_CONTEXT)),
        "events_with_numeric_value": counts["numeric"],
        "events_with_text_value": counts["text"],
        "codes_used": counts["codes"],
        "deaths": int(np.sum(records["death"])),
        "problem_codes_reused": int(np.sum(records["problem_codes_reused"])),
        "split_subjects": {s: int(np.sum(np.asarray(records["split"]) == s)) for s in SPLITS},
        "prevalence": {name: float(np.mean(t["boolean_value"])) for name, t in labels.items()},
        "events_after_early_signal": early,
    }


def _tasks_json(labels: dict[str, pa.Table]) -> dict:
    tasks = []
    for name, task in TASKS.items():
        y = np.asarray(labels[name]["boolean_value"])
        tasks.append(
            {
                "name": name,
                "description": task.description,
                "signal": task.signal,
                "signal_events": task.signal_events,
                "outcome_code": task.outcome_code,
                "label_rule": f"true iff {task.outcome_code} occurs after prediction_time",
                "prediction_time": (
                    f"the last timestamp of a visit {N_VISITS_AFTER_PREDICTION[0]}-"
                    f"{N_VISITS_AFTER_PREDICTION[1] - 1} visits before the subject's last visit"
                ),
                "n": int(len(y)),
                "n_positive": int(y.sum()),
                "prevalence": float(y.mean()),
            }
        )
    return {"dataset": DATASET_NAME, "tasks": tasks}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dataset_json(cfg: SyntheticConfig) -> dict:
    meta = {
        "dataset_name": DATASET_NAME,
        "dataset_version": cohort_name(cfg),
        "etl_name": "ehrlong.data.synthetic",
        "etl_version": f"{ehrlong.__version__}+generator{GENERATOR_VERSION}",
        "meds_version": package_version("meds"),
        "license": "CC0-1.0 (synthetic: no real patient)",
    }
    meds.DatasetMetadataSchema.validate(meta)
    return meta


def _write_shards(
    cfg: SyntheticConfig, root: Path, vocab: Vocabulary, progress: bool
) -> tuple[pa.Table, dict[str, list[bool]], dict[str, int]]:
    """Generate and write data/<split>/<k>.parquet; return the subject records and outcomes (sorted by
    subject id) and counts of values and codes for the summary."""
    ids = subject_ids(cfg.n_subjects)
    records, outcomes = [], {name: [] for name in TASKS}
    counts = {"numeric": 0, "text": 0}
    codes_used = np.zeros(len(vocab.codes), dtype=bool)
    with tqdm(total=cfg.n_subjects, desc="synthetic cohort", unit="subject", disable=not progress) as bar:
        for split, k, members in shard_plan(cfg):
            subjects = []
            for i in members:
                subjects.append(generate_subject(cfg, int(i), vocab))
                bar.update()
            table = _events_table(subjects, ids[members], vocab)
            path = root / meds.data_subdirectory / split / f"{k}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
            counts["numeric"] += len(table) - table["numeric_value"].null_count
            counts["text"] += len(table) - table["text_value"].null_count
            for s in subjects:
                codes_used[s.codes] = True
            records.append(_record_table(subjects, ids[members], split))
            for name in TASKS:
                outcomes[name] += [s.latent.outcome[name] for s in subjects]
    counts["codes"] = int(codes_used.sum())
    order = np.argsort(np.concatenate([np.asarray(r["subject_id"]) for r in records]), kind="stable")
    return (
        pa.concat_tables(records).take(order),
        {k: list(np.asarray(v)[order]) for k, v in outcomes.items()},
        counts,
    )


def _write_metadata(
    cfg: SyntheticConfig, root: Path, vocab: Vocabulary, records: pa.Table, labels: dict[str, pa.Table]
) -> None:
    (root / "metadata").mkdir(exist_ok=True)
    splits = records.select(["subject_id", "split"])
    meds.SubjectSplitSchema.validate(splits)
    pq.write_table(splits, root / meds.subject_splits_filepath)
    pq.write_table(records, root / "metadata" / "subject_dials.parquet")
    pq.write_table(_codes_table(vocab), root / meds.code_metadata_filepath)
    _write_json(root / meds.dataset_metadata_filepath, _dataset_json(cfg))
    (root / "labels").mkdir()
    for name, table in labels.items():
        pq.write_table(table, root / "labels" / f"{name}.parquet")
    _write_json(root / "labels" / "tasks.json", _tasks_json(labels))


def _manifest(root: Path) -> dict[str, dict]:
    return {
        p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _write_cohort(cfg: SyntheticConfig, root: Path, progress: bool) -> dict:
    """Write every file of the cohort under `root` (which exists and is empty); returns the summary."""
    vocab = build_vocabulary()
    records, outcomes, counts = _write_shards(cfg, root, vocab, progress)
    labels = _label_tables(records, outcomes)
    _write_metadata(cfg, root, vocab, records, labels)
    summary = _summary(records, labels, counts)
    record = {"generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(cfg), "summary": summary}
    _write_json(root / "metadata" / "synthetic.json", {**record, "files": _manifest(root)})
    return summary


def _earlier_cohort(cfg: SyntheticConfig, out: Path) -> dict | None:
    """The stored summary when `out` holds a complete cohort from this config and generator version.

    Complete means every file in its manifest is present with the recorded size (sizes, not hashes, so
    the check stays cheap on a 100 MB cohort; `synthetic.json` keeps the sha256 for a full check).
    """
    try:
        meta = json.loads((out / "metadata" / "synthetic.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    # A record written before a config field existed was made with that field's default.
    recorded = {**dataclasses.asdict(SyntheticConfig()), **meta.get("config", {})}
    same = meta.get("generator_version") == GENERATOR_VERSION and recorded == dataclasses.asdict(cfg)
    complete = all(
        (out / f).is_file() and (out / f).stat().st_size == m["bytes"]
        for f, m in meta.get("files", {}).items()
    )
    return meta["summary"] if same and complete else None


def generate(cfg: SyntheticConfig, out: Path, progress: bool = True) -> dict:
    """Write the cohort for `cfg` to `out` atomically and return its summary.

    Files are written to a hidden temporary folder beside `out` and renamed into place, so `out` is
    either complete or absent. An `out` that already holds the same cohort (same config and generator
    version, all files present) is kept as it is and its stored summary returned with `reused: True`;
    any other non-empty `out` is an error, never overwritten.
    """
    check_config(cfg)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        earlier = _earlier_cohort(cfg, out)
        if earlier is None:
            raise DataError(
                f"{out} exists and is not an empty folder or a synthetic cohort made with this config "
                f"({cohort_name(cfg)}, generator version {GENERATOR_VERSION}); it will not be overwritten. "
                f"Pass a new out=DIR, or delete {out} first."
            )
        return {**earlier, "reused": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        summary = _write_cohort(cfg, tmp, progress)
        try:
            os.replace(tmp, out)  # POSIX: replaces an empty folder, fails on a non-empty one
        except OSError:
            # Another process finished the same cohort first: keep theirs if it is identical.
            earlier = _earlier_cohort(cfg, out)
            if earlier is None:
                raise
            return {**earlier, "reused": True}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "reused": False}


def ensure_cohort(cfg: SyntheticConfig) -> Path:
    """The cohort for `cfg` under <data root>/synthetic/<cohort_name>, generated on first use."""
    root = data_root() / "synthetic" / cohort_name(cfg)
    generate(cfg, root)
    return root


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def format_summary(summary: dict, out: Path, seconds: float) -> str:
    q = summary["events_per_subject"]
    lines = [
        f"synthetic cohort {'(already there) ' if summary.get('reused') else ''}at {out}",
        f"  {summary['subjects']:,} subjects, {summary['events']:,} events ({summary['codes_used']:,} codes); "
        + ", ".join(f"{s} {n:,}" for s, n in summary["split_subjects"].items()),
        f"  events/subject: min {q['min']:,.0f}, p10 {q['p10']:,.0f}, median {q['median']:,.0f}, "
        f"p90 {q['p90']:,.0f}, max {q['max']:,.0f}; over 16k: {100 * summary['share_over_16k_events']:.1f}%",
        f"  values: {100 * summary['events_with_numeric_value'] / summary['events']:.0f}% numeric, "
        f"{100 * summary['events_with_text_value'] / summary['events']:.0f}% text; deaths {summary['deaths']:,}",
        "  tasks (label prevalence; events between an early signal and the prediction time, median / p10):",
    ]
    for name, prevalence in summary["prevalence"].items():
        gap = summary["events_after_early_signal"].get(name)
        where = f"early, {gap['median']:,.0f} / {gap['p10']:,.0f} events" if gap else "recent"
        lines.append(f"    {name:22s} {100 * prevalence:5.1f}%  ({where})")
    if summary["problem_codes_reused"]:
        lines.append(
            f"  note: {summary['problem_codes_reused']:,} fresh problems reused a code (vocabulary exhausted)"
        )
    lines.append(f"  took {seconds:.1f} s")
    return "\n".join(lines)


def run(args: Args) -> int:
    cfg = SyntheticConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)})
    out = Path(args.out)
    start = time.perf_counter()
    summary = generate(cfg, out)
    print(format_summary(summary, out, time.perf_counter() - start))
    return 0
