"""python -m ehrlong.evaluation.groundtruth n_subjects=1000: do the strata measure what they claim?

The synthetic cohort draws three dials per subject (copy-forward rate, gap irregularity, progression)
and records them in metadata/subject_dials.parquet. Each stratum (DESIGN.md §6) should follow its own
dial and ignore the other two: this prints the Spearman correlation of every measured stratum (on the
history at or before each subject's prediction time) with every dial, across subjects, and exits 1 if
a stratum misses its dial (rho < 0.8) or follows another one (|rho| > 0.3), the bars of issue 5.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ehrlong.config import SyntheticConfig, parse
from ehrlong.data.meds import scan_events
from ehrlong.data.synthetic import DIALS, ensure_cohort
from ehrlong.errors import run_cli
from ehrlong.evaluation.strata import DIAL_OF_STRATUM, meds_strata

OWN_MIN, OTHER_MAX = 0.8, 0.3


@dataclass
class Args:
    n_subjects: int = 1000
    seed: int = 0
    task: str = "lung_cancer"  # whose prediction times cut the histories
    out: str | None = None  # optional JSON of the matrix


def spearman_matrix(cohort: Path, task: str) -> pl.DataFrame:
    """One row per stratum, one column per dial: Spearman's rho across subjects."""
    labels = pl.read_parquet(cohort / "labels" / f"{task}.parquet")
    dials = pl.read_parquet(cohort / "metadata" / "subject_dials.parquet").select("subject_id", *DIALS)
    measured = meds_strata(scan_events(cohort, with_text=False), labels).join(dials, on="subject_id")
    rows = []
    for stratum in DIAL_OF_STRATUM:
        rho = {d: measured.select(pl.corr(stratum, d, method="spearman")).item() for d in DIALS}
        rows.append({"stratum": stratum, "own_dial": DIAL_OF_STRATUM[stratum], **rho})
    return pl.DataFrame(rows)


def main(argv: Sequence[str]) -> int:
    args = parse(Args, argv, prog="python -m ehrlong.evaluation.groundtruth")
    cohort = ensure_cohort(SyntheticConfig(n_subjects=args.n_subjects, seed=args.seed))
    matrix = spearman_matrix(cohort, args.task)
    ok = True
    print(f"Spearman rho, measured stratum vs dial, {args.n_subjects} subjects ({cohort}):")
    print(f"{'stratum':14s} " + " ".join(f"{d:>14s}" for d in DIALS) + "   verdict")
    for row in matrix.iter_rows(named=True):
        own = row[row["own_dial"]]
        others = [abs(row[d]) for d in DIALS if d != row["own_dial"]]
        good = own >= OWN_MIN and max(others) <= OTHER_MAX
        ok &= good
        print(
            f"{row['stratum']:14s} "
            + " ".join(f"{row[d]:14.3f}" for d in DIALS)
            + f"   {'ok' if good else 'FAIL'} (own >= {OWN_MIN}, others <= {OTHER_MAX})"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(matrix.to_dicts(), indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    run_cli(main)
