"""The MLflow side of aelab.tracking: every MLflow call of the project lives here.

Run as `python -m aelab.tracking_agent` by aelab.tracking, one process per stage, beside the
training process: it imports MLflow and opens the store (about 2 s on 2 cores) while the stage
imports torch and trains, then carries out the requests it reads from stdin, one JSON object a
line, in order. Requests with a `key` that need an answer (`start`, `log_to_run`, `ping`) get
one JSON line on stdout. The first failure ends the agent with exit status 1 and one line on
stderr, which the stage reports as its error.

Except an outage of a remote store (an `mlflow server` that stops answering mid-run): the agent
then goes offline instead, appending that write and every later one to a spool file in
AELAB_TRACKING_SPOOL (`spool-<time>-<pid>.jsonl`, logged artifacts copied to `<that>.files/`)
and answering with placeholder run ids (`offline-<hex>`). At the end it replays the spool once;
if the server is still away it leaves the spool and its last stdout line, `{"key": "spool",
"warning": ...}`, tells the stage to say so. `python -m aelab.tracking_agent --replay <spool>`
writes it later; the real ids of the placeholders go to `replayed-ids.jsonl` beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

# MLflow retries a failed HTTP request 7 times with exponential backoff by default: minutes per
# write against a dead server. Here a dead server costs about 2 s, once, before going offline.
# And no "View run ... at: <url>" lines on stdout from each run ended on a tracking server.
MLFLOW_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                   "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
PLACEHOLDER = "offline-"
IDS_FILE = "replayed-ids.jsonl"


def is_remote(uri: str) -> bool:
    """A tracking server (http or https), which may be down, rather than a local store."""
    return uri.startswith(("http://", "https://"))


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
    """Create (once, under a lock) the store and the experiment; return its id.

    A new sqlite store is built (schema migrations, experiment) in a temp file that is renamed
    into place when complete: a process killed meanwhile leaves no half-migrated database."""
    from mlflow.tracking import MlflowClient

    with _store_lock(uri):
        db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if db is not None and not db.exists():
            tmp = db.with_name(f".{db.name}.new-{os.getpid()}")
            try:
                _get_or_create(MlflowClient(f"sqlite:///{tmp}"), name, artifact_root)
                os.replace(tmp, db)
            finally:
                tmp.unlink(missing_ok=True)
        return _get_or_create(MlflowClient(uri), name, artifact_root)


def _get_or_create(client, name: str, artifact_root: Path | None) -> str:
    """The id of experiment `name`, created if missing (a server has no file lock: another
    stage may create it first)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_root.as_uri() if artifact_root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def outage(err: BaseException) -> str | None:
    """The short reason when `err` is a server not answering (no connection, a timeout, retries
    used up on 5xx answers), else None."""
    import requests

    kinds = (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout,
             requests.exceptions.RetryError)
    reason, seen, cur = None, set(), err
    while cur is not None and id(cur) not in seen:  # the deepest one says it best
        seen.add(id(cur))
        if isinstance(cur, kinds):
            reason = getattr(cur, "strerror", None) or " ".join(str(cur).split())[:300]
        cur = cur.__cause__ or cur.__context__
    return reason


def _reason(err: BaseException) -> str:
    """One short line for `err`."""
    return outage(err) or " ".join(str(err).split())[:300] or type(err).__name__


def _now() -> int:
    """Now, in MLflow's milliseconds."""
    return int(time.time() * 1000)


class Store:
    """Writes records, one MLflow write each, to one store and experiment.

    A record names its run by id; placeholders (runs created offline) are resolved through
    `ids`, and, for runs of other stages' spools, through the replayed-ids file in `spool_dir`.
    """

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None,
                 spool_dir: Path | None) -> None:
        self.uri, self.experiment, self.artifact_root = uri, experiment, artifact_root
        self.spool_dir = spool_dir
        self.ids: dict[str, str] = {}  # placeholder -> MLflow run id
        self.client = None
        self.experiment_id: str | None = None

    def run_id(self, run_id: str) -> str:
        """The MLflow run id for `run_id` (itself unless a replayed placeholder)."""
        if run_id.startswith(PLACEHOLDER) and run_id not in self.ids and self.spool_dir:
            with contextlib.suppress(FileNotFoundError):
                for line in (self.spool_dir / IDS_FILE).read_text().splitlines():
                    self.ids.update(json.loads(line))
        return self.ids.get(run_id, run_id)

    def apply(self, rec: dict) -> Any:
        """Carry out one record: `create` returns the new run's id, `log_to_run` whether the
        run is in this store."""
        if self.client is None:
            from mlflow.tracking import MlflowClient

            self.experiment_id = ensure_experiment(self.uri, self.experiment, self.artifact_root)
            self.client = MlflowClient(self.uri)
        op = rec["op"]
        if op == "create":
            if rec.get("resumed"):
                run_id = self._reopen(rec["tags"]["resume_key"])
                if run_id is not None:
                    return run_id
            run = self.client.create_run(self.experiment_id, start_time=rec["time"],
                                         tags=rec["tags"], run_name=rec["name"])
            return run.info.run_id
        run_id = self.run_id(rec["run_id"])
        if op == "params":
            self._params(run_id, rec["params"])
        elif op == "metrics":
            self._metrics(run_id, rec["metrics"], rec["step"], rec["time"])
        elif op == "artifacts":
            for path in rec["paths"]:
                self.client.log_artifact(run_id, path, rec["artifact_path"])
        elif op == "end":
            self.client.set_terminated(run_id, status=rec["status"], end_time=rec["time"])
        elif op == "log_to_run":
            from mlflow.exceptions import MlflowException

            try:
                self.client.get_run(run_id)
            except MlflowException as err:  # a run restored from DVC's cache, logged elsewhere
                if outage(err):
                    raise
                return False
            self._metrics(run_id, rec["metrics"], None, rec["time"])
            return True
        else:
            raise ValueError(f"unknown record {op!r}")
        return None

    def _reopen(self, resume_key: str) -> str | None:
        """A training run resumed from a checkpoint (aelab.resume) goes on logging into the
        latest run tagged with its `resume_key`; None if this store has none (a new run)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.resume_key = '{resume_key}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return None
        run_id = runs[0].info.run_id
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "resumed", "true")
        return run_id

    def _params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(run_id, params=items[i:i + 100])

    def _metrics(self, run_id: str, metrics: dict, step: int | None, now: int) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])


class Spool:
    """Records kept while the server is away: a header line, then one record a line."""

    def __init__(self, directory: Path, uri: str, experiment: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"spool-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.path = directory / f"{stem}.jsonl"
        self.fh = open(self.path, "w")
        self.lines = 0
        self._write({"spool": 1, "uri": uri, "experiment": experiment})

    def _write(self, rec: dict) -> None:
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()  # what was logged survives the agent
        self.lines += 1

    def add(self, rec: dict) -> Any:
        """Keep a record; answer as Store.apply would (a placeholder id for a new run)."""
        if rec["op"] == "create":
            rec = {**rec, "run_id": PLACEHOLDER + uuid.uuid4().hex}
        elif rec["op"] == "artifacts":  # the stage may overwrite or delete them before replay
            target = files_dir(self.path) / str(self.lines)
            target.mkdir(parents=True)
            rec = {**rec, "paths": [shutil.copy2(p, target) for p in rec["paths"]]}
        self._write(rec)
        if rec["op"] == "create":
            return rec["run_id"]
        return True if rec["op"] == "log_to_run" else None  # log_to_run: checked at replay


def files_dir(spool: Path) -> Path:
    """Where a spool's artifacts are copied."""
    return spool.with_suffix(".files")


def replay(spool: Path, uri: str | None = None) -> int:
    """Write a spool's records into `uri` (default: the store it was meant for) and delete it;
    return how many. On a failure the spool keeps the records not yet written."""
    header, *records = [json.loads(ln) for ln in spool.read_text().splitlines() if ln.strip()]
    store = Store(uri or header["uri"], header["experiment"], None, spool.parent)
    for done, rec in enumerate(records):
        try:
            result = store.apply(rec)
        except Exception:
            rest = spool.with_name(spool.name + ".tmp")
            rest.write_text("".join(json.dumps(r) + "\n" for r in [header, *records[done:]]))
            os.replace(rest, spool)
            raise
        if rec["op"] == "create":  # runs created now are not created again by a later try
            store.ids[rec["run_id"]] = result
            with open(spool.parent / IDS_FILE, "a") as fh:
                fh.write(json.dumps({rec["run_id"]: result}) + "\n")
    spool.unlink()
    shutil.rmtree(files_dir(spool), ignore_errors=True)
    return len(records)


class Agent:
    """Carries out tracking requests against one store and experiment, offline (spooling) once
    a remote store stops answering."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None,
                 spool_dir: Path | None) -> None:
        # Imported at once (the slow part, ~1.8 s on 2 cores) while the stage imports torch; the
        # store is opened by the first request, so a stage that fails before logging leaves none.
        import mlflow.tracking  # noqa: F401

        if uri.startswith("sqlite:"):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        self.store = Store(uri, experiment, artifact_root, spool_dir)
        self.spool: Spool | None = None
        self.runs: dict[str, str] = {}  # client key -> run id (a placeholder if made offline)

    def handle(self, req: dict) -> dict | None:
        op, key = req["op"], req.get("key")
        if op == "start":
            run_id = self.write({"op": "create", "name": req["name"], "tags": req["tags"],
                                 "time": _now(), "resumed": req.get("resumed", False)})
            self.runs[key] = run_id
            self.write({"op": "params", "run_id": run_id, "params": req["params"]})
            return {"key": key, "run_id": run_id}
        if op == "metrics":
            self.write({"op": "metrics", "run_id": self.runs[key], "metrics": req["metrics"],
                        "step": req.get("step"), "time": _now()})
        elif op == "artifacts":
            self.write({"op": "artifacts", "run_id": self.runs[key], "paths": req["paths"],
                        "artifact_path": req.get("artifact_path")})
        elif op == "end":
            self.write({"op": "end", "run_id": self.runs[key], "status": req["status"],
                        "time": _now()})
        elif op == "log_to_run":
            ok = self.write({"op": "log_to_run", "run_id": req["run_id"],
                             "metrics": req["metrics"], "time": _now()})
            return {"key": key, "ok": ok}
        elif op == "ping":
            return {"key": key, "ok": True}
        else:
            raise ValueError(f"unknown request {op!r}")
        return None

    def write(self, rec: dict) -> Any:
        """Write a record to the store, or to the spool once a remote store has stopped
        answering (a local store's failure is an error)."""
        if self.spool is None:
            try:
                return self.store.apply(rec)
            except Exception as err:
                if self.store.spool_dir is None or outage(err) is None:
                    raise
                self.spool = Spool(self.store.spool_dir, self.store.uri, self.store.experiment)
        return self.spool.add(rec)

    def finish(self) -> dict | None:
        """Replay the spool once (the server may be back); if that fails, the stage's notice."""
        if self.spool is None:
            return None
        self.spool.fh.close()
        path = self.spool.path
        try:
            replay(path, self.store.uri)
            return None
        except Exception as err:
            state = (f"unreachable ({outage(err)})" if outage(err)
                     else f"did not take the buffered records ({_reason(err)})")
        left = len(path.read_text().splitlines()) - 1  # the header
        return {"key": "spool", "warning": (
            f"MLflow server at {self.store.uri} {state}: {left} tracking records kept in "
            f"{path}; replay them with: python -m aelab.tracking_agent --replay {path}")}


def serve() -> int:
    """The agent of one stage: requests from stdin, answers on stdout."""
    # Below the training process in the scheduler: the agent fills the cycles training leaves
    # idle instead of taking a core from it (its backlog is written at the stage's end anyway).
    with contextlib.suppress(OSError):
        os.nice(10)
    uri = os.environ["AELAB_TRACKING_URI"]
    experiment = os.environ["AELAB_TRACKING_EXPERIMENT"]
    root = os.environ.get("AELAB_TRACKING_ARTIFACTS")
    spool_dir = os.environ.get("AELAB_TRACKING_SPOOL")
    # The answers own stdout: whatever else is written there goes to stderr, the agent's log.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        agent = Agent(uri, experiment, Path(root) if root else None,
                      Path(spool_dir) if spool_dir else None)
        for line in sys.stdin:
            reply = agent.handle(json.loads(line))
            if reply is not None:
                print(json.dumps(reply), file=answers, flush=True)
        notice = agent.finish()
        if notice is not None:
            print(json.dumps(notice), file=answers, flush=True)
    except Exception as err:  # one line for the stage's error message
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"MLflow tracking failed ({uri}): {message}"[:2000], file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aelab.tracking_agent",
        description="The tracking agent of a stage (started by aelab.tracking), or --replay.")
    parser.add_argument("--replay", type=Path, metavar="SPOOL",
                        help="write a spool file left by an MLflow outage into "
                             "MLFLOW_TRACKING_URI (default: the server it was meant for)")
    args = parser.parse_args(argv)
    for name, value in MLFLOW_DEFAULTS.items():  # before MLflow reads them
        os.environ.setdefault(name, value)
    if args.replay is None:
        return serve()
    try:
        count = replay(args.replay, os.environ.get("MLFLOW_TRACKING_URI"))
    except Exception as err:
        print(f"Error: replay of {args.replay} stopped ({_reason(err)}); the records not "
              "written are still in it", file=sys.stderr)
        return 1
    print(f"replayed {count} tracking records from {args.replay}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
