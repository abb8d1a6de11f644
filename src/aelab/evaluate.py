"""The evaluate step: score every kept classifier on the test split, once; and the kNN check
of every encoder, pretrained and at random init, on validation and test features."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from aelab.checkpoint import load_checkpoint, write_json
from aelab.classify import build_classifier
from aelab.config import Config
from aelab.data import load_meta, load_split
from aelab.knn import encode_all, knn_accuracy
from aelab.pretrain import build_from_meta
from aelab.training import evaluate_classifier, resolve_device, seed_everything


def classifier_names(cfg: Config) -> list[tuple[str, str]]:
    """Every (variant, mode) pair the pipeline trains, in table order."""
    return [(v, m) for v in cfg.variants for m in cfg.modes]


def knn_scores(cfg: Config, data_dir: Path, encoders_dir: Path, device) -> dict:
    """{variant: {"pretrained"|"random_init": {"val_acc", "test_acc"}, "k"}}."""
    num_classes = load_meta(data_dir)["num_classes"]
    splits = {name: load_split(data_dir, name) for name in ("train", "val", "test")}
    k, bs = cfg.evaluate.knn_k, cfg.evaluate.batch_size
    out: dict[str, dict] = {}
    for variant in tqdm(cfg.variants, desc="kNN"):
        state, meta = load_checkpoint(encoders_dir / variant / "model.pt")
        seed_everything(cfg.seed)  # the same random init the scratch classifier starts from
        encoders = {"random_init": build_from_meta(meta), "pretrained": build_from_meta(meta)}
        encoders["pretrained"].load_state_dict(state)
        out[variant] = {"k": k}
        for name, encoder in encoders.items():
            feats = {s: encode_all(encoder, x, batch_size=bs, device=device)
                     for s, (x, _) in splits.items()}
            bank_labels = splits["train"][1]
            out[variant][name] = {
                f"{s}_acc": knn_accuracy(feats["train"], bank_labels, feats[s], splits[s][1],
                                         k=k, num_classes=num_classes)
                for s in ("val", "test")}
    return out


def run_evaluate(cfg: Config, data_dir: Path, models_dir: Path, encoders_dir: Path,
                 out_json: Path) -> dict:
    """Test accuracy of every classifier and kNN of every encoder; writes out_json."""
    device = resolve_device()
    pairs = classifier_names(cfg)
    # Load every checkpoint first, so a missing one fails before the slow part.
    checkpoints = {pair: load_checkpoint(models_dir / f"{pair[0]}-{pair[1]}.pt") for pair in pairs}
    images, labels = load_split(data_dir, "test")
    results: dict[str, dict] = {}
    for (variant, mode) in tqdm(pairs, desc="evaluate on test"):
        state, meta = checkpoints[(variant, mode)]
        model = build_classifier(meta)
        model.load_state_dict(state)
        scores = evaluate_classifier(model, images, labels, batch_size=cfg.evaluate.batch_size,
                                     device=device)
        results.setdefault(variant, {})[mode] = {
            "test_acc": scores["acc"], "test_loss": scores["loss"], "n_test": scores["n"],
            "best_epoch": meta["best_epoch"]}
    out = {"dataset": cfg.dataset, "split": "test", "results": results,
           "knn": knn_scores(cfg, data_dir, encoders_dir, device)}
    write_json(out_json, out)
    return out
