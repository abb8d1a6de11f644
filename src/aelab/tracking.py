"""Every MLflow call of the project lives here.

Store: `MLFLOW_TRACKING_URI` when set (e.g. a team's `mlflow server`), else an embedded sqlite
database `<repo>/mlflow.db` with artifacts in `<repo>/mlartifacts`, where `<repo>` is
`DVC_ROOT` (set by DVC, and pointing at the real repository even for `dvc exp run --temp` and
queued experiments, whose temp copies are deleted afterwards) or the git top level.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator, Mapping

DEFAULT_EXPERIMENT = "aelab"


def repo_root() -> Path:
    """The project root: DVC_ROOT, else the git top level, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True)
        return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd().resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the sqlite store at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def experiment_name() -> str:
    """AELAB_MLFLOW_EXPERIMENT, default 'aelab'."""
    return os.environ.get("AELAB_MLFLOW_EXPERIMENT", DEFAULT_EXPERIMENT)


def git_commit() -> str:
    """HEAD's commit hash, or 'unknown' outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pipeline_id(params_path: str | Path = "params.yaml") -> str:
    """Groups the runs of one pipeline execution: hash of git HEAD and params.yaml's bytes."""
    digest = hashlib.sha1(git_commit().encode())
    path = Path(params_path)
    if path.is_file():
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first contact with a local sqlite store (its schema migration races)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_experiment(name: str | None = None) -> str:
    """Create (once, under a lock) the store and the experiment; return its id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = name or experiment_name()
    with _store_lock(uri):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (repo_root() / "mlartifacts").as_uri()
        return client.create_experiment(name, artifact_location=artifacts)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and tuples become strings."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


class StageRun:
    """The MLflow run of one DVC stage execution."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_epoch(self, row: Mapping[str, float]) -> None:
        """Log one history row as metrics at step = row['epoch']."""
        import mlflow

        metrics = {k: float(v) for k, v in row.items() if k != "epoch"}
        mlflow.log_metrics(metrics, step=int(row["epoch"]))

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Log final (step-less) metrics."""
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file into the run's artifacts."""
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)


@contextlib.contextmanager
def stage_run(run_name: str, *, stage: str, dataset: str, params: Mapping[str, Any],
              variant: str | None = None, mode: str | None = None,
              seed: int | None = None) -> Iterator[StageRun]:
    """Open one MLflow run named `run_name`, tagged and with `params` logged (flattened)."""
    import mlflow

    experiment_id = ensure_experiment()
    tags = {"stage": stage, "dataset": dataset, "git_commit": git_commit(),
            "pipeline": pipeline_id()}
    if variant:
        tags["variant"] = variant
    if mode:
        tags["mode"] = mode
    if seed is not None:
        tags["seed"] = str(seed)
    if os.environ.get("DVC_EXP_NAME"):
        tags["DVC_EXP_NAME"] = os.environ["DVC_EXP_NAME"]
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
        yield StageRun(run.info.run_id)


def log_to_run(run_id: str, metrics: Mapping[str, float]) -> bool:
    """Add final metrics to an earlier (finished) run, e.g. test accuracy after evaluation.

    Returns False (and logs nothing) when the run is not in this store, e.g. a classifier
    restored from DVC's cache that was trained against another MLflow store.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    return True


def log_artifacts_to_run(run_id: str, paths) -> None:
    """Copy files into an earlier run's artifacts (figures made after all seeds trained)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    for path in paths:
        client.log_artifact(run_id, str(path))
