"""Experiments as users run them: two DVC experiments queued and run by two workers at once
land in the one MLflow store of the real repository, each under its own parent run."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.conftest import copy_project, project_env

pytestmark = pytest.mark.e2e

EXPERIMENTS = {"lf-half": 0.5, "lf-full": 1}


def _run(repo: Path, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=repo, env=project_env(), capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def queued(tmp_path_factory) -> Iterator[Path]:
    """A project with one small variant where two queued experiments ran on two workers."""
    repo = copy_project(tmp_path_factory.mktemp("aelab-queue"))
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["dataset"], raw["seeds"] = "shapes", [0]
    raw["data"].update(shapes_train=300, shapes_test=100, val_fraction=0.2)
    raw["variants"] = {"conv_192": raw["variants"]["conv_192"]}
    raw["variants"]["conv_192"]["pretrain"].update(epochs=2, batch_size=64)
    raw["classify"].update(epochs=2, batch_size=64, modes=["scratch", "linear_probe"])
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (repo / "data" / "external").mkdir(parents=True, exist_ok=True)
    _run(repo, "git", "init", "-q")
    _run(repo, "dvc", "commit", "-q", "-f", "data.dvc")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "queue test")
    for name, fraction in EXPERIMENTS.items():
        _run(repo, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"label_fraction={fraction}")
    # The workers outlive `dvc queue start` and hold its stdout: don't capture it.
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=project_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120)
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            status = _run(repo, "dvc", "queue", "status")
            if not any(state in status for state in ("Queued", "Running")):
                break
            time.sleep(2)
        assert status.count("Success") == 2, status + _run(repo, "dvc", "queue", "logs",
                                                           "lf-half")
        yield repo
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=project_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def test_queued_experiments_land_in_one_store_each_under_its_parent(queued):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{queued / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aelab")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.data.tags["aelab_pipeline_run"]: r for r in runs
               if "aelab_pipeline_run" in r.data.tags}
    assert set(parents) == set(EXPERIMENTS)
    parent_of = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}
    for name, fraction in EXPERIMENTS.items():
        pipeline = parents[name]
        assert pipeline.info.run_name == name and pipeline.info.status == "FINISHED"
        stages = {r.info.run_name: r for r in runs
                  if parent_of[r.info.run_id] == pipeline.info.run_id}
        assert set(stages) == {"pretrain@conv_192", "classify@conv_192-scratch",
                               "classify@conv_192-pretrained", "report"}
        leaves = [r for r in runs if parent_of[r.info.run_id] in
                  {s.info.run_id for s in stages.values()}]
        assert sorted(r.info.run_name for r in leaves) == [
            "classify/conv_192/linear_probe", "classify/conv_192/scratch", "pretrain/conv_192",
            "report"]
        for run in leaves:
            assert run.info.status == "FINISHED" and run.data.tags["DVC_EXP_NAME"] == name
            if run.info.run_name.startswith("classify/"):
                assert float(run.data.params["label_fraction"]) == fraction
                assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2
                assert "test/acc" in run.data.metrics
        # Artifacts outlive the experiments' temp workspaces: they are in the real repo.
        report = next(r for r in leaves if r.info.run_name == "report")
        local = client.download_artifacts(report.info.run_id, "results.md",
                                          str(queued / "download"))
        assert "conv_192" in Path(local).read_text()
        assert report.info.artifact_uri.startswith((queued / "mlartifacts").as_uri())
    assert len(runs) == 2 * (1 + 4 + 4)  # nothing else: no duplicate parents, none lost
