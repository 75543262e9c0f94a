"""MLflow: a local store inside the runs folder by default, any server via MLFLOW_TRACKING_URI.

Every run is findable by the tags `backbone`, `context_length`, `config_name`, `dataset` and `size`, and carries
the flattened resolved config as params (DESIGN.md §3 "Run directory").
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger

TAG_KEYS = ("backbone", "context_length", "config_name", "dataset", "size")  # train.py sets each


def tracking_uri(explicit: str | None, runs_root: Path) -> str:
    """config value > $MLFLOW_TRACKING_URI > sqlite store `<runs_root>/mlflow.db` (mlflow 3 deprecates
    the plain-file store)."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    runs_root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{runs_root.resolve() / 'mlflow.db'}"


def artifact_location(uri: str, runs_root: Path) -> str | None:
    """Local artifacts beside a local store; a remote server decides its own."""
    return (runs_root.resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None


def make_logger(
    uri: str, experiment: str, runs_root: Path, run_name: str, tags: dict[str, str], run_id: str | None = None
) -> MLFlowLogger:
    return MLFlowLogger(
        experiment_name=experiment,
        tracking_uri=uri,
        run_name=run_name,
        tags={k: str(v) for k, v in tags.items()},
        artifact_location=artifact_location(uri, runs_root),
        run_id=run_id,
    )
