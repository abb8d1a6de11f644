"""The classify step: train one classifier (variant x mode) and keep its best-on-validation weights.

The test split is never read here: selection (the checkpoint kept) uses validation accuracy,
and the evaluate step scores the kept checkpoint on test once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aelab import tracking
from aelab.checkpoint import (CheckpointError, file_md5, load_checkpoint, read_json,
                              save_checkpoint, write_json)
from aelab.config import MODE_SPECS, Config
from aelab.data import load_meta, load_split
from aelab.history import write_history
from aelab.models import Classifier
from aelab.plots import accuracy_curves
from aelab.pretrain import build_from_meta, count_parameters, model_meta
from aelab.training import resolve_device, seed_everything, train_classifier


def build_classifier(meta: dict) -> Classifier:
    """Rebuild a classifier (backbone + head) from a classifier checkpoint's meta."""
    spec = MODE_SPECS[meta["mode"]]
    return Classifier(build_from_meta(meta), meta["num_classes"], head=spec.head,
                      hidden=meta["head_hidden"], dropout=meta["dropout"], freeze=spec.frozen)


def load_init(manifest_path: Path, mode: str) -> dict[str, torch.Tensor] | None:
    """The pretrained encoder weights a manifest points at (None for random init)."""
    manifest = read_json(manifest_path)
    if manifest.get("mode") != mode:
        raise CheckpointError(f"{manifest_path} is the init manifest of mode "
                              f"'{manifest.get('mode')}', not '{mode}'")
    if manifest["init"] == "random":
        return None
    checkpoint = manifest_path.parent.parent / manifest["checkpoint"]
    if not checkpoint.is_file():
        raise CheckpointError(f"pretrained checkpoint not found: {checkpoint} "
                              "(run its pretrain stage first)")
    if file_md5(checkpoint) != manifest["md5"]:
        raise CheckpointError(f"{checkpoint} does not match {manifest_path} (stale checkpoint); "
                              "rerun its pretrain stage")
    state, _ = load_checkpoint(checkpoint)
    return state


def run_classify(cfg: Config, variant: str, mode: str, data_dir: Path, init_manifest: Path,
                 out_model: Path, reports_dir: Path) -> dict:
    """Train the `mode` classifier on `variant`'s encoder; returns the metrics written."""
    v = cfg.variant(variant)
    if mode not in MODE_SPECS:
        raise CheckpointError(f"unknown mode '{mode}'; expected one of {', '.join(MODE_SPECS)}")
    spec = MODE_SPECS[mode]
    device = resolve_device()
    dataset_meta = load_meta(data_dir)
    init_state = load_init(init_manifest, mode)
    train = load_split(data_dir, "train")
    val = load_split(data_dir, "val")

    meta = {**model_meta(cfg, variant, dataset_meta), "mode": mode,
            "head_hidden": v.head_hidden, "dropout": v.dropout}
    seed_everything(cfg.seed)
    model = build_classifier(meta)
    if init_state is not None:
        model.backbone.load_state_dict(init_state)

    params = {"variant": variant, "mode": mode, "arch": v.arch, "head": spec.head,
              "pretrained": spec.pretrained, "frozen": spec.frozen, "model": meta["model"],
              "head_hidden": v.head_hidden, "dropout": v.dropout, "seed": cfg.seed,
              "dataset": cfg.dataset, "train": v.classify.__dict__, "n_train": len(train[0]),
              "device": str(device)}
    with tracking.stage_run(f"classify/{variant}/{mode}", stage="classify", dataset=cfg.dataset,
                            variant=variant, mode=mode, params=params) as run:
        history, best_state, best, stats = train_classifier(
            model, train, val, v.classify, device=device, seed=cfg.seed,
            name=f"classify/{variant}/{mode}", on_epoch=run.log_epoch)
        trainable = sum(p.numel() for p in model.trainable_parameters())
        metrics = {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
                   "final_train_acc": history[-1]["train_acc"],
                   "final_val_acc": history[-1]["val_acc"], "epochs": len(history),
                   "params": count_parameters(model), "trainable_params": trainable,
                   "train_seconds": stats.seconds, "peak_mem_mb": stats.peak_mem_mb}
        save_checkpoint(out_model, best_state, {**meta, "selected_by": "val_acc",
                                                "best_epoch": best["epoch"]})
        write_history(reports_dir / "history.csv", history)
        write_json(reports_dir / "metrics.json", {**metrics, "mlflow_run_id": run.run_id})
        figure = reports_dir / "accuracy.png"
        accuracy_curves({mode: history}, figure, f"{variant} / {mode} on {cfg.dataset}")
        run.log_metrics(metrics)
        for path in (figure, reports_dir / "history.csv"):
            run.log_artifact(path)
    return metrics
