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


def create_local_store(uri: str, runs_root: Path) -> None:
    """Create a missing sqlite store whole or not at all (issue 8, crash safety).

    MLflow builds a fresh store by creating tables and then running ~50 schema migrations, one commit
    at a time (about 5-15 s on a 2-core CPU). A process killed in between leaves a store that passes
    `PRAGMA integrity_check` but that MLflow can never open again ("index ... already exists"; 2 of 16
    random SIGKILLs during creation, measured). So the store is built under a temporary name beside the
    target and linked into place: os.link fails if the target appeared meanwhile (another process
    created it first, and that one is kept), so nobody's runs are ever replaced."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", artifact_location(uri, runs_root))
        store.engine.dispose()  # closes the file: no journal left to replay
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


def check_resumable(uri: str, run_id: str, run_dir: Path) -> None:
    """A resumed run logs into its own MLflow run: refuse early when this store does not hold it (the run
    directory was moved from another runs folder, or the tracking URI changed)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ehrlong.errors import ConfigError

    missing_store = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()
    try:
        if missing_store:  # get_run would create an empty store here, and fail anyway
            raise MlflowException("no store")
        MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise ConfigError(
            f"resume={run_dir}: its MLflow run {run_id} (run_dir/mlflow_run_id) is not in the store {uri}. "
            "Resume with the store it was logged to: tracking.tracking_uri=URI, or EHRLONG_RUNS= the runs "
            "folder it came from (or tracking.enabled=false to resume without MLflow)."
        ) from None


def make_logger(
    uri: str, experiment: str, runs_root: Path, run_name: str, tags: dict[str, str], run_id: str | None = None
) -> MLFlowLogger:
    create_local_store(uri, runs_root)
    return MLFlowLogger(
        experiment_name=experiment,
        tracking_uri=uri,
        run_name=run_name,
        tags={k: str(v) for k, v in tags.items()},
        artifact_location=artifact_location(uri, runs_root),
        run_id=run_id,
    )


def mark_killed(logger: MLFlowLogger) -> None:
    """Mark the run KILLED (stopped by SIGTERM, resumable): Lightning finalizes a fit that stopped early
    as FINISHED, and MLflow's UI would show an unfinished run as done. `resume=` sets it FINISHED again
    when it completes (MLFlowLogger.finalize)."""
    logger.experiment.set_terminated(logger.run_id, status="KILLED")
