"""The evaluate step: score every kept classifier checkpoint on the test split, once."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from aelab.checkpoint import load_checkpoint, write_json
from aelab.classify import build_classifier
from aelab.config import Config
from aelab.data import load_split
from aelab.training import resolve_device, evaluate_classifier


def classifier_names(cfg: Config) -> list[tuple[str, str]]:
    """Every (variant, mode) pair the pipeline trains, in table order."""
    return [(v, m) for v in cfg.variants for m in cfg.modes]


def run_evaluate(cfg: Config, data_dir: Path, models_dir: Path, out_json: Path) -> dict:
    """Test accuracy and loss of models_dir/<variant>-<mode>.pt for every pair; writes out_json."""
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
        scores = evaluate_classifier(model, images, labels,
                                     batch_size=cfg.variant(variant).classify.batch_size,
                                     device=device)
        results.setdefault(variant, {})[mode] = {
            "test_acc": scores["acc"], "test_loss": scores["loss"], "n_test": scores["n"],
            "best_epoch": meta["best_epoch"]}
    out = {"dataset": cfg.dataset, "split": "test", "results": results}
    write_json(out_json, out)
    return out
