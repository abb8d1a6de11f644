"""Learning curves of a recipe: how the demo's settings were chosen (README "Demo").

    python benchmarks/curves.py --demo                       # the demo's settings as committed
    python benchmarks/curves.py --demo -S classify.epochs=60 --variants conv_256 --out c.json

Trains each variant's autoencoder and every classifier mode exactly as the stages do (the same
engine, models, augmentation, label subset and best-on-validation selection), without DVC or
MLflow, and prints for every run its curve: pretraining validation loss per epoch, classifier
validation accuracy per epoch, the epoch selected on validation, and the test accuracy of that
checkpoint (reported, never used to choose). A curve still rising at its last epoch means the
recipe is undertrained; a flat tail means more epochs buy nothing. `--out` keeps everything
(histories included) as JSON. Seconds per epoch are those of the device it runs on.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import click
import torch
import yaml

from aelab.config import MODE_SPECS, ConfigError, parse_config
from aelab.data import label_subset, load_meta, load_split, prepare_from_config
from aelab.models import build_classifier, build_from_meta, classifier_meta, model_meta
from aelab.overrides import apply_overrides, demo_overrides
from aelab.pretrain import pretrain_autoencoder
from aelab.classify import encode_features, train_classifier
from aelab.training import evaluate_classifier, resolve_device, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def _curve(values, fmt="{:.2f}") -> str:
    return " ".join(fmt.format(v) for v in values)


def _tail_gain(history: list[dict], key: str, last: int = 5) -> float:
    """Change of `key` over the last `last` epochs (a plateau is near 0)."""
    values = [row[key] for row in history]
    return values[-1] - values[max(0, len(values) - 1 - last)]


def study_variant(cfg, variant: str, data_dir: Path, device: torch.device, modes) -> dict:
    """Pretrain `variant` and train its classifiers for every seed; curves and scores."""
    v = cfg.variant(variant)
    dataset_meta = load_meta(data_dir)
    train_x, train_y = load_split(data_dir, "train")
    val = load_split(data_dir, "val")
    test = load_split(data_dir, "test")
    labelled = torch.from_numpy(label_subset(train_y.numpy(), cfg.label_fraction, cfg.seed))
    train = (train_x[labelled], train_y[labelled])
    out = {"pretrain": {}, "classify": {m: {} for m in modes}}
    for seed in cfg.seeds:
        seed_everything(seed)
        autoencoder = build_from_meta(model_meta(cfg, variant, dataset_meta))
        start = time.perf_counter()
        history, _ = pretrain_autoencoder(autoencoder, train_x, val[0], v.pretrain,
                                          device=device, seed=seed, name=f"{variant}/pretrain")
        out["pretrain"][seed] = {"history": history, "seconds": time.perf_counter() - start}
        encoder_state = {k: t.detach().cpu() for k, t in autoencoder.state_dict().items()}
        features = None
        for mode in modes:
            spec = MODE_SPECS[mode]
            train_cfg = v.probe if spec.frozen else v.classify
            seed_everything(seed)
            model = build_classifier(classifier_meta(cfg, variant, mode, dataset_meta),
                                     train_cfg.label_smoothing)
            if spec.pretrained:
                model.backbone.load_state_dict(encoder_state)
            if spec.frozen and features is None:
                features = encode_features(model, train[0], val[0], device=device)
            start = time.perf_counter()
            history, best_state, best, _ = train_classifier(
                model, train, val, train_cfg, device=device, seed=seed,
                name=f"{variant}/{mode}", features=features if spec.frozen else None)
            seconds = time.perf_counter() - start
            model.load_state_dict(best_state)
            test_acc = evaluate_classifier(model, *test, batch_size=512, device=device)["acc"]
            out["classify"][mode][seed] = {"history": history, "best_epoch": best["epoch"],
                                           "best_val_acc": best["val_acc"], "test_acc": test_acc,
                                           "seconds": seconds}
    return out


def summarise(variant: str, result: dict) -> list[str]:
    lines = []
    for seed, run in result["pretrain"].items():
        h = run["history"]
        lines.append(f"{variant} pretrain seed {seed}: {len(h)} ep, {run['seconds']:.1f} s, "
                     f"{h[-1]['epoch_seconds']:.2f} s/ep; val_loss "
                     f"{_curve([r['val_loss'] for r in h], '{:.4f}')} "
                     f"(last-5 change {_tail_gain(h, 'val_loss'):+.4f})")
    for mode, seeds in result["classify"].items():
        for seed, run in seeds.items():
            h = run["history"]
            lines.append(f"{variant} {mode} seed {seed}: {len(h)} ep, {run['seconds']:.1f} s; "
                         f"val_acc {_curve([r['val_acc'] for r in h])}; best ep "
                         f"{run['best_epoch']} val {run['best_val_acc']:.3f} test "
                         f"{run['test_acc']:.3f} (last-5 change "
                         f"{_tail_gain(h, 'val_acc'):+.3f}, train_acc {h[-1]['train_acc']:.2f})")
        tests = [run["test_acc"] for run in seeds.values()]
        lines.append(f"{variant} {mode}: test {sum(tests) / len(tests):.3f} "
                     f"({', '.join(f'{t:.3f}' for t in tests)})")
    return lines


@click.command()
@click.option("--params", "params_path", default=str(ROOT / "params.yaml"), show_default=True)
@click.option("--demo/--no-demo", default=False, help="Apply the Makefile's DEMO_SET first.")
@click.option("-S", "overrides", multiple=True, help="key=value override (after --demo's).")
@click.option("--variants", default="", help="Comma-separated variants (default: all).")
@click.option("--modes", default="", help="Comma-separated modes (default: classify.modes).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Prepared data to reuse or build (default: a temp dir).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON of all runs.")
@click.option("--fp32", is_flag=True, help="No mixed precision or TF32 on a GPU: the numerics "
              "of the CPU, where the demo runs.")
def main(params_path, demo, overrides, variants, modes, data_dir, out, fp32):
    """Learning curves of the demo's (or any) recipe, trained as the stages train."""
    if fp32:
        import aelab.training

        aelab.training.amp_dtype = lambda device: None  # autocast() and build_state() read it
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    raw = yaml.safe_load(Path(params_path).read_text())
    applied = (demo_overrides(ROOT / "Makefile") if demo else []) + list(overrides)
    try:
        cfg = parse_config(apply_overrides(raw, applied), check_models=False)
    except ConfigError as err:  # one line, as the stages say it
        raise click.ClickException(str(err)) from None
    names = [n for n in variants.split(",") if n] or list(cfg.variants)
    mode_list = [m for m in modes.split(",") if m] or list(cfg.modes)
    device = resolve_device()
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory()
        data_dir = Path(tmp.name) / "data"
    if not (data_dir / "meta.json").is_file():
        prepare_from_config(cfg, data_dir, external_dir=ROOT / "data" / "external",
                            download_dir=ROOT / "data" / "downloads")
    results = {}
    for name in names:  # each variant's summary as soon as it is done
        results[name] = study_variant(cfg, name, data_dir, device, mode_list)
        click.echo("\n".join(summarise(name, results[name])))
    if out is not None:
        out.write_text(json.dumps({"overrides": applied, "device": str(device),
                                   "threads": torch.get_num_threads(), "pid": os.getpid(),
                                   "results": results}, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
