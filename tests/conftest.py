"""Shared test fixtures."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params_raw() -> dict:
    """The committed params.yaml as a plain dict (fresh copy per test)."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Every test logs to its own throwaway MLflow store, never the repo's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    yield
    from aelab import tracking

    tracking.abort()  # a tracking agent left by the test writes to that test's store only
