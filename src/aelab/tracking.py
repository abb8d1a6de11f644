"""MLflow tracking for the stages, without MLflow in the training process.

Store: `MLFLOW_TRACKING_URI` when set (e.g. a team's `mlflow server`), else an embedded sqlite
database `<repo>/mlflow.db` with artifacts in `<repo>/mlartifacts`, where `<repo>` is
`DVC_ROOT` (set by DVC, and pointing at the real repository even for `dvc exp run --temp` and
queued experiments, whose temp copies are deleted afterwards) or the git top level.

Importing MLflow and opening its store costs about 2 s on a 2-core machine, as much as importing
torch. So a stage's first tracking call starts one agent process (aelab.tracking_agent, which
owns every MLflow call) and streams requests to it over a pipe: the agent starts up on the other
core while this process imports torch and trains, and logging never waits on the store. The run
id is the one answer a stage waits for. `close()` (called by the stage wrapper, and at exit)
waits for the agent to finish; an agent that failed (a full disk, a store that refuses a write) is
reported as a `TrackingError` at the next epoch or at close, never silently dropped.

A tracking server (`MLFLOW_TRACKING_URI=http...`) must answer when the agent starts (at stage
start): if not, a one-line `TrackingError` at once, not hours into training. One that stops
answering mid-run does not stop the stage: the agent buffers everything in a spool file under
`<repo>/.aelab/tracking-spool/`, tries it once more at close, and if the server is still away
the stage succeeds with one warning on stderr naming the spool and the command that replays it
(`python -m aelab.tracking_agent --replay <spool>`).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from aelab.timeline import phase
from aelab.tracking_agent import is_remote, now_ms

DEFAULT_EXPERIMENT = "aelab"
SERVER_TIMEOUT_S = 5.0


class TrackingError(RuntimeError):
    """The MLflow store could not be written; one line."""


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


def artifact_root(uri: str) -> Path | None:
    """Artifacts of a local store go to <repo>/mlartifacts (absolute: temp experiment copies
    are deleted); a server decides for itself."""
    return repo_root() / "mlartifacts" if uri.startswith("sqlite:///") else None


def spool_dir() -> Path:
    """Where tracking records wait while a tracking server is unreachable."""
    return repo_root() / ".aelab" / "tracking-spool"


def _why(reason: object) -> str:
    """A connection failure in a few words."""
    if isinstance(reason, TimeoutError):
        return f"no answer in {SERVER_TIMEOUT_S:g} s"
    text = getattr(reason, "strerror", None) or " ".join(str(reason).split())[:200]
    return text or type(reason).__name__


def check_server(uri: str) -> None:
    """Raise a one-line TrackingError unless the tracking server at `uri` answers (GET /health;
    any answer but a gateway's 502-504 will do: MLflow itself reports auth or TLS problems)."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S):
            return
    except urllib.error.HTTPError as err:
        err.close()
        if err.code not in (502, 503, 504):
            return
        reason = f"HTTP {err.code} {err.reason}"
    except urllib.error.URLError as err:
        if isinstance(err.reason, ssl.SSLError):
            return
        reason = _why(err.reason)
    except (OSError, http.client.HTTPException) as err:  # e.g. a timeout while reading
        reason = _why(err)
    raise TrackingError(f"MLflow server at {uri} is unreachable ({reason}); start it (mlflow "
                        "server ...) or unset MLFLOW_TRACKING_URI to log to the local mlflow.db")


def ensure_experiment(name: str | None = None) -> str:
    """Create (once, under a lock) the store and the experiment; return its id."""
    from aelab.tracking_agent import ensure_experiment as ensure

    uri = tracking_uri()
    return ensure(uri, name or experiment_name(), artifact_root(uri))


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


_METRIC_NAMES = {"train_loss": "train/loss", "train_acc": "train/acc", "val_loss": "val/loss",
                 "val_acc": "val/acc", "img_s": "throughput/img_s",
                 "epoch_seconds": "time/epoch_s", "test_acc": "test/acc",
                 "test_loss": "test/loss"}


def metric_name(key: str) -> str:
    """The MLflow name of a history column: `train/loss`, `val/acc`, `test/acc`, `lr`,
    `throughput/img_s`, ... (the same names in every stage)."""
    return _METRIC_NAMES.get(key, key)


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


def _store_env() -> tuple[str | None, str | None]:
    """What decides the store (tracking_uri), read cheaply: no git call per logged epoch."""
    return os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("DVC_ROOT")


# --- the agent ------------------------------------------------------------------------------

class _Agent:
    """The tracking agent process of this process (see the module docstring)."""

    def __init__(self) -> None:
        self.store = _store_env()
        uri = tracking_uri()
        if is_remote(uri):
            check_server(uri)
        root = artifact_root(uri)
        env = {**os.environ, "AELAB_TRACKING_URI": uri,
               "AELAB_TRACKING_EXPERIMENT": experiment_name(),
               "AELAB_TRACKING_ARTIFACTS": str(root) if root else "",
               "AELAB_TRACKING_SPOOL": str(spool_dir()) if is_remote(uri) else "",
               "AELAB_TRACKING_GROUP": json.dumps(run_group()) if _stage_name else ""}
        self.log = tempfile.TemporaryFile(mode="w+")  # the agent's stderr: MLflow's chatter
        self.proc = subprocess.Popen([sys.executable, "-m", "aelab.tracking_agent"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self.keys = itertools.count()
        self.replies: dict[str, dict] = {}
        self.sent = 0

    def error(self) -> TrackingError:
        self.log.seek(0)
        lines = [ln for ln in self.log.read().splitlines() if ln.strip()]
        failed = [ln for ln in lines if ln.startswith("MLflow tracking failed")]
        return TrackingError((failed or lines or ["MLflow tracking agent stopped"])[-1])

    def check(self) -> None:
        """Raise if the agent has stopped (it only stops early on a failure)."""
        if self.proc.poll() is not None:
            raise self.error()

    def send(self, request: dict, *, writes: bool = True) -> None:
        """`writes`: False for a request that records nothing, which abort() may cut short."""
        self.sent += writes
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            self.proc.wait()
            raise self.error() from None

    def ask(self, request: dict) -> dict:
        """Send a request and wait for its answer (earlier requests are done by then)."""
        return self.request(request)()

    def request(self, request: dict) -> Callable[[], dict]:
        """Send a request and return at once, with a function that waits for its answer: the
        caller goes on while the agent works on the other core."""
        key = f"q{next(self.keys)}"
        self.send({**request, "key": key})
        return lambda: self.reply(key)

    def reply(self, key: str) -> dict:
        with phase("MLflow wait"):  # the timing line's MLflow wait
            return self._reply(key)

    def _reply(self, key: str) -> dict:
        while key not in self.replies:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise self.error()
            answer = json.loads(line)
            self.replies[answer["key"]] = answer
        return self.replies.pop(key)

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):  # an agent that failed: its error below
            self.proc.stdin.close()
        with phase("MLflow wait"):  # the timing line's MLflow wait
            for line in self.proc.stdout:  # answers nobody waited for
                answer = json.loads(line)
                self.replies[answer["key"]] = answer
            status = self.proc.wait()
        if status != 0:
            raise self.error()
        spooled = self.replies.pop("spool", None)  # the server went away mid-run
        if spooled is not None:
            print(f"Warning: {spooled['warning']}", file=sys.stderr, flush=True)


_agent: _Agent | None = None


def agent() -> _Agent:
    """This process's agent, started on first use (and again if the store was changed, e.g.
    MLFLOW_TRACKING_URI set after the first run: the old agent finishes its writes first)."""
    global _agent
    if _agent is not None and _agent.store != _store_env():
        close()
    if _agent is None:
        _agent = _Agent()
    return _agent


class _Relay:
    """The agent of a seed worker (aelab.parallel): requests go to the stage process, which
    passes them on to its agent in order; answers (run ids) are read there, not here."""

    def __init__(self, send) -> None:
        self.store = _store_env()
        self._send = send
        self.sent = 1  # abort() lets it pass on what was sent: there is no process to kill

    def send(self, request: dict, *, writes: bool = True) -> None:
        self._send(request)

    def check(self) -> None:  # the stage process reports a failed agent
        pass

    def ask(self, request: dict) -> dict:
        raise TrackingError(f"a seed worker cannot wait for the MLflow agent ({request['op']})")

    reply = request = ask

    def close(self) -> None:
        pass


def relay(send, key_prefix: str) -> None:
    """In a forked seed worker: send every tracking request through `send` (to the stage
    process) instead of to an agent of its own, with run keys that start with `key_prefix`
    (unique among the workers)."""
    global _agent, _key_prefix
    _agent, _key_prefix = _Relay(send), key_prefix


def forward(request: dict) -> None:
    """In the stage process: pass on a request that a seed worker relayed."""
    agent().send(request)


_stage_name: str | None = None


def start(stage: str | None = None) -> None:
    """Start the agent now: a stage calls this before importing torch, so that MLflow loads
    on the other core meanwhile (and an unreachable tracking server stops the stage at once).
    `stage` (the DVC stage, e.g. `pretrain@mae`) names the run that groups this stage's runs
    under its pipeline execution's run (see run_group). Under torchrun only rank 0 logs, so the
    others start none."""
    global _stage_name
    _stage_name = stage or _stage_name
    if os.environ.get("RANK", "0") == "0":
        agent()


def run_group() -> dict:
    """How this stage's runs nest in the UI: a parent run per pipeline execution (the DVC
    experiment, DVC_EXP_NAME, or a `dvc repro` of this commit and params.yaml), a child run per
    stage, and the stage's training runs (one per seed / mode) under that."""
    exp = os.environ.get("DVC_EXP_NAME")
    pipeline = pipeline_id()
    tags = _common_tags()
    if exp:
        tags["DVC_EXP_NAME"] = exp
    return {"pipeline": {"key": exp or f"repro-{pipeline}",
                         "name": exp or f"dvc repro {pipeline}", "tags": tags},
            "stage": {"name": _stage_name, "tags": {**tags, "dvc_stage": _stage_name}}}


def flush() -> None:
    """Wait until every request sent so far is in the store (or, the server being away, in the
    spool)."""
    if _agent is not None:
        _agent.ask({"op": "ping"})


def close() -> None:
    """Wait for the agent to write everything and stop; raise TrackingError if it failed."""
    global _agent
    if _agent is not None:
        current, _agent = _agent, None
        current.close()


def abort() -> None:
    """After a failure: stop an agent that was never asked anything at once (a bad params.yaml
    should not wait for MLflow to load); otherwise let it record what was sent (FAILED runs)."""
    global _agent
    if _agent is not None and _agent.sent == 0:
        _agent.proc.kill()
        _agent.proc.wait()
        _agent = None
    with contextlib.suppress(TrackingError):
        close()


@atexit.register
def _close_at_exit() -> None:
    with contextlib.suppress(TrackingError):
        close()


# --- runs -----------------------------------------------------------------------------------

class StageRun:
    """The MLflow run of one stage execution (one variant, mode and seed)."""

    def __init__(self, key: str, start_key: str, owner: _Agent):
        self.key = key
        self._start_key = start_key
        self._owner = owner  # the agent that made the run (its answer may come after close)
        self._run_id: str | None = None

    @property
    def run_id(self) -> str:
        """The MLflow run id (waits for the agent to have created the run)."""
        if self._run_id is None:
            self._run_id = self._owner.reply(self._start_key)["run_id"]
        return self._run_id

    def log_epoch(self, row: Mapping[str, float]) -> None:
        """Log one history row as metrics at step = row['epoch'] (names: metric_name)."""
        agent().check()
        metrics = {metric_name(k): float(v) for k, v in row.items() if k != "epoch"}
        agent().send({"op": "metrics", "key": self.key, "metrics": metrics,
                      "step": int(row["epoch"]), "time": now_ms()})

    def epoch_hook(self, state, row: Mapping[str, float]) -> None:
        """The engine's epoch hook (aelab.training.fit): log the row."""
        self.log_epoch(row)

    def log_image(self, png: bytes, key: str, step: int) -> None:
        """A PNG (its bytes, sent along: no temporary file for a killed stage to leave behind)
        as the run's image `key` at `step` (the UI shows them evolve, per step)."""
        agent().send({"op": "image", "key": self.key, "png": base64.b64encode(png).decode(),
                      "image_key": key, "step": int(step)})

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Log final (step-less) metrics."""
        agent().send({"op": "metrics", "key": self.key, "time": now_ms(),
                      "metrics": {k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file into the run's artifacts (also after the run has ended)."""
        self.log_artifacts((path,), artifact_path)

    def log_artifacts(self, paths, artifact_path: str | None = None) -> None:
        agent().send({"op": "artifacts", "key": self.key, "artifact_path": artifact_path,
                      "paths": [str(Path(p).resolve()) for p in paths]})


class _SilentRun:
    """The run of a non-zero torchrun rank: rank 0 logs for the group."""

    key = run_id = None

    def epoch_hook(self, state, row) -> None:
        pass

    def log_epoch(self, row) -> None:
        pass

    def log_image(self, png, key, step) -> None:
        pass

    def log_metrics(self, metrics) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def log_artifacts(self, paths, artifact_path=None) -> None:
        pass


_tags_cache: dict[str, str] = {}


def _common_tags() -> dict[str, str]:
    if not _tags_cache:
        _tags_cache.update({"git_commit": git_commit(), "pipeline": pipeline_id()})
    return dict(_tags_cache)


_runs = itertools.count()
_key_prefix = ""  # a seed worker's (relay): keys stay unique across the workers


def run_for(key: str) -> StageRun:
    """The run that `stage_run` opened under `key` (StageRun.key), here or in a seed worker;
    its `run_id` is read from this process's agent."""
    return StageRun(key, key, agent())


@contextlib.contextmanager
def stage_run(run_name: str, *, stage: str, dataset: str, params: Mapping[str, Any],
              variant: str | None = None, mode: str | None = None, seed: int | None = None,
              resume: tuple[str, bool] | None = None,
              data: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """Open one MLflow run named `run_name`, tagged and with `params` logged (flattened);
    it ends FINISHED, or FAILED if the block raises. `data` ({name, digest, source, profile})
    is logged as the run's dataset input. `resume` = (key, resumed): the run is
    tagged `resume_key`, and a training run resumed from a checkpoint (aelab.resume) logs on
    into the latest run with its key, if the store has one. Under torchrun only rank 0 logs
    (the other ranks get a run that logs nothing)."""
    from aelab import distributed

    if not distributed.is_main():
        yield _SilentRun()
        return
    tags = {"stage": stage, "dataset": dataset, **_common_tags()}
    if resume:
        tags["resume_key"] = resume[0]
    for name, value in (("variant", variant), ("mode", mode), ("seed", seed)):
        if value is not None:
            tags[name] = str(value)
    if os.environ.get("DVC_EXP_NAME"):
        tags["DVC_EXP_NAME"] = os.environ["DVC_EXP_NAME"]
    key = f"{_key_prefix}run{next(_runs)}"
    ag = agent()
    ag.send({"op": "start", "key": key, "name": run_name, "tags": tags,
             "params": {k: v for k, v in flatten(params).items()},
             "resumed": bool(resume and resume[1]), "dataset": dict(data) if data else None})
    run = StageRun(key, key, ag)
    try:
        yield run
    except BaseException:
        with contextlib.suppress(TrackingError):
            ag.send({"op": "end", "key": key, "status": "FAILED"})
        raise
    ag.send({"op": "end", "key": key, "status": "FINISHED"})


def prepare_registration(archs: Iterable[str]) -> None:
    """Have the agent import what registering a classifier of these architectures needs (torch,
    mlflow.pytorch and each architecture's module: seconds) now, while this stage works, instead
    of when the first register_model arrives."""
    agent().send({"op": "prepare", "archs": sorted(set(archs))}, writes=False)


def register_model(checkpoint: str | Path, name: str, run_id: str,
                   tags: Mapping[str, str]) -> Callable[[], bool]:
    """Log a classifier checkpoint as an MLflow PyTorch model in its training run `run_id` and
    register it as a new version of `name` (tags: `tags`, the git commit, DVC_EXP_NAME). The
    agent does the work (torch, mlflow.pytorch) while this process goes on: returns a function
    that waits for it and says whether it registered (False: that run is not in this store)."""
    tags = {**tags, "git_commit": git_commit()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["DVC_EXP_NAME"] = os.environ["DVC_EXP_NAME"]
    answer = agent().request({"op": "register", "path": str(Path(checkpoint).resolve()),
                              "name": name, "run_id": run_id, "tags": tags})
    return lambda: answer()["ok"]


def log_to_run(run_id: str, metrics: Mapping[str, float]) -> Callable[[], bool]:
    """Add final metrics to an earlier (finished) run, e.g. test accuracy after evaluation.

    Returns at once, with a function that waits for the write and says whether it was made:
    False (nothing logged) when the run is not in this store, e.g. a classifier restored from
    DVC's cache that was trained against another MLflow store. Answers nobody waits for are
    collected by close(), which raises if the agent failed.
    """
    answer = agent().request({"op": "log_to_run", "run_id": run_id,
                              "metrics": {metric_name(k): float(v) for k, v in metrics.items()}})
    return lambda: answer()["ok"]
