"""Stage scripts: bad input is one clear line, exit 1, and no output written."""

import subprocess
import sys

import yaml

from tests.conftest import ROOT


def _stage(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "stages" / args[0]), *args[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_bad_mask_ratio_stops_before_any_output(tmp_path, params_raw):
    params_raw["mask_ratio"] = 1.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_raw))
    proc = _stage("pretrain.py", "--variant", "mae", "--data", "prepared", "--out", "out",
                  "--reports", "rep", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["Error: params.yaml: 'mask_ratio' = 1.5 is outside (0, 1)"], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_unknown_variant_and_missing_data(tmp_path):
    proc = _stage("pretrain.py", "--params", str(ROOT / "params.yaml"), "--variant", "vae",
                  "--data", "prepared", "--out", "out", "--reports", "rep", cwd=tmp_path)
    assert proc.returncode == 1 and "unknown variant 'vae'" in proc.stderr
    proc = _stage("classify.py", "--params", str(ROOT / "params.yaml"), "--variant", "mae",
                  "--init", "pretrained", "--data", "prepared", "--manifest", "init.json",
                  "--out", "c", "--reports", "rep", cwd=tmp_path)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "prepared" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_stage_reports_its_time(tmp_path, params_raw):
    """Every stage ends with one `timing:` line on stderr (the README's per-stage breakdown)."""
    params_raw.update(dataset="shapes")
    params_raw["data"].update(shapes_train=40, shapes_test=20)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_raw))
    proc = _stage("prepare.py", "--out", "prepared", "--external", "ext", "--downloads", "dl",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    timing = [ln for ln in proc.stderr.splitlines() if "timing:" in ln]
    assert len(timing) == 1 and timing[0].endswith("s (no training)"), proc.stderr
    assert (tmp_path / "prepared" / "train.pt").is_file()
