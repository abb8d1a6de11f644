"""The per-seed and per-mode file names of the pipeline, named once.

dvc.yaml passes each stage its directories; inside them these functions name the files:

    models/pretrain/<variant>/seed<s>.pt                  pretrained autoencoder, per seed
    models/pretrain/<variant>/init/<init>.json            init manifest: scratch | pretrained
    models/classify/<variant>-<init>/<mode>/seed<s>.pt    selected classifier, per mode and seed
    reports/classify/<variant>-<init>/history/<mode>.csv  per-epoch curves (dvc plots)

The stages' fixed file names (reports/pretrain/<variant>/{history.csv,metrics.json,
reconstructions.pt}, reports/classify/<variant>-<init>/metrics.json) are written by the stage
that owns them and listed as outputs in dvc.yaml.
"""

from __future__ import annotations

from pathlib import Path

from aelab.config import MODE_SPECS


def seed_file(seed: int) -> str:
    """A per-seed checkpoint's file name."""
    return f"seed{seed}.pt"


def pretrain_checkpoint(pretrain_dir: Path, seed: int) -> Path:
    """The autoencoder trained with `seed`, inside models/pretrain/<variant>/."""
    return Path(pretrain_dir) / seed_file(seed)


def init_manifest(pretrain_dir: Path, init: str) -> Path:
    """The manifest a classify stage depends on (see aelab.pretrain)."""
    return Path(pretrain_dir) / "init" / f"{init}.json"


def init_of(mode: str) -> str:
    """The classify stage that trains `mode`: 'pretrained' or 'scratch'."""
    return "pretrained" if MODE_SPECS[mode].pretrained else "scratch"


def classify_stage(variant: str, init: str) -> str:
    """Directory name of one classify stage's outputs: <variant>-<init>."""
    return f"{variant}-{init}"


def classifier_checkpoint(stage_dir: Path, mode: str, seed: int) -> Path:
    """Inside a classify stage's model directory."""
    return Path(stage_dir) / mode / seed_file(seed)


def classifier_checkpoint_in(models_root: Path, variant: str, mode: str, seed: int) -> Path:
    """From models/classify, for steps that read every classifier (evaluate)."""
    return classifier_checkpoint(Path(models_root) / classify_stage(variant, init_of(mode)),
                                 mode, seed)


def classify_reports_in(reports_root: Path, variant: str, mode: str) -> Path:
    """reports/classify/<variant>-<init> for `mode`."""
    return Path(reports_root) / classify_stage(variant, init_of(mode))


def history_csv(classify_reports: Path, mode: str) -> Path:
    """One mode's per-epoch history inside a classify stage's reports directory."""
    return Path(classify_reports) / "history" / f"{mode}.csv"
