"""The evaluate step: score every kept classifier (each seed) on the test split, once; and the
kNN check of every encoder (each seed), pretrained and at random init, on val and test features.
Each number is reported as mean, sample std and the per-seed values."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

import torch

from aelab import layout, tracking
from aelab.checkpoint import check_weights, load_checkpoint, load_weights, write_json
from aelab.config import Config
from aelab.cost import flops_per_image
from aelab.data import label_subset, load_meta, load_split
from aelab.knn import encode_all, knn_accuracy
from aelab.models import build_classifier, build_from_meta, classifier_meta
from aelab.stats import summarise
from aelab.training import evaluate_classifier, resolve_device, seed_everything


def classifier_names(cfg: Config) -> list[tuple[str, str]]:
    """Every (variant, mode) pair the pipeline trains, in table order."""
    return [(v, m) for v in cfg.variants for m in cfg.modes]


def check_encoders(cfg: Config, encoders_dir: Path) -> dict[str, dict]:
    """Load every pretrained encoder checkpoint (each variant and seed) and check it holds the
    weights its meta describes, so a missing or broken one fails before anything is scored or
    registered; the weights are not kept (the kNN check loads them again, one at a time).
    Returns {variant: meta} of the first seed's."""
    metas = {}
    for variant in cfg.variants:
        for seed in cfg.seeds:
            path = layout.pretrain_checkpoint(encoders_dir / variant, seed)
            state, meta = load_checkpoint(path)
            with torch.device("meta"):
                check_weights(build_from_meta(meta), state, path)
            metas.setdefault(variant, meta)
    return metas


def knn_scores(cfg: Config, splits: dict, num_classes: int, encoders_dir: Path, device) -> dict:
    """{variant: {"pretrained"|"random_init": {"val_acc", "test_acc" (+ _std, _per_seed)}}}
    from `splits` = {"train"|"val"|"test": (uint8 images, labels)}; the train split is the
    neighbour bank, so pass only its labelled share (label_fraction)."""
    k, bs = cfg.evaluate.knn_k, cfg.evaluate.batch_size
    out: dict[str, dict] = {}
    for variant in tqdm(cfg.variants, desc="kNN"):
        scores: dict[str, dict[str, dict[str, float]]] = {}
        for seed in cfg.seeds:
            path = layout.pretrain_checkpoint(encoders_dir / variant, seed)
            state, meta = load_checkpoint(path)
            seed_everything(seed)  # the same random init the scratch classifier starts from
            encoders = {"random_init": build_from_meta(meta), "pretrained": build_from_meta(meta)}
            load_weights(encoders["pretrained"], state, path)
            for name, encoder in encoders.items():
                feats = {s: encode_all(encoder, x, batch_size=bs, device=device)
                         for s, (x, _) in splits.items()}
                for s in ("val", "test"):
                    acc = knn_accuracy(feats["train"], splits["train"][1], feats[s],
                                       splits[s][1], k=k, num_classes=num_classes)
                    scores.setdefault(name, {}).setdefault(s, {})[str(seed)] = acc
        out[variant] = {"k": k}
        for name, by_split in scores.items():
            out[variant][name] = {}
            for s, per_seed in by_split.items():
                out[variant][name].update(summarise(per_seed, f"{s}_acc"))
    return out


def check_classifiers(cfg: Config, checkpoints: dict, models_dir: Path,
                      dataset_meta: dict) -> None:
    """Each classifier checkpoint holds the weights of the classifier params.yaml describes
    (built on the meta device: no memory, no compute), so a checkpoint of another architecture
    fails in one line before the slow part."""
    for variant, mode in classifier_names(cfg):
        with torch.device("meta"):
            model = build_classifier(classifier_meta(cfg, variant, mode, dataset_meta))
        for seed in cfg.seeds:
            check_weights(model, checkpoints[(variant, mode, seed)][0],
                          layout.classifier_checkpoint_in(models_dir, variant, mode, seed))


def run_evaluate(cfg: Config, data_dir: Path, models_dir: Path, encoders_dir: Path,
                 out_json: Path) -> dict:
    """Test accuracy of every classifier (each seed) and kNN of every encoder; writes out_json."""
    device = resolve_device()
    # The agent loads torch and mlflow.pytorch for the registrations at the end now,
    # on the other core.
    tracking.prepare_registration(v.arch for v in cfg.variants.values())
    runs = [(v, m, seed) for v, m in classifier_names(cfg) for seed in cfg.seeds]
    # Load and check every checkpoint first, so a missing or foreign one fails before the slow
    # part.
    checkpoints = {(v, m, seed): load_checkpoint(layout.classifier_checkpoint_in(models_dir, v, m,
                                                                                seed))
                   for v, m, seed in runs}
    dataset_meta = load_meta(data_dir)
    num_classes = dataset_meta["num_classes"]
    check_classifiers(cfg, checkpoints, models_dir, dataset_meta)
    encoder_metas = check_encoders(cfg, encoders_dir)  # before a model is registered
    splits = {name: load_split(data_dir, name) for name in ("train", "val", "test")}
    labelled = torch.from_numpy(label_subset(splits["train"][1].numpy(), cfg.label_fraction,
                                             cfg.seed))
    splits["train"] = tuple(t[labelled] for t in splits["train"])  # the kNN bank: labelled only
    images, labels = splits["test"]
    accs: dict[tuple[str, str], dict[str, float]] = {}
    losses: dict[tuple[str, str], dict[str, float]] = {}
    for (variant, mode, seed) in tqdm(runs, desc="evaluate on test"):
        state, meta = checkpoints[(variant, mode, seed)]
        model = build_classifier(meta)
        load_weights(model, state, layout.classifier_checkpoint_in(models_dir, variant, mode, seed))
        scores = evaluate_classifier(model, images, labels, batch_size=cfg.evaluate.batch_size,
                                     device=device)
        accs.setdefault((variant, mode), {})[str(seed)] = scores["acc"]
        losses.setdefault((variant, mode), {})[str(seed)] = scores["loss"]
    results: dict[str, dict] = {}
    for (variant, mode), per_seed in accs.items():
        results.setdefault(variant, {})[mode] = {
            **summarise(per_seed, "test_acc"), **summarise(losses[(variant, mode)], "test_loss"),
            "n_test": len(labels)}
    registered = register_best(cfg, checkpoints, results, models_dir)  # done while kNN runs
    cost = {}  # counted FLOPs per image of each autoencoder (the same for every seed)
    for variant in cfg.variants:
        meta = encoder_metas[variant]
        flops = flops_per_image(build_from_meta(meta), meta["image_size"])
        cost[variant] = {"train_gflops_per_image": flops["train_step"] / 1e9,
                         "encode_gflops_per_image": flops["encode"] / 1e9}
    out = {"dataset": cfg.dataset, "split": "test", "seeds": list(cfg.seeds), "cost": cost,
           "label_fraction": cfg.label_fraction, "n_train_labelled": len(labelled),
           "num_classes": num_classes, "results": results,
           "knn": knn_scores(cfg, splits, num_classes, encoders_dir, device)}
    for variant, (run_id, done) in registered.items():
        if not done():
            tqdm.write(f"{variant}: best classifier not registered (its run {run_id} is not in "
                       "this MLflow store)")
    write_json(out_json, out)
    return out


def best_per_variant(cfg: Config, checkpoints: dict) -> dict[str, tuple[str, int]]:
    """{variant: (mode, seed)}: the mode with the best mean validation accuracy over seeds,
    and its seed with the best validation accuracy (selection never looks at test)."""
    best = {}
    for variant in cfg.variants:
        def val(mode: str, seed: int) -> float:
            return checkpoints[(variant, mode, seed)][1].get("best_val_acc", float("-inf"))

        mode = max(cfg.modes, key=lambda m: sum(val(m, s) for s in cfg.seeds))
        best[variant] = (mode, max(cfg.seeds, key=lambda s: val(mode, s)))
    return best


def register_best(cfg: Config, checkpoints: dict, results: dict,
                  models_dir: Path) -> dict[str, tuple[str, Callable[[], bool]]]:
    """Register each variant's best classifier in the MLflow model registry (as
    `aelab-<dataset>-<variant>`, a new version per pipeline execution, tagged with the git
    commit and the DVC experiment), logged in its own training run; loadable with
    `mlflow.pytorch.load_model("models:/aelab-<dataset>-<variant>/<version>")`. The agent
    registers while this process goes on: returns {variant: (run id, a function that waits
    for the registration and says whether it was made)}."""
    pending = {}
    for variant, (mode, seed) in best_per_variant(cfg, checkpoints).items():
        meta = checkpoints[(variant, mode, seed)][1]
        if "mlflow_run_id" not in meta:
            continue  # a checkpoint written before runs were recorded in it
        tags = {"variant": variant, "mode": mode, "seed": str(seed), "dataset": cfg.dataset,
                "val_acc": f"{meta['best_val_acc']:.4f}",
                "test_acc": f"{results[variant][mode]['test_acc_per_seed'][str(seed)]:.4f}",
                "label_fraction": str(cfg.label_fraction)}
        path = layout.classifier_checkpoint_in(models_dir, variant, mode, seed)
        pending[variant] = (meta["mlflow_run_id"], tracking.register_model(
            path, f"aelab-{cfg.dataset}-{variant}", meta["mlflow_run_id"], tags))
    return pending
