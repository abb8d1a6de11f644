"""The pretrain step: train one autoencoder variant and write its checkpoint and reports.

Outputs (all written only after training succeeded):
  <out>/model.pt              weights + the config that built them
  <out>/init/<mode>.json      one init manifest per classifier mode (see below)
  <reports>/history.csv       loss per epoch;  <reports>/metrics.json  final loss and cost
  <reports>/reconstructions.png

Init manifests let DVC tell pretrained modes from `scratch`: every classify stage depends on
`init/<mode>.json`. The pretrained modes' manifests carry the checkpoint's md5, so they change
whenever pretraining does; the scratch manifest only names the architecture, so it is rewritten
byte-identical and `classify@<variant>-scratch` is skipped when only pretraining changed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aelab import tracking
from aelab.checkpoint import file_md5, save_checkpoint, write_json
from aelab.config import MODE_SPECS, Config
from aelab.cost import flops_per_image
from aelab.data import load_meta, load_split
from aelab.history import write_history
from aelab.models import build_autoencoder
from aelab.plots import reconstruction_grid
from aelab.training import resolve_device, seed_everything, to_unit_range, train_autoencoder

N_RECONSTRUCTIONS = 10


def model_meta(cfg: Config, variant: str, dataset_meta: dict) -> dict:
    """What is needed to rebuild the autoencoder (stored in every checkpoint)."""
    v = cfg.variant(variant)
    return {"variant": variant, "arch": v.arch,
            "model": {k: list(x) if isinstance(x, tuple) else x for k, x in v.model.items()},
            "mask_ratio": cfg.mask_ratio, "dataset": cfg.dataset,
            "image_size": dataset_meta["image_size"], "num_classes": dataset_meta["num_classes"]}


def build_from_meta(meta: dict) -> torch.nn.Module:
    """Rebuild an autoencoder from a checkpoint's meta."""
    return build_autoencoder(meta["arch"], meta["model"], mask_ratio=meta["mask_ratio"])


def count_parameters(module: torch.nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in module.parameters())


def run_pretrain(cfg: Config, variant: str, data_dir: Path, out_dir: Path,
                 reports_dir: Path) -> dict:
    """Pretrain `variant` on the prepared data; returns the metrics written."""
    v = cfg.variant(variant)
    device = resolve_device()
    dataset_meta = load_meta(data_dir)
    train_images, _ = load_split(data_dir, "train")
    val_images, _ = load_split(data_dir, "val")
    meta = model_meta(cfg, variant, dataset_meta)
    seed_everything(cfg.seed)
    model = build_from_meta(meta)  # fails here, before any training, on bad options
    flops = flops_per_image(model, dataset_meta["image_size"])

    params = {"variant": variant, "arch": v.arch, "model": meta["model"],
              "mask_ratio": cfg.mask_ratio, "seed": cfg.seed, "dataset": cfg.dataset,
              "train": v.pretrain.__dict__, "n_train": len(train_images), "device": str(device)}
    with tracking.stage_run(f"pretrain/{variant}", stage="pretrain", dataset=cfg.dataset,
                            variant=variant, params=params) as run:
        history, stats = train_autoencoder(model, train_images, val_images, v.pretrain,
                                           device=device, seed=cfg.seed,
                                           name=f"pretrain/{variant}", on_epoch=run.log_epoch)
        metrics = {"train_loss": history[-1]["train_loss"], "val_loss": history[-1]["val_loss"],
                   "epochs": len(history), "params": count_parameters(model),
                   "train_gflops_per_image": flops["train_step"] / 1e9,
                   "encode_gflops_per_image": flops["encode"] / 1e9,
                   "train_tflops_total": flops["train_step"] * len(train_images) * len(history)
                   / 1e12,
                   "train_seconds": stats.seconds, "peak_mem_mb": stats.peak_mem_mb}

        checkpoint = out_dir / "model.pt"
        state = {k: t.detach().cpu() for k, t in model.state_dict().items()}
        save_checkpoint(checkpoint, state, meta)
        digest = file_md5(checkpoint)
        for mode, spec in MODE_SPECS.items():
            manifest = {"mode": mode, "variant": variant, "arch": meta["arch"],
                        "model": meta["model"]}
            if spec.pretrained:
                manifest.update(init="pretrained", checkpoint="model.pt", md5=digest)
            else:
                manifest.update(init="random")
            write_json(out_dir / "init" / f"{mode}.json", manifest)

        write_history(reports_dir / "history.csv", history)
        write_json(reports_dir / "metrics.json", metrics)
        figure = reports_dir / "reconstructions.png"
        model.eval()
        seed_everything(cfg.seed)  # the same MAE masks in the figure every run
        with torch.no_grad():
            x = to_unit_range(val_images[:N_RECONSTRUCTIONS]).to(device)
            recon, mask = model.reconstruct(x)
        reconstruction_grid(x, recon.float(), None if mask is None else mask.float(), figure,
                            f"{variant} ({v.arch}) on {cfg.dataset} validation images")
        run.log_metrics({f"final_{k}": val for k, val in metrics.items()})
        for path in (figure, reports_dir / "history.csv", reports_dir / "metrics.json"):
            run.log_artifact(path)
    return metrics
