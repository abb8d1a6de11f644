"""The MLflow side of aelab.tracking: every MLflow call of the project lives here.

Run as `python -m aelab.tracking_agent` by aelab.tracking, one process per stage, beside the
training process: it imports MLflow and opens the store (about 2 s on 2 cores) while the stage
imports torch and trains, then carries out the requests it reads from stdin, one JSON object a
line, in order. Requests with a `key` that need an answer (`start`, `log_to_run`, `register`,
`ping`) get one JSON line on stdout; `prepare` imports what a later `register` needs. The
first failure ends the agent with exit status 1 and one line on stderr, which the stage
reports as its error.

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
import base64
import contextlib
import fcntl
import io
import json
import os
import queue
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

# MLflow retries a failed HTTP request 7 times with exponential backoff by default: minutes per
# write against a dead server. Here a dead server costs about 2 s, once, before going offline.
# And no "View run ... at: <url>" lines on stdout from each run ended on a tracking server.
MLFLOW_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                   "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
PLACEHOLDER = "offline-"
IDS_FILE = "replayed-ids.jsonl"
PARENT_TAG = "mlflow.parentRunId"  # the UI nests a run under this one
PIPELINE_TAG = "aelab_pipeline_run"  # marks (and keys) the parent run of a pipeline execution


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


def duplicate(err: BaseException) -> bool:
    """Whether `err` is a store refusing a row that another writer inserted first: MLflow
    checks whether a dataset exists and then inserts it, so two stages logging the same dataset
    at once (`dvc queue start -j 2`) can both miss it and one insert fails. A retry finds it."""
    seen, cur = set(), err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if type(cur).__name__ in ("IntegrityError", "UniqueViolation") or any(
                word in str(cur) for word in ("UNIQUE constraint", "IntegrityError",
                                              "UniqueViolation", "Duplicate entry")):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _reason(err: BaseException) -> str:
    """One short line for `err`."""
    return outage(err) or " ".join(str(err).split())[:300] or type(err).__name__


def now_ms() -> int:
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
            tags = dict(rec["tags"])
            if PARENT_TAG in tags:  # a placeholder if the parent was made offline
                tags[PARENT_TAG] = self.run_id(tags[PARENT_TAG])
            run = self.client.create_run(self.experiment_id, start_time=rec["time"],
                                         tags=tags, run_name=rec["name"])
            return run.info.run_id
        if op == "parent":
            return self._pipeline_run(rec)
        run_id = self.run_id(rec["run_id"])
        if op == "params":
            self._params(run_id, rec["params"])
        elif op == "metrics":  # one step's, or several steps' (`rows`, see Agent.metrics)
            rows = rec.get("rows") or [{"metrics": rec["metrics"], "step": rec["step"],
                                        "time": rec["time"]}]
            self._metrics(run_id, rows)
        elif op == "artifacts":
            for path in rec["paths"]:
                self.client.log_artifact(run_id, path, rec["artifact_path"])
        elif op == "end":
            self.client.set_terminated(run_id, status=rec["status"], end_time=rec["time"])
        elif op == "image":
            from PIL import Image

            # The PNG's bytes; a spool written before 4 December 2026 holds a copy's path.
            png = base64.b64decode(rec["png"]) if "png" in rec else Path(rec["path"]).read_bytes()
            with Image.open(io.BytesIO(png)) as image:
                self.client.log_image(run_id, image.convert("RGB"), key=rec["image_key"],
                                      step=rec["step"], timestamp=rec["time"])
        elif op == "inputs":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            data = rec["dataset"]
            inputs = [DatasetInput(
                Dataset(name=data["name"], digest=data["digest"], source_type="local",
                        source=json.dumps({"uri": data["source"]}), profile=data.get("profile")),
                tags=[InputTag("mlflow.data.context", data.get("context", "train"))])]
            for attempt in range(3):
                try:
                    self.client.log_inputs(run_id, inputs)
                    break
                except Exception as err:
                    if attempt == 2 or not duplicate(err):
                        raise
        elif op == "register":
            return self._register(run_id, rec)
        elif op == "log_to_run":
            from mlflow.exceptions import MlflowException

            try:
                self.client.get_run(run_id)
            except MlflowException as err:  # a run restored from DVC's cache, logged elsewhere
                if outage(err):
                    raise
                return False
            self._metrics(run_id, [{"metrics": rec["metrics"], "step": None,
                                    "time": rec["time"]}])
            return True
        else:
            raise ValueError(f"unknown record {op!r}")
        return None

    def _register(self, run_id: str, rec: dict) -> bool:
        """Log the checkpoint `rec["path"]` as a PyTorch model in run `run_id` (with aelab's code,
        so it loads anywhere) and register it as a new version of `rec["name"]`; False if the
        run is not in this store."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException as err:
            if outage(err):
                raise
            return False
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        import aelab
        from aelab.checkpoint import load_checkpoint
        from aelab.models import build_classifier

        state, meta = load_checkpoint(rec["path"])
        model = build_classifier(meta)
        model.load_state_dict(state)
        model.eval()
        mlflow.set_tracking_uri(self.uri)
        requirements = [f"torch=={torch.__version__.split('+')[0]}", "numpy"]
        size = meta["image_size"]
        example = torch.zeros(2, meta.get("in_channels", 3), size, size)  # images in [-1, 1]
        with torch.no_grad():
            signature = infer_signature(example.numpy(), model(example).numpy())
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model, name="model", pip_requirements=requirements, signature=signature,
                serialization_format="pickle",  # eager module; its code travels with it
                code_paths=[str(Path(aelab.__file__).parent)])
        version = mlflow.register_model(info.model_uri, rec["name"], tags=rec["tags"])
        self.client.update_model_version(
            rec["name"], version.version,
            description=f"{rec['tags']['variant']} {rec['tags']['mode']} seed "
                        f"{rec['tags']['seed']}: the best validation accuracy of its variant "
                        f"({rec['tags']['val_acc']}); test accuracy {rec['tags']['test_acc']}")
        return True

    def _pipeline_run(self, rec: dict) -> str:
        """The parent run of one pipeline execution (a `dvc repro` or a DVC experiment): found
        by its key, made by the first stage of the execution, RUNNING again while a stage
        runs. A file lock keeps parallel stages of a local store from making two."""
        with _store_lock(self.uri):
            runs = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.{PIPELINE_TAG} = '{rec['key']}'",
                order_by=["attributes.start_time DESC"], max_results=1)
            if runs:
                run_id = runs[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            run = self.client.create_run(self.experiment_id, start_time=rec["time"],
                                         run_name=rec["name"],
                                         tags={**rec["tags"], PIPELINE_TAG: rec["key"]})
            return run.info.run_id

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

    def _metrics(self, run_id: str, rows: list[dict]) -> None:
        """Rows of {metrics, step, time} in one write (a transaction per 1000 values)."""
        from mlflow.entities import Metric

        items = [Metric(k, float(v), row["time"], row["step"] or 0)
                 for row in rows for k, v in row["metrics"].items()]
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
        if rec["op"] in ("create", "parent"):
            rec = {**rec, "run_id": PLACEHOLDER + uuid.uuid4().hex}
        elif rec["op"] == "artifacts":  # the stage may overwrite or delete them: copies
            target = files_dir(self.path) / str(self.lines)
            target.mkdir(parents=True)
            rec = {**rec, "paths": [shutil.copy2(p, target) for p in rec["paths"]]}
        self._write(rec)
        if rec["op"] in ("create", "parent"):
            return rec["run_id"]
        return True if rec["op"] in ("log_to_run", "register") else None  # checked at replay


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
        if rec["op"] in ("create", "parent"):  # made now: not made again by a later try
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
                 spool_dir: Path | None, group: dict | None = None) -> None:
        # Imported at once (the slow part, ~1.8 s on 2 cores) while the stage imports torch; the
        # store is opened by the first request, so a stage that fails before logging leaves none.
        import mlflow.tracking  # noqa: F401

        if uri.startswith("sqlite:"):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        self.store = Store(uri, experiment, artifact_root, spool_dir)
        self.spool: Spool | None = None
        self.runs: dict[str, str] = {}  # client key -> run id (a placeholder if made offline)
        self.group = group  # {"pipeline": {key, name, tags}, "stage": {name, tags}} or None
        self.parent_id: str | None = None  # the pipeline execution's run
        self.stage_id: str | None = None  # this stage's run, child of the pipeline's
        self.stage_status = "FINISHED"
        self.monitor = None

    def stage_run(self) -> str | None:
        """This stage's run (made with the first training run), under its pipeline's run."""
        if self.group is None:
            return None
        if self.stage_id is None:
            pipeline = self.group["pipeline"]
            self.parent_id = self.write({"op": "parent", **pipeline, "time": now_ms()})
            stage = self.group["stage"]
            self.stage_id = self.write({
                "op": "create", "name": stage["name"], "time": now_ms(),
                "tags": {**stage["tags"], PARENT_TAG: self.parent_id}})
            self.start_monitor(self.stage_id)
        return self.stage_id

    def start_monitor(self, run_id: str) -> None:
        """MLflow's system metrics (CPU, memory, GPU via psutil/pynvml) on the stage run."""
        if self.spool is not None or os.environ.get("AELAB_SYSTEM_METRICS", "1") == "0":
            return
        with contextlib.suppress(Exception):  # optional: never fails a stage
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=2,
                                                tracking_uri=self.store.uri)
            self.monitor.start()

    def end_group(self) -> None:
        """End this stage's run and (until the next stage) its pipeline's, with its status."""
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.finish()
                # MLflow's monitor drops the samples taken since it last logged: log them, so a
                # stage shorter than the sampling interval still shows its CPU and memory.
                tail = self.monitor.aggregate_metrics()
                if tail:
                    self.monitor.publish_metrics(tail)
                    self.monitor.mlflow_logger.flush()
        if self.stage_id is not None:
            for run_id in (self.stage_id, self.parent_id):
                self.write({"op": "end", "run_id": run_id, "status": self.stage_status,
                            "time": now_ms()})

    def handle(self, req: dict) -> dict | None:
        op, key = req["op"], req.get("key")
        if op == "start":
            tags = dict(req["tags"])
            parent = self.stage_run()
            if parent is not None:
                tags[PARENT_TAG] = parent
            run_id = self.write({"op": "create", "name": req["name"], "tags": tags,
                                 "time": now_ms(), "resumed": req.get("resumed", False)})
            self.runs[key] = run_id
            self.write({"op": "params", "run_id": run_id, "params": req["params"]})
            if req.get("dataset"):
                self.write({"op": "inputs", "run_id": run_id, "dataset": req["dataset"]})
            return {"key": key, "run_id": run_id}
        if op == "artifacts":
            self.write({"op": "artifacts", "run_id": self.runs[key], "paths": req["paths"],
                        "artifact_path": req.get("artifact_path")})
        elif op == "end":
            if req["status"] != "FINISHED":
                self.stage_status = req["status"]
            self.write({"op": "end", "run_id": self.runs[key], "status": req["status"],
                        "time": now_ms()})
        elif op == "image":
            self.write({"op": "image", "run_id": self.runs[key], "png": req["png"],
                        "image_key": req["image_key"], "step": req["step"], "time": now_ms()})
        elif op == "register":
            ok = self.write({"op": "register", "run_id": req["run_id"], "path": req["path"],
                             "name": req["name"], "tags": req["tags"]})
            return {"key": key, "ok": ok}
        elif op == "log_to_run":
            ok = self.write({"op": "log_to_run", "run_id": req["run_id"],
                             "metrics": req["metrics"], "time": now_ms()})
            return {"key": key, "ok": ok}
        elif op == "ping":
            return {"key": key, "ok": True}
        elif op == "prepare":  # imports for later `register` requests; writes nothing
            import mlflow.pytorch  # noqa: F401
            import torch

            from aelab.models import architecture

            for arch in req["archs"]:
                with torch.device("meta"):  # no memory, no compute: what its build imports
                    architecture(arch)()
        else:
            raise ValueError(f"unknown request {op!r}")
        return None

    def metrics(self, requests: list[dict]) -> None:
        """Metrics requests (of any runs; stamped by the stage), one write per run: the per-epoch rows that queued
        up while the agent was busy cost one store transaction instead of one each (a sqlite
        write is a few milliseconds of the agent's CPU, which a stage's training shares)."""
        rows: dict[str, list[dict]] = {}
        for req in requests:
            rows.setdefault(self.runs[req["key"]], []).append(
                {"metrics": req["metrics"], "step": req.get("step"), "time": req["time"]})
        for run_id, run_rows in rows.items():
            self.write({"op": "metrics", "run_id": run_id, "rows": run_rows})

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
        """End the stage's run; replay the spool once (the server may be back); if that fails,
        the stage's notice."""
        self.end_group()
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


def requests(lines: Iterable[str]) -> Iterator[list[dict]]:
    """The requests read from `lines`, in order, as lists: metrics requests that have all
    arrived by the time the first of them is taken come as one list (Agent.metrics), every
    other request alone. A thread reads the lines, so that they queue up here, not in the
    pipe, while the agent writes."""
    inbox: queue.Queue = queue.Queue()
    end = object()

    def read() -> None:
        try:
            for line in lines:
                inbox.put(line)
        except BaseException as err:  # raised again below, by the agent's thread
            inbox.put(err)
        inbox.put(end)

    def take(block: bool = True):
        item = inbox.get(block)
        if isinstance(item, BaseException):
            raise item
        return item if item is end else json.loads(item)

    threading.Thread(target=read, daemon=True, name="aelab-agent-stdin").start()
    pending = None  # taken while gathering metrics, not yet handed out
    while (req := pending if pending is not None else take()) is not end:
        batch, pending = [req], None
        while req["op"] == "metrics":
            try:
                req = take(block=False)
            except queue.Empty:
                break
            if req is end or req["op"] != "metrics":
                pending = req
                break
            batch.append(req)
        yield batch


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
        group = os.environ.get("AELAB_TRACKING_GROUP")
        agent = Agent(uri, experiment, Path(root) if root else None,
                      Path(spool_dir) if spool_dir else None, json.loads(group) if group else None)
        for batch in requests(sys.stdin):
            if batch[0]["op"] == "metrics":
                agent.metrics(batch)
                continue
            reply = agent.handle(batch[0])
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
    # Every record is written (and the spool closed) by now; the stage waits for this process to
    # end, and a normal exit would first free MLflow's and SQLAlchemy's modules (0.8 s).
    from aelab.quick_exit import quick_exit

    quick_exit(main())
