"""Nothing lost: a stage killed mid-run resumes to the same result, a diverging run stops with
its last good checkpoint kept, a failing stage leaves no outputs, and DDP runs on 2 processes.

The stage tests run real stage processes in a git+DVC copy of the project with one small conv
variant (`project` fixture); the kill is a real SIGKILL of `dvc repro`'s process group.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from aelab import resume, tracking
from aelab.config import TrainConfig
from aelab.resume import ResumePoint, fit_resumable
from aelab.training import Batches, TrainingError, build_state, seed_everything
from tests.conftest import copy_project, project_env

VARIANT = "conv_192"
EPOCHS = 20  # long enough that the kill lands between the first checkpoint and the end
STAGE = f"pretrain@{VARIANT}"


def _write_params(repo: Path, seeds=(0,), shapes_train: int = 1000, **changes) -> None:
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["dataset"], raw["seeds"] = "shapes", list(seeds)
    raw["data"].update(shapes_train=shapes_train, shapes_test=100)
    raw["variants"] = {VARIANT: raw["variants"][VARIANT]}
    raw["variants"][VARIANT]["pretrain"].update(epochs=EPOCHS, batch_size=32)
    raw["classify"].update(epochs=4, modes=["scratch"])
    raw["runtime"].update(checkpoint_every=2, **changes)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _run(repo: Path, *cmd: str, check: bool = True, tmp: Path | None = None
         ) -> subprocess.CompletedProcess:
    """`cmd` in `repo`; with `tmp`, that is its TMPDIR."""
    env = project_env() if tmp is None else {**project_env(), "TMPDIR": str(tmp)}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def project(tmp_path) -> Path:
    """A git+DVC project copy with one small conv variant and one seed."""
    repo = copy_project(tmp_path / "repo")
    _write_params(repo)
    (repo / "data" / "external").mkdir(parents=True, exist_ok=True)
    _run(repo, "git", "init", "-q")
    _run(repo, "dvc", "commit", "-q", "-f", "data.dvc")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "test")
    # The MLflow store exists before the stages run (a new store's migrations take seconds),
    # so the kill tests can wait for a stage's run to be in it.
    _run(repo, sys.executable, "-c", "from aelab import tracking; tracking.ensure_experiment()")
    return repo


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _numbers(history_csv: Path) -> list[dict]:
    """A history without its timing columns."""
    with open(history_csv, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "img_s")}
                for row in csv.DictReader(fh)]


def _mlflow_runs(repo: Path, name: str) -> list:
    """The training runs called `name` (not the stage and pipeline runs grouping them)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("aelab")
    return client.search_runs([exp.experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")


def _runs_in_store(repo: Path, name: str) -> int:
    """Runs called `name` in the project's sqlite store (read with sqlite3: the store is
    created whole)."""
    db = repo / "mlflow.db"
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return con.execute("SELECT count(*) FROM runs WHERE name = ?", (name,)).fetchone()[0]


def _kill_when(cmd: list[str], repo: Path, ready) -> None:
    """Start `cmd`, SIGKILL its whole process group once `ready()` holds (before it ends).
    It leaves no temporary file (none could be deleted after a SIGKILL): its temp dir, a folder
    beside `repo`, is still empty afterwards."""
    tmp = repo.parent / "killed-tmp"
    tmp.mkdir(exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=repo, env={**project_env(), "TMPDIR": str(tmp)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, f"{' '.join(cmd)} ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(tmp.iterdir())


def test_a_killed_stage_resumes_to_the_same_weights_and_metrics(project):
    """SIGKILL `dvc repro` mid-run after a resume checkpoint was saved; `dvc repro` again
    resumes from it (DVC had removed the stage's outputs meanwhile) and ends bit-identical to an
    uninterrupted run, logging into the same MLflow run."""
    # The kill waits for the stage's MLflow run too, which the tracking agent writes once
    # MLflow has loaded: on a slow day 23 s after the start, when 20 epochs of 1,000 images
    # were already done. Epochs four times as long keep the kill inside the training.
    _write_params(project, shapes_train=4000)
    resume_dir = project / ".aelab" / "resume" / f"pretrain-{VARIANT}"
    _kill_when(["dvc", "repro", STAGE], project,
               lambda: list(resume_dir.glob("*.pt"))
               and _runs_in_store(project, f"pretrain/{VARIANT}"))
    (saved,) = resume_dir.glob("*.pt")
    epoch = torch.load(saved, weights_only=True)["state"]["epoch"]
    assert 2 <= epoch < EPOCHS
    out = project / "models" / "pretrain" / VARIANT
    assert not (out / "seed0.pt").exists()  # the killed stage wrote no output

    resumed = _run(project, "dvc", "repro", STAGE)
    assert f"resuming from epoch {epoch}/{EPOCHS}" in resumed.stderr + resumed.stdout
    assert not list(resume_dir.glob("*.pt"))  # removed once the outputs were written
    weights = _weights(out / "seed0.pt")
    history = _numbers(project / "reports" / "pretrain" / VARIANT / "history.csv")
    runs = _mlflow_runs(project, f"pretrain/{VARIANT}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags.get("resumed") == "true"

    whole = _run(project, "dvc", "repro", "-f", STAGE)  # uninterrupted, same settings
    assert "resuming" not in whole.stderr + whole.stdout
    assert _numbers(project / "reports" / "pretrain" / VARIANT / "history.csv") == history
    reference = _weights(out / "seed0.pt")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in weights)


def test_killed_seed_workers_resume_to_the_same_weights(project):
    """The same with two seeds in two seed workers: the kill takes the workers with it, and
    both seeds resume to what an uninterrupted run with the same settings ends with."""
    _write_params(project, seeds=(0, 1), seed_workers=2)
    resume_dir = project / ".aelab" / "resume" / f"pretrain-{VARIANT}"
    _kill_when(["dvc", "repro", STAGE], project, lambda: len(list(resume_dir.glob("*.pt"))) == 2)
    resumed = _run(project, "dvc", "repro", STAGE)
    assert (resumed.stderr + resumed.stdout).count("resuming from epoch") == 2
    out = project / "models" / "pretrain" / VARIANT
    weights = {seed: _weights(out / f"seed{seed}.pt") for seed in (0, 1)}
    _run(project, "dvc", "repro", "-f", STAGE)  # uninterrupted, same settings
    for seed in (0, 1):
        reference = _weights(out / f"seed{seed}.pt")
        assert all(torch.equal(weights[seed][k], reference[k]) for k in reference), seed


def test_a_killed_classify_stage_keeps_finished_seeds_and_resumes(project):
    """Kill the classify stage while its second seed trains: the rerun restores seed 0 as
    finished, resumes seed 1, and matches an uninterrupted run."""
    _write_params(project)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["seeds"] = [0, 1]
    raw["classify"].update(epochs=6, modes=["scratch"])
    raw["runtime"]["checkpoint_every"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    stage = f"classify@{VARIANT}-scratch"
    _run(project, "dvc", "repro", f"pretrain@{VARIANT}")
    resume_dir = project / ".aelab" / "resume" / f"classify-{VARIANT}-scratch"

    _kill_when(["dvc", "repro", stage], project,
               lambda: list(resume_dir.glob("scratch-seed1-*.pt")))

    resumed = _run(project, "dvc", "repro", stage)
    log = resumed.stderr + resumed.stdout
    assert "scratch/seed0: finished before the interruption (epoch 6/6), restored" in log
    assert "scratch/seed1: resuming from epoch" in log
    out = project / "models" / "classify" / f"{VARIANT}-scratch" / "scratch"
    metrics = json.loads((project / "reports" / "classify" / f"{VARIANT}-scratch" /
                          "metrics.json").read_text())
    weights = {s: _weights(out / f"seed{s}.pt") for s in (0, 1)}

    _run(project, "dvc", "repro", "-f", stage)
    again = json.loads((project / "reports" / "classify" / f"{VARIANT}-scratch" /
                        "metrics.json").read_text())
    for seed in ("0", "1"):
        for key in ("best_epoch", "best_val_acc", "final_train_acc", "final_val_acc"):
            assert metrics["scratch"]["per_seed"][seed][key] == \
                again["scratch"]["per_seed"][seed][key]
    for s in (0, 1):
        reference = _weights(out / f"seed{s}.pt")
        assert all(torch.equal(weights[s][k], reference[k]) for k in reference)


def test_a_changed_config_never_resumes_an_incompatible_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("AELAB_RESUME_DIR", str(tmp_path))
    parts = {"train": {"lr": 1e-3}, "meta": {"arch": "conv"}}
    a = ResumePoint("pretrain-x", "pretrain", 0, parts, every=1, epochs=3)
    same = ResumePoint("pretrain-x", "pretrain", 0, parts, every=1, epochs=3)
    other_lr = ResumePoint("pretrain-x", "pretrain", 0, {**parts, "train": {"lr": 2e-3}},
                           every=1, epochs=3)
    other_seed = ResumePoint("pretrain-x", "pretrain", 1, parts, every=1, epochs=3)
    assert a.path == same.path
    assert len({a.path, other_lr.path, other_seed.path}) == 3
    # A file put where another config's checkpoint would be is refused by its fingerprint.
    a.path.parent.mkdir(parents=True)
    torch.save({"fingerprint": other_lr.fingerprint, "state": {"epoch": 2}}, a.path)
    assert a.load() is None


class _DivergesAt(torch.nn.Module):
    """A model whose loss becomes NaN at optimiser step `bad_step` (counting from 1)."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.bad_step, self.calls = bad_step, 0

    def training_loss(self, x, y):
        loss = ((x.mean(dim=(2, 3)) - self.w) ** 2).mean()
        if self.training:
            self.calls += 1
            if self.calls >= self.bad_step:
                loss = loss * float("nan")
        return loss, {}


def test_a_nan_loss_stops_with_epoch_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("AELAB_RESUME_DIR", str(tmp_path / "resume"))
    seed_everything(0)
    images = torch.randint(0, 256, (64, 3, 2, 2), dtype=torch.uint8)
    cfg = TrainConfig(epochs=5, batch_size=16, lr=1e-2)  # 4 steps an epoch
    model = _DivergesAt(bad_step=11)  # epoch 3, its 3rd batch
    train = Batches(images, None, cfg.batch_size, device=torch.device("cpu"), shuffle=True)
    state = build_state(model, cfg, batches_per_epoch=len(train), device=torch.device("cpu"))
    point = ResumePoint("pretrain-nan", "pretrain", 0, {}, every=1, epochs=cfg.epochs)
    with pytest.raises(TrainingError) as err:
        with tracking.stage_run("pretrain/nan", stage="pretrain", dataset="t", params={}) as run:
            fit_resumable(state, train, None, cfg, device=torch.device("cpu"), name="nan",
                          hooks=[run.epoch_hook], resume=point)
    message = str(err.value)
    assert "loss became nan in epoch 3 at step 11 (batch 3 of 4)" in message
    assert f"last good checkpoint: epoch 2, {point.path}" in message
    kept = torch.load(point.path, weights_only=True)
    assert kept["state"]["epoch"] == 2 and torch.isfinite(kept["state"]["model"]["w"]).all()
    tracking.close()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    (run_info,) = client.search_runs([client.get_experiment_by_name("aelab").experiment_id])
    assert run_info.info.status == "FAILED"


def test_a_failing_stage_leaves_no_outputs(project):
    """A stage that fails after training (here: its MLflow store cannot be written) removes the
    outputs it had written, and an earlier run's outputs too: nothing that looks complete."""
    _run(project, "dvc", "repro", STAGE)
    out = project / "models" / "pretrain" / VARIANT
    reports = project / "reports" / "pretrain" / VARIANT
    assert (out / "seed0.pt").is_file() and (reports / "metrics.json").is_file()
    tmp = project / "tmp"  # the stage's temp dir: it writes nothing there
    tmp.mkdir()
    env = {**project_env(), "MLFLOW_TRACKING_URI": "nosuchstore://here",  # fails at 1st write
           "TMPDIR": str(tmp)}
    proc = subprocess.run([sys.executable, "stages/pretrain.py", "--variant", VARIANT,
                           "--data", "data/prepared/shapes", "--out", str(out),
                           "--reports", str(reports)], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error:"), proc.stderr
    assert not reports.exists() and not (out / "seed0.pt").exists()
    assert not list(tmp.iterdir())  # (the reconstruction images go to the agent as bytes)


def test_ddp_on_two_cpu_processes_trains_once_and_logs_once(project):
    """runtime.devices: 2 runs the stage under torchrun (gloo): every epoch, finite losses, one
    MLflow run, outputs written once by rank 0, torchrun's log folders removed."""
    _write_params(project, devices=2)
    tmp = project.parent / "tmp"
    tmp.mkdir()
    proc = _run(project, "dvc", "repro", STAGE, tmp=tmp)
    # torchrun leaves a torchelastic_* folder per run there without --log-dir; torchinductor_<user>
    # is torch's one compile cache per user, made empty under DDP and shared by every run
    assert [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []
    log = proc.stdout + proc.stderr
    assert log.count(f"pretrain/{VARIANT}: val_loss") == 1  # rank 0 reports
    history = _numbers(project / "reports" / "pretrain" / VARIANT / "history.csv")
    assert [int(r["epoch"]) for r in history] == list(range(1, EPOCHS + 1))
    assert all(math.isfinite(float(r["train_loss"])) for r in history)
    assert float(history[-1]["val_loss"]) < float(history[0]["val_loss"])
    runs = _mlflow_runs(project, f"pretrain/{VARIANT}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    steps = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_metric_history(
        runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in steps) == list(range(1, EPOCHS + 1))
    metrics = json.loads((project / "reports" / "pretrain" / VARIANT / "metrics.json").read_text())
    assert list(metrics["per_seed"]) == ["0"]
    assert sorted(p.name for p in (project / "models" / "pretrain" / VARIANT).iterdir()) == [
        "init", "seed0.pt"]


def test_ddp_trains_a_classifier_whose_decoder_gets_no_gradient(project):
    """A classify stage under torchrun: the autoencoder's decoder is part of the classifier's
    backbone but never used; DDP must not wait for its gradients. With gradient accumulation
    (all-reduced once per optimiser step, `no_sync` on the other batches)."""
    _run(project, "dvc", "repro", STAGE)
    _write_params(project, devices=2)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["classify"]["accumulate"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _run(project, "dvc", "repro", f"classify@{VARIANT}-scratch")
    log = proc.stdout + proc.stderr
    history = _numbers(project / "reports" / "classify" / f"{VARIANT}-scratch" / "history"
                       / "scratch.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4], log[-2000:]
    assert all(math.isfinite(float(r["train_loss"])) for r in history)
    assert len(_mlflow_runs(project, f"classify/{VARIANT}/scratch")) == 1


def test_source_digest_covers_the_package():
    assert len(resume.source_digest()) == 32
