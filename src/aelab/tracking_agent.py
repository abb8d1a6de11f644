"""The MLflow side of aelab.tracking: every MLflow call of the project lives here.

Run as `python -m aelab.tracking_agent` by aelab.tracking, one process per stage, beside the
training process: it imports MLflow and opens the store (about 2 s on 2 cores) while the stage
imports torch and trains, then carries out the requests it reads from stdin, one JSON object a
line, in order. Requests with a `key` that need an answer (`start`, `log_to_run`, `ping`) get
one JSON line on stdout. The first failure ends the agent with exit status 1 and one line on
stderr, which the stage reports as its error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Iterator


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


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    """Create (once, under a lock) the store and the experiment; return its id."""
    from mlflow.tracking import MlflowClient

    with _store_lock(uri):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = artifact_root.as_uri() if artifact_root is not None else None
        return client.create_experiment(name, artifact_location=location)


class Agent:
    """Carries out tracking requests against one store and experiment."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None) -> None:
        # Imported at once (the slow part, ~1.8 s on 2 cores) while the stage imports torch; the
        # store is opened by the first request, so a stage that fails before logging leaves none.
        import mlflow.tracking  # noqa: F401

        if uri.startswith("sqlite:"):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        self.uri, self.experiment, self.artifact_root = uri, experiment, artifact_root
        self.client = None
        self.experiment_id: str | None = None
        self.runs: dict[str, str] = {}  # client key -> MLflow run id

    def handle(self, req: dict) -> dict | None:
        op = req["op"]
        if self.client is None and op != "ping":
            from mlflow.tracking import MlflowClient

            self.experiment_id = ensure_experiment(self.uri, self.experiment, self.artifact_root)
            self.client = MlflowClient(self.uri)
        if op == "start":
            run = self.client.create_run(self.experiment_id, run_name=req["name"],
                                         tags=req["tags"])
            self.runs[req["key"]] = run.info.run_id
            self._params(run.info.run_id, req["params"])
            return {"key": req["key"], "run_id": run.info.run_id}
        if op == "metrics":
            self._metrics(self.runs[req["key"]], req["metrics"], req.get("step"))
        elif op == "artifacts":
            for path in req["paths"]:
                self.client.log_artifact(self.runs[req["key"]], path, req.get("artifact_path"))
        elif op == "end":
            self.client.set_terminated(self.runs[req["key"]], status=req["status"])
        elif op == "log_to_run":
            from mlflow.exceptions import MlflowException

            try:
                self.client.get_run(req["run_id"])
            except MlflowException:  # a run restored from DVC's cache, logged to another store
                return {"key": req["key"], "ok": False}
            self._metrics(req["run_id"], req["metrics"], None)
            return {"key": req["key"], "ok": True}
        elif op == "ping":
            return {"key": req["key"], "ok": True}
        else:
            raise ValueError(f"unknown request {op!r}")
        return None

    def _params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(run_id, params=items[i:i + 100])

    def _metrics(self, run_id: str, metrics: dict, step: int | None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])


def main() -> int:
    # Below the training process in the scheduler: the agent fills the cycles training leaves
    # idle instead of taking a core from it (its backlog is written at the stage's end anyway).
    with contextlib.suppress(OSError):
        os.nice(10)
    uri = os.environ["AELAB_TRACKING_URI"]
    experiment = os.environ["AELAB_TRACKING_EXPERIMENT"]
    root = os.environ.get("AELAB_TRACKING_ARTIFACTS")
    try:
        agent = Agent(uri, experiment, Path(root) if root else None)
        for line in sys.stdin:
            reply = agent.handle(json.loads(line))
            if reply is not None:
                print(json.dumps(reply), flush=True)
    except Exception as err:  # one line for the stage's error message
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"MLflow tracking failed ({uri}): {message}"[:2000], file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
