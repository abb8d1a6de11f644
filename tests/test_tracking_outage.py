"""Tracking outages against a real `mlflow server`: an unreachable server stops a stage at its
start (one line); a server stopped mid-run costs the stage nothing (its writes wait in a spool,
replayed at close if the server is back, else by `python -m aelab.tracking_agent --replay`)."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from aelab import tracking
from tests.conftest import ROOT

MLFLOW = Path(sys.executable).with_name("mlflow")

# A stage in miniature (the real stage wrapper, no training): two epochs reach the server, then
# it waits for the test to stop the server, logs two more epochs, an image, an artifact, a
# second run, and (with --close-after) waits for the server to be back before closing.
STAGE = '''
import io
import time
from pathlib import Path

import click
from PIL import Image

from aelab import tracking
from aelab.cli import stage_errors


def wait_for(flag: Path) -> None:
    deadline = time.monotonic() + 120
    while not flag.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {flag}")
        time.sleep(0.05)


@click.command()
@click.argument("flags", type=click.Path(path_type=Path))
@click.option("--close-after", type=click.Path(path_type=Path))
@stage_errors
def main(flags: Path, close_after: Path | None) -> None:
    tracking.start()
    note = flags / "note.txt"
    with tracking.stage_run(f"outage/{flags.name}", stage="pretrain", dataset="d",
                            params={"train": {"lr": 0.1}}) as run:
        for epoch in (1, 2):
            run.log_epoch({"epoch": epoch, "loss": 1.0 / epoch})
        tracking.flush()
        (flags / "logged").write_text(run.run_id)
        wait_for(flags.parent / "server-stopped")
        for epoch in (3, 4):
            run.log_epoch({"epoch": epoch, "loss": 1.0 / epoch})
        png = io.BytesIO()
        Image.new("RGB", (4, 2), (200, 10, 10)).save(png, format="PNG")
        run.log_image(png.getvalue(), "recon", 4)  # kept in the spool itself: no file
        note.write_text("history")
        run.log_artifact(note)
    with tracking.stage_run(f"outage/{flags.name}/later", stage="pretrain", dataset="d",
                            params={}) as later:
        later.log_epoch({"epoch": 1, "loss": 0.5})
    (flags / "later").write_text(later.run_id)
    tracking.flush()
    note.unlink()  # the spool keeps a copy
    (flags / "spooled").touch()
    if close_after:
        wait_for(close_after)


main()
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 (its own process group, so that stop() ends all of it)."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp, self.port = tmp, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def launch(self, log) -> subprocess.Popen:
        """The server process, writing to `log`."""
        return subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.tmp / 'server.db'}",
             "--artifacts-destination", str(self.tmp / "server-artifacts")],
            stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

    def start(self) -> None:
        """Launch it and wait until /health answers."""
        self.proc = self.launch(open(self.tmp / "server.log", "a"))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.tmp / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.read() == b"OK":
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"mlflow server did not come up on {self.uri}")

    def stop(self) -> None:
        """Stop it; return once its port refuses connections (uvicorn may outlive its parent)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.1)
        else:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path, _free_port())
    yield srv
    srv.stop()


def _wait_for(path: Path, *procs: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.05)


def test_an_unreachable_server_stops_the_stage_at_start(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    began = time.monotonic()
    with pytest.raises(tracking.TrackingError) as err:
        tracking.start()
    assert time.monotonic() - began < 15
    message = str(err.value)
    assert message == (f"MLflow server at {uri} is unreachable (Connection refused); start it "
                       "(mlflow server ...) or unset MLFLOW_TRACKING_URI to log to the local "
                       "mlflow.db")
    assert tracking._agent is None

    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "pretrain.py"), "--params",
         str(ROOT / "params.yaml"), "--variant", "mae", "--data", "prepared", "--out", "out",
         "--reports", "rep"], cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"Error: {message}"]
    assert list(work.iterdir()) == []


def _check_run(client, run_id: str, losses: list[float], artifacts: list[str]) -> None:
    """The run ended FINISHED with these losses at epochs 1, 2, ... and these artifacts."""
    assert client.get_run(run_id).info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == list(enumerate(losses, start=1))
    assert [a.path for a in client.list_artifacts(run_id)] == artifacts


def test_a_server_stopped_mid_run_costs_the_stage_nothing(tmp_path, monkeypatch, server):
    """Two stages lose the server after their second epoch and go on: `back` closes after the
    server is back (its spool is replayed at close), `away` while it is still down (it warns;
    the replay command writes its spool later)."""
    from mlflow.tracking import MlflowClient

    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    flags = {name: tmp_path / name for name in ("back", "away")}
    for path in flags.values():
        path.mkdir()
    procs = {name: subprocess.Popen(
        [sys.executable, str(script), str(path),
         *(["--close-after", str(tmp_path / "server-back")] if name == "back" else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, path in flags.items()}
    try:
        client = MlflowClient(server.uri)
        for name, path in flags.items():
            _wait_for(path / "logged", procs[name])
            run_id = (path / "logged").read_text()
            assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]

        server.stop()
        (tmp_path / "server-stopped").touch()
        _, away_err = procs["away"].communicate(timeout=120)
        assert procs["away"].returncode == 0, away_err
        _wait_for(flags["back"] / "spooled", procs["back"])
        spool_dir = tmp_path / ".aelab" / "tracking-spool"
        assert len(list(spool_dir.glob("spool-*.jsonl"))) == 2  # both went offline

        server.start()
        (tmp_path / "server-back").touch()
        _, back_err = procs["back"].communicate(timeout=120)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert procs["back"].returncode == 0, back_err
    assert "Warning" not in back_err and "Traceback" not in back_err

    (spool,) = spool_dir.glob("spool-*.jsonl")  # away's: back's was replayed at its close
    warnings = [ln for ln in away_err.splitlines() if ln.startswith("Warning:")]
    # 8 or 9 records: the agent writes the two metrics requests of epochs 3 and 4 as one
    # record when the second has arrived by the time it takes the first.
    count = re.fullmatch(r".*\): ([89]) tracking records kept in .*", warnings[0]).group(1)
    assert warnings == [
        f"Warning: MLflow server at {server.uri} unreachable (Connection refused): {count} "
        f"tracking records kept in {spool}; replay them with: python -m aelab.tracking_agent "
        f"--replay {spool}"], away_err
    assert "Traceback" not in away_err

    replay = subprocess.run([sys.executable, "-m", "aelab.tracking_agent", "--replay", str(spool)],
                            capture_output=True, text=True, timeout=120)
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.strip() == f"replayed {count} tracking records from {spool}"
    assert list(spool_dir.iterdir()) == [spool_dir / "replayed-ids.jsonl"]  # files gone too

    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    for path in flags.values():
        run_id = (path / "logged").read_text()
        _check_run(client, run_id, [1.0, 0.5, 1 / 3, 0.25], ["images", "note.txt"])
        pngs = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
        assert len(pngs) == 1 and "/recon+step+4+" in pngs[0], pngs
        image = Image.open(client.download_artifacts(run_id, pngs[0], str(tmp_path)))
        assert image.getcolors() == [(8, (200, 10, 10))]  # the image the stage logged, replayed
        later_id = (path / "later").read_text()
        assert later_id.startswith("offline-")
        (later,) = client.search_runs([experiment.experiment_id],
                                      f"attributes.run_name = 'outage/{path.name}/later'")
        _check_run(client, later.info.run_id, [0.5], [])
    # A placeholder kept by a stage (classify's metrics.json) still reaches its run.
    assert tracking.log_to_run(later_id, {"test_acc": 0.5})()
    assert client.get_run(later.info.run_id).data.metrics["test/acc"] == 0.5


def test_a_spool_of_the_earlier_format_replays_its_images(tmp_path, monkeypatch):
    """Spools written before images travelled as bytes hold an image record with the path of
    the spool's copy: replay still logs it (into a local store here)."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # a sqlite store's artifacts default to ./mlruns

    from aelab.tracking_agent import IDS_FILE, files_dir, replay

    spool = tmp_path / "spool-20261203-120000-1.jsonl"
    copy = files_dir(spool) / "2" / "aelab-recon-epoch1-x.png"
    copy.parent.mkdir(parents=True)
    Image.new("RGB", (3, 3), (0, 90, 250)).save(copy)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    records = [{"spool": 1, "uri": "http://127.0.0.1:1", "experiment": "e"},
               {"op": "create", "run_id": "offline-1", "tags": {}, "name": "r", "time": 1},
               {"op": "image", "run_id": "offline-1", "path": str(copy), "image_key": "recon",
                "step": 1, "time": 2, "delete": True}]
    spool.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert replay(spool, uri) == 2
    (run_id,) = json.loads((tmp_path / IDS_FILE).read_text()).values()
    client = MlflowClient(uri)
    (png,) = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    image = Image.open(client.download_artifacts(run_id, png, str(tmp_path)))
    assert image.getcolors() == [(9, (0, 90, 250))]
    assert not spool.exists() and not files_dir(spool).exists()
