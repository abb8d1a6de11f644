"""Shared test fixtures."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def copy_project(dest: Path) -> Path:
    """The project's files as git sees them (tracked and new, not ignored) copied to `dest`."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def project_env() -> dict:
    """The environment for DVC / stage commands in a project copy: this venv's tools first,
    git identity, CPU, and no MLflow store or DVC root of the test runner."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "AELAB_MLFLOW_EXPERIMENT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", AELAB_DEVICE="cpu")
    return env


@pytest.fixture
def params_raw() -> dict:
    """The committed params.yaml as a plain dict (fresh copy per test)."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Every test logs to its own throwaway MLflow store, never the repo's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    from aelab import tracking

    monkeypatch.setattr(tracking, "_stage_name", None)  # no stage run unless a test starts one
    yield
    from aelab import tracking

    tracking.abort()  # a tracking agent left by the test writes to that test's store only
