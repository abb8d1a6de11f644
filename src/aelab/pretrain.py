"""The pretrain step: train one autoencoder variant and write its checkpoint and reports.

One training run per seed of `seeds` (one MLflow run each, tagged with its seed). Outputs, all
written only after training succeeded:
  <out>/seed<s>.pt            weights + the config that built them, one file per seed
  <out>/init/<mode>.json      one init manifest per classifier mode (see below)
  <reports>/history.csv       loss per seed and epoch;  <reports>/metrics.json  means and cost
  <reports>/reconstructions.png   (the first seed's model)

Init manifests let DVC tell pretrained modes from `scratch`: every classify stage depends on
`init/<mode>.json`. The pretrained modes' manifests carry the checkpoints' md5s, so they change
whenever pretraining does; the scratch manifest only names the architecture, so it is rewritten
byte-identical and `classify@<variant>-scratch` is skipped when only pretraining changed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aelab import tracking
from aelab.checkpoint import file_md5, save_checkpoint, write_json
from aelab.config import MODE_SPECS, Config, ConfigError
from aelab.cost import flops_per_image
from aelab.data import load_meta, load_split
from aelab.history import write_history
from aelab.models import build_autoencoder
from aelab.plots import reconstruction_grid
from aelab.stats import mean_std
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
    """Build the autoencoder a meta describes (model_meta's or a checkpoint's); options the
    constructor rejects (e.g. dim not divisible by heads) are a ConfigError naming their key."""
    try:
        return build_autoencoder(meta["arch"], meta["model"], mask_ratio=meta["mask_ratio"])
    except ValueError as err:
        raise ConfigError(f"params.yaml: 'variants.{meta['variant']}.model': {err}") from None


def count_parameters(module: torch.nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in module.parameters())


def checkpoint_name(seed: int) -> str:
    """File name of the weights trained with `seed`, inside models/pretrain/<variant>/."""
    return f"seed{seed}.pt"


def run_pretrain(cfg: Config, variant: str, data_dir: Path, out_dir: Path,
                 reports_dir: Path) -> dict:
    """Pretrain `variant` once per seed of `cfg.seeds`; returns the metrics written (means)."""
    v = cfg.variant(variant)
    device = resolve_device()
    dataset_meta = load_meta(data_dir)
    train_images, _ = load_split(data_dir, "train")
    val_images, _ = load_split(data_dir, "val")
    meta = model_meta(cfg, variant, dataset_meta)
    model = build_from_meta(meta)  # fails here, before any training, on bad options
    flops = flops_per_image(model, dataset_meta["image_size"])

    params = {"variant": variant, "arch": v.arch, "model": meta["model"],
              "mask_ratio": cfg.mask_ratio, "seeds": list(cfg.seeds), "dataset": cfg.dataset,
              "train": v.pretrain.__dict__, "n_train": len(train_images), "device": str(device)}
    histories, per_seed, digests, first_model, first_run = [], {}, {}, None, None
    for seed in cfg.seeds:
        seed_everything(seed)
        model = build_from_meta(meta)
        with tracking.stage_run(f"pretrain/{variant}", stage="pretrain", dataset=cfg.dataset,
                                variant=variant, seed=seed, params={**params, "seed": seed}
                                ) as run:
            history, stats = train_autoencoder(model, train_images, val_images, v.pretrain,
                                               device=device, seed=seed,
                                               name=f"pretrain/{variant}/seed{seed}",
                                               on_epoch=run.log_epoch)
            per_seed[seed] = {"train_loss": history[-1]["train_loss"],
                              "val_loss": history[-1]["val_loss"],
                              "train_seconds": stats.seconds, "peak_mem_mb": stats.peak_mem_mb}
            run.log_metrics({f"final_{k}": val for k, val in per_seed[seed].items()})
            first_run = first_run or run.run_id
        checkpoint = out_dir / checkpoint_name(seed)
        state = {k: t.detach().cpu() for k, t in model.state_dict().items()}
        save_checkpoint(checkpoint, state, {**meta, "seed": seed})
        digests[str(seed)] = {"file": checkpoint.name, "md5": file_md5(checkpoint)}
        histories += [{"seed": seed, **row} for row in history]
        first_model = first_model or model

    metrics = {key: mean_std(r[key] for r in per_seed.values())[0]
               for key in ("train_loss", "val_loss", "train_seconds", "peak_mem_mb")}
    metrics.update({
        "epochs": v.pretrain.epochs, "seeds": len(cfg.seeds), "params": count_parameters(model),
        "train_gflops_per_image": flops["train_step"] / 1e9,
        "encode_gflops_per_image": flops["encode"] / 1e9,
        "train_tflops_total": flops["train_step"] * len(train_images) * v.pretrain.epochs / 1e12,
        "per_seed": {str(s): r for s, r in per_seed.items()}})
    for mode, spec in MODE_SPECS.items():
        manifest = {"mode": mode, "variant": variant, "arch": meta["arch"], "model": meta["model"]}
        if spec.pretrained:
            manifest.update(init="pretrained", checkpoints=digests)
        else:
            manifest.update(init="random")
        write_json(out_dir / "init" / f"{mode}.json", manifest)

    write_history(reports_dir / "history.csv", histories)
    write_json(reports_dir / "metrics.json", metrics)
    figure = reports_dir / "reconstructions.png"
    first_model.eval()
    seed_everything(cfg.seeds[0])  # the same MAE masks in the figure every run
    with torch.no_grad():
        x = to_unit_range(val_images[:N_RECONSTRUCTIONS]).to(device)
        recon, mask = first_model.reconstruct(x)
    reconstruction_grid(x, recon.float(), None if mask is None else mask.float(), figure,
                        f"{variant} ({v.arch}, seed {cfg.seeds[0]}) on {cfg.dataset} validation")
    tracking.log_artifacts_to_run(first_run, (figure, reports_dir / "history.csv",
                                              reports_dir / "metrics.json"))
    return metrics
