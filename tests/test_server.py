"""`make server` as a team uses it: the real target on a free loopback port, real stages logging
to it over HTTP, their runs read back through MLflow's REST API with plain HTTP, and the runs of
that pipeline execution listed by the MLflow UI in headless Chromium."""

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.conftest import ROOT, project_env
from tests.test_tracking_outage import Server, _free_port

VARIANT = "conv_192"
EPOCHS = 3
RUN_NAMES = (f"pretrain/{VARIANT}", f"classify/{VARIANT}/scratch")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync")


class MakeServer(Server):
    """`make server` itself, run in the repository, with its store in `tmp` (SERVER_DIR)."""

    def launch(self, log) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        # `-o setup`: `make test` has just set up .venv; the test must never reinstall it.
        return subprocess.Popen(
            ["make", "--no-print-directory", "-o", "setup", "server", f"SERVER_DIR={self.tmp}",
             f"SERVER_PORT={self.port}", "SERVER_OPTS=--workers 1"],
            cwd=ROOT, stdout=log, stderr=log, start_new_session=True, env=env)


def _api(uri: str, path: str, body: dict | None = None) -> dict:
    """One call of MLflow's REST API: GET, or POST with a JSON `body`."""
    request = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/{path}", headers={"Content-Type": "application/json"},
        data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def _experiment_id(uri: str) -> str:
    answer = _api(uri, "experiments/get-by-name?experiment_name=aelab")
    return answer["experiment"]["experiment_id"]


def _runs(uri: str, experiment_id: str, filter_string: str) -> list[dict]:
    answer = _api(uri, "runs/search", {"experiment_ids": [experiment_id],
                                       "filter": filter_string})
    return answer.get("runs", [])


def _tags(run: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    srv = MakeServer(tmp_path_factory.mktemp("server"), _free_port())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pipeline(server, tmp_path_factory) -> Path:
    """One small pipeline execution logging to `server`: prepare, pretrain@conv_192 (3 epochs)
    and classify@conv_192-scratch, the real stage scripts with MLFLOW_TRACKING_URI set."""
    work = tmp_path_factory.mktemp("pipeline")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["dataset"], raw["seeds"] = "shapes", [0]
    raw["data"].update(shapes_train=400, shapes_test=100)
    raw["variants"] = {VARIANT: raw["variants"][VARIANT]}
    raw["variants"][VARIANT]["pretrain"].update(epochs=EPOCHS, batch_size=64)
    raw["classify"].update(epochs=2, batch_size=64)
    raw["runtime"]["checkpoint_every"] = 0
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**project_env(), "MLFLOW_TRACKING_URI": server.uri, "DVC_ROOT": str(work)}
    for script, *args in (
            ("prepare.py", "--out", "prepared", "--external", "ext", "--downloads", "dl"),
            ("pretrain.py", "--variant", VARIANT, "--data", "prepared", "--out", "pre",
             "--reports", "rep/pre"),
            ("classify.py", "--variant", VARIANT, "--init", "scratch", "--data", "prepared",
             "--manifest", "pre/init/scratch.json", "--out", "cls", "--reports", "rep/cls")):
        proc = subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], cwd=work,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"
    return work


def test_a_stage_logs_to_make_server_over_http(server, pipeline):
    """pretrain's run is on the server (read with plain HTTP): FINISHED, one val/loss per epoch,
    its artifacts in the server's artifact store, and one pipeline tag for both stages."""
    experiment_id = _experiment_id(server.uri)
    (run,) = _runs(server.uri, experiment_id, f"attributes.run_name = '{RUN_NAMES[0]}'")
    info = run["info"]
    assert info["status"] == "FINISHED"
    assert info["artifact_uri"].startswith("mlflow-artifacts:/")  # served by the server
    query = urllib.parse.urlencode({"run_id": info["run_id"], "metric_key": "val/loss"})
    history = _api(server.uri, f"metrics/get-history?{query}")["metrics"]
    assert sorted(m["step"] for m in history) == list(range(1, EPOCHS + 1))
    assert all(m["value"] > 0 for m in history)

    listing = _api(server.uri, f"artifacts/list?run_id={info['run_id']}")
    assert {"history.csv", "metrics.json"} <= {f["path"] for f in listing["files"]}
    on_disk = {p.name for p in (server.tmp / "artifacts").rglob("*") if p.is_file()}
    assert {"history.csv", "metrics.json"} <= on_disk  # under SERVER_DIR, as the target says

    (classify,) = _runs(server.uri, experiment_id, f"attributes.run_name = '{RUN_NAMES[1]}'")
    assert classify["info"]["status"] == "FINISHED"
    assert _tags(classify)["pipeline"] == _tags(run)["pipeline"]


def _chromium() -> str:
    """The headless browser, or skip (with the reason) where there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on PATH (chromium, chromium-browser, google-chrome): the MLflow UI "
                "test needs one; install it (Debian: apt-get install chromium; .ci/run does)")


def _page_text(dom: str) -> str:
    """The visible text of a rendered DOM, one space between text nodes."""
    dom = re.sub(r"<(script|style|svg)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).split())


def test_the_ui_lists_the_runs_of_a_pipeline_execution(server, pipeline, tmp_path):
    """The experiment's runs page, filtered by the pipeline tag and sorted by name as a user
    would (a sort other than by date lists nested runs flat), rendered by headless Chromium:
    every run of the execution is listed, both stages' runs among them, and a run of another
    execution is not."""
    browser = _chromium()
    experiment_id = _experiment_id(server.uri)
    (run,) = _runs(server.uri, experiment_id, f"attributes.run_name = '{RUN_NAMES[0]}'")
    search = f"tags.pipeline = '{_tags(run)['pipeline']}'"
    names = {r["info"]["run_name"] for r in _runs(server.uri, experiment_id, search)}
    assert set(RUN_NAMES) <= names
    _api(server.uri, "runs/create", {"experiment_id": experiment_id, "run_name": "other-execution",
                                     "tags": [{"key": "pipeline", "value": "0123456789ab"}]})

    query = urllib.parse.urlencode({"searchFilter": search, "orderByKey": "tags.`mlflow.runName`",
                                    "orderByAsc": "true"})  # the UI's "Sort: Run Name"
    url = f"{server.uri}/#/experiments/{experiment_id}/runs?{query}"
    proc = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}",
         "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = _page_text(proc.stdout)
    assert "Training runs" in text, text[:2000]  # the runs table, not the GenAI overview
    for name in sorted(names):
        assert name in text, f"{name} not listed at {url}:\n{text[:2000]}"
    assert "other-execution" not in text
    assert re.search(rf"\b{len(names)} matching runs\b", text), text[:2000]
