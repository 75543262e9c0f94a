"""Where ehrlong keeps data, runs and caches.

Each root comes from, in order: an explicit argument (a config value), the environment
(`EHRLONG_DATA`, `EHRLONG_RUNS`, `EHRLONG_CACHE`), and a default relative to the working directory.
Nothing committed holds an absolute path (DESIGN.md §7.9).
"""

from __future__ import annotations

import os
from pathlib import Path


def _root(explicit: str | os.PathLike | None, env: str, default: str) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get(env) or default).expanduser()


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Generated and fetched datasets (synthetic cohorts, the MIMIC-IV demo)."""
    return _root(explicit, "EHRLONG_DATA", "data")


def runs_root(explicit: str | os.PathLike | None = None) -> Path:
    """Run directories `runs/<config_name>/<timestamp>/` and the local MLflow store."""
    return _root(explicit, "EHRLONG_RUNS", "runs")


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """Token stores and downloads that can be rebuilt."""
    return _root(explicit, "EHRLONG_CACHE", "cache")
