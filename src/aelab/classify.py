"""The classify step: train a variant's classifiers of one init (scratch, or the four pretrained
modes) once per seed, keeping each seed's best-on-validation weights.

Classifiers see the labelled share of the training split (`label_fraction`, stratified and fixed
by the data seed); validation is whole. The test split is never read here: selection (the
checkpoint kept) uses validation accuracy, and the evaluate step scores the kept checkpoint on
test once. Frozen probes train on features computed once per seed and shared by both probes:
the encoder is in eval mode and probes do not augment, so the features are the same every epoch.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from aelab import distributed, layout, tracking
from aelab.checkpoint import (CheckpointError, check_weights, file_md5, load_checkpoint,
                              load_weights, read_json, save_checkpoint, write_json)
from aelab.config import MODE_SPECS, Config, TrainConfig, modes_of
from aelab.data import data_digest, label_subset, load_meta, load_split
from aelab.history import write_history
from aelab.models import Classifier, build_classifier, classifier_meta, count_parameters
from aelab.parallel import map_seeds, worker_count
from aelab.stats import mean_std
from aelab.resume import ResumePoint, fit_resumable, remove_all
from aelab.timeline import phase
from aelab.training import (Batches, KeepBest, RunStats, build_state, encode_images,
                            peak_memory_mb, reset_peak_memory, resolve_device,
                            seed_everything)


def load_init(manifest_path: Path, init: str, seed: int) -> dict[str, torch.Tensor] | None:
    """The pretrained encoder weights of `seed` a manifest points at (None for scratch)."""
    manifest = read_json(manifest_path)
    if manifest.get("init") != init:
        raise CheckpointError(f"{manifest_path} is the '{manifest.get('init')}' init manifest, "
                              f"not '{init}'")
    if init == "scratch":
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


def train_classifier(model: Classifier, train: tuple[torch.Tensor, torch.Tensor],
                     val: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig, *,
                     device: torch.device, seed: int, name: str, hooks=(),
                     features: tuple[torch.Tensor, torch.Tensor] | None = None,
                     resume: ResumePoint | None = None, compile: bool = False):
    """Train `model` with `cfg`; keep the weights of the epoch with the best validation accuracy.

    Returns (history, best_state_dict, best_row, RunStats). A frozen classifier trains its
    probe (feature norm + head) on `features` = (train, val) encoder outputs, computed here if
    not given; the state returned is still the whole classifier's. With `resume`, a run killed
    earlier continues from its saved state (best-so-far weights included). `compile`: the
    training step through torch.compile (runtime.compile).
    """
    seed_everything(seed)
    reset_peak_memory(device)
    model.to(device)
    start = time.perf_counter()
    net, train_x, val_x, augment = model, train[0], val[0], cfg.augment
    if model.freeze:
        train_x, val_x = features or encode_features(model, train[0], val[0], device=device)
        net, augment = model.probe(), None
    train_b = Batches(train_x, train[1], cfg.batch_size, device=device, shuffle=True)
    val_b = Batches(val_x, val[1], cfg.batch_size, device=device, shuffle=False)
    state = build_state(net, cfg, batches_per_epoch=len(train_b), device=device, compile=compile)
    best = KeepBest(model, "val_acc")
    if resume is not None:
        resume.extras["best"] = best
    features_seconds = time.perf_counter() - start
    history = fit_resumable(state, train_b, val_b, cfg, device=device, augment=augment,
                            hooks=[best, *hooks], name=name, resume=resume)
    stats = RunStats(features_seconds + state.seconds, peak_memory_mb(device))
    return history, best.state_dict, best.row, stats


def encode_features(model: Classifier, train_images: torch.Tensor, val_images: torch.Tensor, *,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen encoder's features of both splits (eval mode, no augmentation)."""
    return tuple(encode_images(model.backbone, x, batch_size=512, device=device)
                 for x in (train_images, val_images))


def run_classify(cfg: Config, variant: str, init: str, data_dir: Path, init_manifest: Path,
                 out_dir: Path, reports_dir: Path) -> dict:
    """Train every mode of `init` on `variant`'s encoder, once per seed; returns the metrics
    written ({mode: means over seeds, each seed's under `per_seed`})."""
    v = cfg.variant(variant)
    modes = modes_of(init, cfg.modes)
    device = distributed.init(resolve_device())  # under torchrun: join the group
    dataset_meta = load_meta(data_dir)
    inits = {seed: load_init(init_manifest, init, seed) for seed in cfg.seeds}  # fail early
    backbone = build_classifier(classifier_meta(cfg, variant, modes[0], dataset_meta)).backbone
    for seed, state in inits.items():  # another architecture's weights: fail before the data
        if state is not None:
            check_weights(backbone, state,
                          layout.pretrain_checkpoint(init_manifest.parent.parent, seed))
    with phase("data load"):
        train_images, train_labels = load_split(data_dir, "train")
        labelled = torch.from_numpy(label_subset(train_labels.numpy(), cfg.label_fraction,
                                                 cfg.seed))
        train = (train_images[labelled], train_labels[labelled])
        val = load_split(data_dir, "val")

    run_parts = {"data": data_digest(data_dir), "label_fraction": cfg.label_fraction,
                 "data_seed": cfg.seed, "init": file_md5(init_manifest)}
    data = {"name": cfg.dataset, "digest": run_parts["data"], "source": str(data_dir.resolve()),
            "context": "train", "profile": json.dumps({
                "train_labelled": len(train[0]), "val": len(val[0]),
                "label_fraction": cfg.label_fraction})}
    settings = {}  # mode -> (train config, classifier meta, MLflow params)
    for mode in modes:
        spec = MODE_SPECS[mode]
        train_cfg = v.probe if spec.frozen else v.classify
        meta = classifier_meta(cfg, variant, mode, dataset_meta)
        settings[mode] = (train_cfg, meta, {
            "variant": variant, "mode": mode, "arch": v.arch, "head": spec.head,
            "pretrained": spec.pretrained, "frozen": spec.frozen, "model": meta["model"],
            "head_hidden": v.head_hidden, "dropout": v.dropout, "seeds": list(cfg.seeds),
            "dataset": cfg.dataset, "label_fraction": cfg.label_fraction,
            "train": dataclasses.asdict(train_cfg), "n_train": len(train[0]),
            "device": str(device), "compile": cfg.runtime.compile})

    def train_seed(seed: int) -> dict:
        """Every mode for one seed (here, or in a seed worker: aelab.parallel); the probes
        share the frozen encoder's features, computed once."""
        features, results = None, {}
        for mode in modes:
            spec = MODE_SPECS[mode]
            train_cfg, meta, params = settings[mode]
            seed_everything(seed)
            model = build_classifier(meta, train_cfg.label_smoothing)
            if inits[seed] is not None:
                load_weights(model.backbone, inits[seed],
                             layout.pretrain_checkpoint(init_manifest.parent.parent, seed))
            if spec.frozen and features is None:
                features = encode_features(model, train[0], val[0], device=device)
            point = ResumePoint(f"classify-{variant}-{init}", mode, seed,
                                {**run_parts, "meta": meta, "train": dataclasses.asdict(train_cfg)},
                                every=cfg.runtime.checkpoint_every, epochs=train_cfg.epochs)
            point.load()
            with tracking.stage_run(f"classify/{variant}/{mode}", stage="classify",
                                    dataset=cfg.dataset, variant=variant, mode=mode, seed=seed,
                                    params={**params, "seed": seed},
                                    resume=(point.key, point.saved is not None),
                                    data=data) as run:
                history, best_state, best, stats = train_classifier(
                    model, train, val, train_cfg, device=device, seed=seed,
                    name=f"classify/{variant}/{mode}/seed{seed}", hooks=[run.epoch_hook],
                    features=features if spec.frozen else None, resume=point,
                    compile=cfg.runtime.compile)
                row = {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
                       "final_train_acc": history[-1]["train_acc"],
                       "final_val_acc": history[-1]["val_acc"], "train_seconds": stats.seconds,
                       "peak_mem_mb": stats.peak_mem_mb}
                run.log_metrics(row)
            results[mode] = {"history": history, "state": best_state, "row": row,
                             "run": run.key, "resume": point.detach()}
        return results

    workers = worker_count(cfg.runtime.seed_workers, cfg.seeds, device)
    by_seed = map_seeds(train_seed, cfg.seeds, workers=workers)
    if not distributed.is_main():
        return {}  # rank 0 writes the outputs

    # Outputs only now that every mode and seed trained (a failure above leaves none),
    # metrics.json last.
    metrics = {}
    for mode in modes:
        train_cfg, meta, _ = settings[mode]
        per_seed, histories = {}, []
        for seed in cfg.seeds:
            result = by_seed[seed][mode]
            run_id = tracking.run_for(result["run"]).run_id
            per_seed[str(seed)] = {**result["row"], "mlflow_run_id": run_id}
            best = result["row"]
            save_checkpoint(layout.classifier_checkpoint(out_dir, mode, seed), result["state"],
                            {**meta, "seed": seed, "selected_by": "val_acc",
                             "best_epoch": best["best_epoch"], "best_val_acc": best["best_val_acc"],
                             "mlflow_run_id": run_id, "label_fraction": cfg.label_fraction})
            histories += [{"seed": seed, **row} for row in result["history"]]
        history_file = layout.history_csv(reports_dir, mode)
        write_history(history_file, histories)
        tracking.run_for(by_seed[cfg.seeds[0]][mode]["run"]).log_artifacts((history_file,))
        model = build_classifier(meta, train_cfg.label_smoothing)
        metrics[mode] = {key: mean_std(r[key] for r in per_seed.values())[0]
                         for key in ("best_val_acc", "final_train_acc", "final_val_acc",
                                     "train_seconds", "peak_mem_mb")}
        metrics[mode].update({
            "epochs": train_cfg.epochs, "seeds": len(cfg.seeds), "params": count_parameters(model),
            "trainable_params": count_parameters(model, trainable=True),
            "label_fraction": cfg.label_fraction, "n_train_labelled": len(train[0]),
            "per_seed": per_seed})
    write_json(reports_dir / "metrics.json", metrics)
    remove_all(result["resume"] for results in by_seed.values() for result in results.values())
    return metrics
