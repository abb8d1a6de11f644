"""The classify step: train one classifier (variant x mode) per seed, keeping each seed's
best-on-validation weights as <out>/seed<s>.pt.

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
from aelab.stats import mean_std
from aelab.training import resolve_device, seed_everything, train_classifier


def build_classifier(meta: dict) -> Classifier:
    """Rebuild a classifier (backbone + head) from a classifier checkpoint's meta."""
    spec = MODE_SPECS[meta["mode"]]
    return Classifier(build_from_meta(meta), meta["num_classes"], head=spec.head,
                      hidden=meta["head_hidden"], dropout=meta["dropout"], freeze=spec.frozen)


def load_init(manifest_path: Path, mode: str, seed: int) -> dict[str, torch.Tensor] | None:
    """The pretrained encoder weights of `seed` a manifest points at (None for random init)."""
    manifest = read_json(manifest_path)
    if manifest.get("mode") != mode:
        raise CheckpointError(f"{manifest_path} is the init manifest of mode "
                              f"'{manifest.get('mode')}', not '{mode}'")
    if manifest["init"] == "random":
        return None
    entry = manifest["checkpoints"].get(str(seed))
    if entry is None:
        raise CheckpointError(f"{manifest_path} has no checkpoint for seed {seed} "
                              "(rerun its pretrain stage with the same seeds)")
    checkpoint = manifest_path.parent.parent / entry["file"]
    if not checkpoint.is_file():
        raise CheckpointError(f"pretrained checkpoint not found: {checkpoint} "
                              "(run its pretrain stage first)")
    if file_md5(checkpoint) != entry["md5"]:
        raise CheckpointError(f"{checkpoint} does not match {manifest_path} (stale checkpoint); "
                              "rerun its pretrain stage")
    state, _ = load_checkpoint(checkpoint)
    return state


def run_classify(cfg: Config, variant: str, mode: str, data_dir: Path, init_manifest: Path,
                 out_dir: Path, reports_dir: Path) -> dict:
    """Train the `mode` classifier on `variant`'s encoder once per seed; returns the metrics
    written (means over seeds, and each seed's under `per_seed`)."""
    v = cfg.variant(variant)
    if mode not in MODE_SPECS:
        raise CheckpointError(f"unknown mode '{mode}'; expected one of {', '.join(MODE_SPECS)}")
    spec = MODE_SPECS[mode]
    device = resolve_device()
    dataset_meta = load_meta(data_dir)
    inits = {seed: load_init(init_manifest, mode, seed) for seed in cfg.seeds}  # fail early
    train = load_split(data_dir, "train")
    val = load_split(data_dir, "val")

    meta = {**model_meta(cfg, variant, dataset_meta), "mode": mode,
            "head_hidden": v.head_hidden, "dropout": v.dropout}
    params = {"variant": variant, "mode": mode, "arch": v.arch, "head": spec.head,
              "pretrained": spec.pretrained, "frozen": spec.frozen, "model": meta["model"],
              "head_hidden": v.head_hidden, "dropout": v.dropout, "seeds": list(cfg.seeds),
              "dataset": cfg.dataset, "train": v.classify.__dict__, "n_train": len(train[0]),
              "device": str(device)}
    histories, per_seed, curves = [], {}, {}
    for seed in cfg.seeds:
        seed_everything(seed)
        model = build_classifier(meta)
        if inits[seed] is not None:
            model.backbone.load_state_dict(inits[seed])
        with tracking.stage_run(f"classify/{variant}/{mode}", stage="classify",
                                dataset=cfg.dataset, variant=variant, mode=mode, seed=seed,
                                params={**params, "seed": seed}) as run:
            history, best_state, best, stats = train_classifier(
                model, train, val, v.classify, device=device, seed=seed,
                name=f"classify/{variant}/{mode}/seed{seed}", on_epoch=run.log_epoch)
            per_seed[str(seed)] = {
                "best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
                "final_train_acc": history[-1]["train_acc"],
                "final_val_acc": history[-1]["val_acc"], "train_seconds": stats.seconds,
                "peak_mem_mb": stats.peak_mem_mb, "mlflow_run_id": run.run_id}
            run.log_metrics({k: x for k, x in per_seed[str(seed)].items()
                             if k != "mlflow_run_id"})
        save_checkpoint(out_dir / f"seed{seed}.pt", best_state,
                        {**meta, "seed": seed, "selected_by": "val_acc",
                         "best_epoch": best["epoch"]})
        histories += [{"seed": seed, **row} for row in history]
        curves[f"seed {seed}"] = history

    metrics = {key: mean_std(r[key] for r in per_seed.values())[0]
               for key in ("best_val_acc", "final_train_acc", "final_val_acc", "train_seconds",
                           "peak_mem_mb")}
    metrics.update({"epochs": v.classify.epochs, "seeds": len(cfg.seeds),
                    "params": count_parameters(model),
                    "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
                    "per_seed": per_seed})
    write_history(reports_dir / "history.csv", histories)
    write_json(reports_dir / "metrics.json", metrics)
    accuracy_curves(curves, reports_dir / "accuracy.png", f"{variant} / {mode} on {cfg.dataset}")
    tracking.log_artifacts_to_run(per_seed[str(cfg.seeds[0])]["mlflow_run_id"],
                                  (reports_dir / "accuracy.png", reports_dir / "history.csv"))
    return metrics
