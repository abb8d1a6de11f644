"""`benchmarks/bench.py --quick` (what `make bench` runs, on tiny sizes) goes end to end and
writes the documented JSON. Speed is never asserted here: the figures are measured by
`make bench`, not by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"name", "value", "unit", "target", "higher_is_better", "met"}

DEMO_LOG = (
    "Running stage 'prepare':\n> python stages/prepare.py --out data/prepared/shapes\n"
    "prepare.py timing: 2.00 s (no training)\n"
    "Running stage 'pretrain@conv_192':\n> python stages/pretrain.py --variant conv_192\n"
    "pretrain epoch 1/2:  50%|#####     | 1/2\rpretrain epoch 1/2: 100%|##########| 2/2\n"
    "pretrain.py timing: start-up 1.50 s, training 10.00 s, wind-down 0.50 s; of which data "
    "load 0.20 s, validation 1.00 s, MLflow wait 0.40 s\n"
    "Stage 'classify@conv_192-scratch' didn't change, skipping\n"
    "Running stage 'evaluate':\n> python stages/evaluate.py\n"
    "evaluate.py timing: 20.00 s (no training; of which MLflow wait 3.00 s)\n"
)


def test_bench_quick_writes_every_item_in_the_schema(tmp_path):
    log = tmp_path / "demo-log.txt"
    log.write_text(DEMO_LOG)
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick",
                           "--out", str(out), "--demo-log", str(log)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["device"]["description"] and report["device"]["torch"]
    names = [e["name"] for e in report["entries"]]
    assert len(names) == len(set(names))
    for e in report["entries"]:
        assert KEYS <= set(e), e
        assert isinstance(e["name"], str) and isinstance(e["unit"], str)
        assert e["value"] is None or isinstance(e["value"], (int, float))
        assert e["target"] is None or isinstance(e["target"], (int, float))
        assert isinstance(e["higher_is_better"], bool)
        assert e["met"] is None or isinstance(e["met"], bool)
        if e["value"] is None or e["target"] is None:
            assert e["met"] is None, e
    with_target = {e["name"] for e in report["entries"] if e["target"] is not None}
    for prefix in ("mae step: ours / baseline", "probe stage", "data path", "pipeline: no-op"):
        assert any(n.startswith(prefix) for n in with_target), prefix
    # Beside each probe ratio, what it could reach were the probes' steps only their matmuls
    # (measured on the CPU this runs on).
    ratios = [e for e in report["entries"] if e["name"].startswith("probe stage: ")]
    ceilings = [e for e in report["entries"] if e["name"].startswith("probe stage ceiling")]
    assert ratios and len(ceilings) == len(ratios)
    assert all(e["value"] > 0 and e["target"] is None for e in ceilings)

    # The demo's per-stage breakdown comes from the stages' own timing lines.
    stages = report["demo_stages"]
    assert [r["stage"] for r in stages] == ["prepare", "pretrain@conv_192", "evaluate"]
    assert stages[0]["total"] == 2.0 and stages[0]["training"] is None
    assert stages[0]["data_load"] is stages[0]["mlflow_wait"] is None  # not in its line
    assert (stages[1]["start_up"], stages[1]["training"], stages[1]["wind_down"]) == (
        1.5, 10.0, 0.5)
    assert (stages[1]["data_load"], stages[1]["validation"], stages[1]["mlflow_wait"]) == (
        0.2, 1.0, 0.4)
    assert stages[2]["total"] == 20.0 and stages[2]["mlflow_wait"] == 3.0

    # The demo's steps: one per variant and kind of step (autoencoder, classifier with either
    # head), and the demo's counted work per stage, joined with the training time the log
    # gives (only pretrain@conv_192 here).
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench
    variants = bench.demo_config(str(ROOT / "params.yaml")).variants
    for variant in variants:
        for step in ("pretrain", "classify, mlp head", "classify, linear head"):
            assert f"demo step: {variant} {step}, fraction of peak" in names
    compute = report["demo_compute"]
    assert set(compute) == {f"pretrain@{v}" for v in variants} | {
        f"classify@{v}-{init}" for v in variants for init in ("scratch", "pretrained")}
    assert all(row["tflops_per_seed"] > 0 for row in compute.values())
    # The pretrained stage trains both fine-tunes: the scratch stage's MLP-head run (the same
    # step from another init) plus a linear-head one, whose head costs less than the MLP's.
    for v in variants:
        scratch, tuned = compute[f"classify@{v}-scratch"], compute[f"classify@{v}-pretrained"]
        assert scratch["runs"] == ["scratch"]
        assert tuned["runs"] == ["mlp_finetune", "linear_finetune"]
        assert scratch["tflops_per_seed"] < tuned["tflops_per_seed"] < (
            2 * scratch["tflops_per_seed"])
    assert compute["pretrain@conv_192"]["training_s_in_demo_log"] == 10.0
    assert compute["pretrain@mae"]["training_s_in_demo_log"] is None
    total = next(e for e in report["entries"] if e["name"] == "demo: training FLOPs per seed")
    assert total["value"] == pytest.approx(sum(r["tflops_per_seed"] for r in compute.values()),
                                           rel=1e-3)
    assert "| name | value | unit | target | met |" in proc.stdout


def test_matmul_timer_times_the_forward_and_backward_matmuls_only():
    """The probe ceiling's clock: every matrix multiply, backward included, and nothing else."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench

    layer, x = torch.nn.Linear(8, 4), torch.randn(5, 8, requires_grad=True)
    with bench.MatmulTimer() as timer:
        (layer(x).relu() * 2).sum().backward()  # addmm; then mm for x's and the weight's grads
        torch.bmm(torch.randn(2, 3, 3), torch.randn(2, 3, 3))
        torch.randn(64, 64).exp().sum()  # not a matmul
    assert timer.calls == 4 and timer.seconds > 0
    assert x.grad.shape == x.shape  # the mode hands every op its result


def test_bench_measures_the_committed_settings_after_a_demo(tmp_path, monkeypatch):
    """`make demo` leaves its experiment's small settings in the workspace's params.yaml; the
    bench's claims are about the committed ones, so it measures HEAD's (and says so)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    params = tmp_path / "params.yaml"
    params.write_text("seeds: [0, 1, 2]\n")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p", "--allow-empty")
    git("add", "params.yaml")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    with bench.measured_params(None) as (path, label):
        assert (path, label) == (str(params), "params.yaml")  # unchanged: the workspace's
    params.write_text("seeds: [0, 1]\n")  # as after `make demo`
    with bench.measured_params(None) as (path, label):
        assert label == "HEAD:params.yaml" and Path(path).read_text() == "seeds: [0, 1, 2]\n"
    assert not Path(path).exists()  # a temporary copy
    with bench.measured_params(str(params)) as (path, label):
        assert path == str(params)  # asked for explicitly


def test_throughput_times_each_variant_at_its_own_batch_on_a_gpu(tmp_path):
    """On a GPU a small batch measures kernel launches, not the GPU: benchmarks/throughput.py
    times the committed batches there, 64 on a CPU, and `--batch` when given."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput
    from aelab.config import load_config

    mae = load_config(ROOT / "params.yaml").variant("mae")
    assert throughput.step_batches(mae, None, torch.device("cuda")) == (
        mae.pretrain.batch_size, mae.classify.batch_size)
    assert mae.pretrain.batch_size != throughput.CPU_BATCH  # the case above tells them apart
    assert throughput.step_batches(mae, None, torch.device("cpu")) == (64, 64)
    assert throughput.step_batches(mae, 8, torch.device("cuda")) == (8, 8)

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"),
                           "--batch", "2", "--warmup", "0", "--steps", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AELAB_DEVICE": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == set(load_config(ROOT / "params.yaml").variants)
    assert all(float(r[0]) > 0 and r[1] == "2" and float(r[2]) > 0 and r[3] == "2"
               for r in rows.values())
