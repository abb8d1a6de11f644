"""End to end: the whole DVC DAG in a temp copy of the project, with tiny settings.

Runs `dvc repro` on the built-in shapes dataset, checks the table, figures and MLflow runs,
checks a second `dvc repro` reruns nothing, then that `mask_ratio` reaches only the masked
branches, MAE and mconv (`dvc status` after an edit, and which stages
`dvc exp run -S mask_ratio=0.9` really runs).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project, project_env

pytestmark = pytest.mark.e2e

VARIANTS = ["fc_l1", "fc_l2", "conv_192", "conv_256", "mae", "mconv"]
MODES = ["scratch", "mlp_finetune", "mlp_probe", "linear_finetune", "linear_probe"]
INITS = ["scratch", "pretrained"]


def tiny_params(raw: dict) -> dict:
    """Shrink the committed params to seconds per stage (same keys, same stages)."""
    raw["dataset"] = "shapes"
    raw["seeds"] = [0, 1]
    raw["data"].update(shapes_train=400, shapes_test=100, val_fraction=0.2)
    for name, v in raw["variants"].items():
        v["pretrain"].update(epochs=2, batch_size=64, warmup_epochs=0)
        v["classify"]["warmup_epochs"] = 0
        if v["arch"] == "fc":  # the seed's 12 M-parameter FC: 50 MB per checkpoint, x 20 + cache
            v["model"]["hidden"] = [192, 96, 48]
    raw["variants"]["mae"]["model"].update(patch_size=8, dim=32, depth=1, heads=2,
                                           decoder_dim=32, decoder_depth=1, decoder_heads=2)
    raw["variants"]["mconv"]["model"].update(channels=[4, 8, 8], blocks=1)
    raw["classify"].update(epochs=2, batch_size=64)
    return raw


def run(repo: Path, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=repo, env=project_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git+DVC copy of the project whose whole DAG has been reproduced once."""
    repo = copy_project(tmp_path_factory.mktemp("aelab-e2e"))
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(yaml.safe_load(params.read_text())),
                                     sort_keys=False))
    (repo / "data" / "external").mkdir(parents=True, exist_ok=True)
    run(repo, "git", "init", "-q")
    run(repo, "dvc", "commit", "-q", "-f", "data.dvc")  # what `make setup` does on a clone
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "e2e")
    out = run(repo, "dvc", "repro")
    expected = {"prepare", "evaluate", "report"} | {f"pretrain@{v}" for v in VARIANTS} | {
        f"classify@{v}-{i}" for v in VARIANTS for i in INITS}
    assert ran_stages(out) == expected
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "e2e results")
    return repo


def test_results_table(repo):
    results = json.loads((repo / "reports" / "results.json").read_text())
    assert results["dataset"] == "shapes"
    assert results["num_classes"] == 10 and results["chance_acc"] == pytest.approx(0.1)
    assert list(results["results"]) == VARIANTS
    for variant in VARIANTS:
        assert list(results["results"][variant]) == MODES
        for cell in results["results"][variant].values():
            assert 0.0 <= cell["test_acc"] <= 1.0 and 0.0 <= cell["best_val_acc"] <= 1.0
            per_seed = cell["test_acc_per_seed"]
            assert sorted(per_seed) == ["0", "1"]
            assert cell["test_acc"] == pytest.approx(sum(per_seed.values()) / 2)
    table = (repo / "reports" / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| variant |"))
    assert header == "| variant | " + " | ".join(MODES) + " | kNN |"
    for variant in VARIANTS:
        cell = r"\**\d\.\d{3} ± \d\.\d{3}\**( ~)?"
        assert re.search(rf"^\| {variant} \| ({cell}( \| )?){{6}} \|$", table, re.M)
        knn = results["knn"][variant]
        for init in ("pretrained", "random_init"):
            assert 0.0 <= knn[init]["val_acc"] <= 1.0 and 0.0 <= knn[init]["test_acc"] <= 1.0


def test_dvc_metrics_are_the_table_in_numbers(repo):
    shown = json.loads(subprocess.run(["dvc", "metrics", "show", "--json"], cwd=repo,
                                      env=project_env(), capture_output=True, text=True,
                                      check=True).stdout)
    (metrics,) = [d["data"]["reports/metrics.json"]["data"] for d in shown.values()]
    results = json.loads((repo / "reports" / "results.json").read_text())["results"]
    assert metrics["test_acc"] == {v: {m: c["test_acc"] for m, c in row.items()}
                                   for v, row in results.items()}
    assert set(metrics) == {"test_acc", "test_acc_std", "knn_test_acc"}


def test_figures(repo):
    figures = repo / "reports" / "figures"
    names = {p.name for p in figures.glob("*.png")}
    assert {"test_accuracy.png", "pretrain_loss.png", "accuracy_vs_compute.png"} <= names
    for variant in VARIANTS:
        assert {f"accuracy_{variant}.png", f"reconstructions_{variant}.png"} <= names
    for path in figures.glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_mlflow_runs(repo):
    from mlflow.tracking import MlflowClient

    assert (repo / "mlflow.db").is_file() and (repo / "mlartifacts").is_dir()
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aelab")
    every_run = client.search_runs([exp.experiment_id])
    # One group per pipeline execution: its run > a run per stage > the stage's training runs.
    (pipeline,) = [r for r in every_run if "aelab_pipeline_run" in r.data.tags]
    assert pipeline.info.run_name.startswith("dvc repro ") and pipeline.info.status == "FINISHED"
    parent = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in every_run}
    stage_runs = [r for r in every_run if parent[r.info.run_id] == pipeline.info.run_id]
    assert {r.info.run_name for r in stage_runs} == {f"pretrain@{v}" for v in VARIANTS} | {
        f"classify@{v}-{i}" for v in VARIANTS for i in INITS} | {"report"}
    assert all(r.info.status == "FINISHED" for r in stage_runs)
    assert any("system/cpu_utilization_percentage" in r.data.metrics for r in stage_runs)
    stage_ids = {r.info.run_id for r in stage_runs}
    all_runs = [r for r in every_run if parent[r.info.run_id] in stage_ids]
    assert len(all_runs) == len(every_run) - len(stage_runs) - 1  # nothing outside the group
    expected = {f"pretrain/{v}" for v in VARIANTS} | {
        f"classify/{v}/{m}" for v in VARIANTS for m in MODES} | {"report"}
    assert {r.info.run_name for r in all_runs} == expected
    assert len(all_runs) == 2 * (len(expected) - 1) + 1  # one run per seed, one report
    runs = {r.info.run_name: r for r in all_runs if r.data.tags.get("seed", "0") == "0"}
    assert runs["classify/mae/linear_probe"].data.tags["seed"] == "0"
    run = runs["classify/mae/linear_probe"]
    assert run.data.tags["stage"] == "classify" and run.data.tags["variant"] == "mae"
    assert run.data.tags["mode"] == "linear_probe" and run.data.tags["dataset"] == "shapes"
    assert len(run.data.tags["git_commit"]) == 40
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2  # one per epoch
    assert {"train/loss", "val/loss", "lr", "throughput/img_s"} <= set(run.data.metrics)
    assert "test/acc" in run.data.metrics  # added by the report stage
    (data,) = run.inputs.dataset_inputs
    assert data.dataset.name == "shapes" and len(data.dataset.digest) == 16
    pre = runs["pretrain/mae"]
    assert pre.data.params["mask_ratio"] == "0.75"
    artifacts = {a.path for a in client.list_artifacts(pre.info.run_id)}
    assert {"history.csv", "metrics.json", "images"} <= artifacts
    images = [a.path for a in client.list_artifacts(pre.info.run_id, "images")]
    pngs = [p for p in images if p.endswith(".png")]  # MLflow adds a .webp thumbnail to each
    assert len(pngs) == 2 and all("/reconstructions+step+" in p for p in pngs)  # one per epoch
    report = next(r for r in all_runs if r.info.run_name == "report")
    artifacts = {a.path for a in client.list_artifacts(report.info.run_id)}
    assert {"results.md", "reconstructions_mae.png", "test_accuracy.png"} <= artifacts
    pipelines = {r.data.tags["pipeline"] for r in runs.values()}
    assert len(pipelines) == 1  # one pipeline execution, one grouping tag


def test_best_classifiers_are_registered_and_load(repo):
    import mlflow.pytorch
    import torch
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    test = torch.load(repo / "data" / "prepared" / "shapes" / "test.pt", weights_only=True)
    for variant in VARIANTS:
        (version,) = client.search_model_versions(f"name = 'aelab-shapes-{variant}'")
        tags = version.tags
        assert tags["variant"] == variant and tags["mode"] in MODES
        assert len(tags["git_commit"]) == 40 and 0 <= float(tags["val_acc"]) <= 1
        run = client.get_run(version.run_id)
        assert run.data.tags["mode"] == tags["mode"] and run.data.tags["seed"] == tags["seed"]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model("models:/aelab-shapes-mae/1")
    x = test["images"][:8].float() / 127.5 - 1
    assert model(x).shape == (8, 10)


def test_second_repro_reruns_nothing(repo):
    out = run(repo, "dvc", "repro")
    assert ran_stages(out) == set()
    assert "up to date" in run(repo, "dvc", "status")


def test_mask_ratio_reaches_only_the_masked_branches(repo):
    params = repo / "params.yaml"
    committed = params.read_text()
    raw = yaml.safe_load(committed)
    raw["mask_ratio"] = 0.5
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    status = json.loads(run(repo, "dvc", "status", "--json"))
    # The masked pretrainings (mae, mconv), and the report, which prints the mask ratio.
    assert set(status) == {"pretrain@mae", "pretrain@mconv", "report"}
    raw["mask_ratio"] = yaml.safe_load(committed)["mask_ratio"]
    raw["variants"]["fc_l1"]["classify"]["epochs"] = 3  # a variant's classifier setting
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    status = json.loads(run(repo, "dvc", "status", "--json"))
    assert {"classify@fc_l1-scratch", "classify@fc_l1-pretrained"} <= set(status)
    assert not any(stage.startswith("pretrain@") for stage in status), status
    params.write_text(committed)

    out = run(repo, "dvc", "exp", "run", "-S", "mask_ratio=0.9")
    assert ran_stages(out) == {"pretrain@mae", "classify@mae-pretrained", "pretrain@mconv",
                               "classify@mconv-pretrained", "evaluate", "report"}
    assert "Stage 'classify@mae-scratch' didn't change, skipping" in out


def test_label_fraction_reruns_classifiers_but_no_pretraining(repo):
    out = run(repo, "dvc", "exp", "run", "-S", "label_fraction=0.5")
    assert ran_stages(out) == {"evaluate", "report"} | {
        f"classify@{v}-{i}" for v in VARIANTS for i in INITS}
    results = json.loads((repo / "reports" / "results.json").read_text())
    assert results["label_fraction"] == 0.5 and results["n_train_labelled"] == 160
    assert "Classifiers train on 50% of the training labels (160 images, stratified)" in (
        repo / "reports" / "results.md").read_text()
