"""The pretrain step: train one autoencoder variant and write its checkpoint and reports.

One training run per seed of `seeds` (one MLflow run each, tagged with its seed), through the
engine's `fit` with the variant's `pretrain` settings (augmentation included). Outputs, all
written only after training succeeded (the per-seed names: aelab.layout):
  <out>/seed<s>.pt            weights + the config that built them, one file per seed
  <out>/init/<init>.json      the two init manifests, scratch and pretrained (see below)
  <reports>/history.csv       loss per seed and epoch;  <reports>/metrics.json  means and cost
  <reports>/reconstructions.pt    images and reconstructions of the first seed's model

Init manifests let DVC tell pretrained classifiers from `scratch`: each classify stage depends on
one of them. The pretrained manifest carries the checkpoints' md5s, so it changes whenever
pretraining does; the scratch manifest only names the architecture, so it is rewritten
byte-identical and `classify@<variant>-scratch` is skipped when only pretraining changed.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import torch

from aelab import distributed, layout, tracking
from aelab.checkpoint import file_md5, save_checkpoint, save_torch, write_json
from aelab.config import INITS, Config, TrainConfig
from aelab.data import data_digest, load_meta, load_split
from aelab.history import write_history
from aelab.models import build_from_meta, count_parameters, model_meta
from aelab.parallel import map_seeds, worker_count
from aelab.stats import mean_std
from aelab.resume import ResumePoint, fit_resumable, remove_all
from aelab.timeline import phase
from aelab.training import (Batches, RunStats, build_state, device_name, peak_memory_mb,
                            reset_peak_memory, resolve_device, seed_everything,
                            to_unit_range)

N_RECONSTRUCTIONS = 10


def pretrain_autoencoder(model: torch.nn.Module, train_images: torch.Tensor,
                         val_images: torch.Tensor, cfg: TrainConfig, *, device: torch.device,
                         seed: int, name: str, hooks=(), resume: ResumePoint | None = None,
                         compile: bool = False) -> tuple[list[dict], RunStats]:
    """Train `model` on unlabelled uint8 images with `cfg`, continuing from `resume`'s saved
    state if it has one (and saving to it); returns (history, cost). `compile`: the training
    step through torch.compile (runtime.compile)."""
    seed_everything(seed)
    reset_peak_memory(device)
    train = Batches(train_images, None, cfg.batch_size, device=device, shuffle=True)
    val = Batches(val_images, None, cfg.batch_size, device=device, shuffle=False)
    state = build_state(model, cfg, batches_per_epoch=len(train), device=device, compile=compile)
    history = fit_resumable(state, train, val, cfg, device=device, hooks=hooks, name=name,
                            resume=resume, augment=cfg.augment)
    return history, RunStats(state.seconds, peak_memory_mb(device))


def write_manifests(out_dir: Path, meta: dict, digests: dict) -> None:
    """init/scratch.json (architecture only) and init/pretrained.json (+ checkpoint md5s)."""
    for init in INITS:
        manifest = {"init": init, "variant": meta["variant"], "arch": meta["arch"],
                    "model": meta["model"]}
        if init == "pretrained":
            manifest["checkpoints"] = digests
        write_json(layout.init_manifest(out_dir, init), manifest)


def run_pretrain(cfg: Config, variant: str, data_dir: Path, out_dir: Path,
                 reports_dir: Path) -> dict:
    """Pretrain `variant` once per seed of `cfg.seeds`; returns the metrics written (means)."""
    v = cfg.variant(variant)
    device = distributed.init(resolve_device())  # under torchrun: join the group
    dataset_meta = load_meta(data_dir)
    meta = model_meta(cfg, variant, dataset_meta)
    model = build_from_meta(meta)  # fails here, before any data is read, on bad options
    with phase("data load"):
        train_images, _ = load_split(data_dir, "train")
        val_images, _ = load_split(data_dir, "val")

    params = {"variant": variant, "arch": v.arch, "model": meta["model"],
              "mask_ratio": meta["mask_ratio"], "seeds": list(cfg.seeds), "dataset": cfg.dataset,
              "train": dataclasses.asdict(v.pretrain), "n_train": len(train_images),
              "device": str(device), "compile": cfg.runtime.compile}
    run_parts = {"meta": meta, "train": dataclasses.asdict(v.pretrain),
                 "mask_ratio": meta["mask_ratio"], "data": data_digest(data_dir)}
    data = {"name": cfg.dataset, "digest": run_parts["data"], "source": str(data_dir.resolve()),
            "context": "train", "profile": json.dumps({"train": len(train_images),
                                                       "val": len(val_images)})}

    def train_seed(seed: int) -> dict:
        """One seed's pretraining (here, or in a seed worker: aelab.parallel)."""
        seed_everything(seed)
        model = build_from_meta(meta)
        point = ResumePoint(f"pretrain-{variant}", "pretrain", seed, run_parts,
                            every=cfg.runtime.checkpoint_every, epochs=v.pretrain.epochs)
        point.load()
        with tracking.stage_run(f"pretrain/{variant}", stage="pretrain", dataset=cfg.dataset,
                                variant=variant, seed=seed, params={**params, "seed": seed},
                                resume=(point.key, point.saved is not None), data=data) as run:
            hooks = [run.epoch_hook]
            if seed == cfg.seeds[0]:  # the UI shows the first seed's reconstructions evolve
                hooks.append(ReconstructionImages(model, val_images[:N_RECONSTRUCTIONS], run,
                                                  epochs=v.pretrain.epochs, device=device))
            history, stats = pretrain_autoencoder(
                model, train_images, val_images, v.pretrain, device=device, seed=seed,
                name=f"pretrain/{variant}/seed{seed}", hooks=hooks, resume=point,
                compile=cfg.runtime.compile)
            row = {"train_loss": history[-1]["train_loss"], "val_loss": history[-1]["val_loss"],
                   "train_seconds": stats.seconds, "peak_mem_mb": stats.peak_mem_mb}
            run.log_metrics({f"final_{k}": val for k, val in row.items()})
        return {"history": history, "row": row, "run": run.key, "resume": point.detach(),
                "weights": {k: t.detach().cpu() for k, t in model.state_dict().items()}}

    workers = worker_count(cfg.runtime.seed_workers, cfg.seeds, device)
    by_seed = map_seeds(train_seed, cfg.seeds, workers=workers)
    if not distributed.is_main():
        return {}  # rank 0 writes the outputs

    # Outputs only now that every seed trained (a failure above leaves none), metrics last.
    digests = {}
    for seed, result in by_seed.items():
        checkpoint = layout.pretrain_checkpoint(out_dir, seed)
        save_checkpoint(checkpoint, result["weights"], {**meta, "seed": seed})
        digests[str(seed)] = {"file": checkpoint.name, "md5": file_md5(checkpoint)}

    per_seed = {str(seed): result["row"] for seed, result in by_seed.items()}
    metrics = {key: mean_std(r[key] for r in per_seed.values())[0]
               for key in ("train_loss", "val_loss", "train_seconds", "peak_mem_mb")}
    metrics.update({
        "epochs": v.pretrain.epochs, "seeds": len(cfg.seeds), "params": count_parameters(model),
        # FLOPs are counted by the evaluate stage (torch's counter imports torch._dynamo,
        # ~1.6 s a process): the report multiplies them by the images seen.
        "images_seen": len(train_images) * v.pretrain.epochs,
        "device": device_name(device, workers),  # where train_seconds were measured
        "per_seed": per_seed})
    write_manifests(out_dir, meta, digests)

    write_history(reports_dir / "history.csv",
                  [{"seed": seed, **row} for seed, result in by_seed.items()
                   for row in result["history"]])
    samples = reports_dir / "reconstructions.pt"
    first = cfg.seeds[0]
    model.load_state_dict(by_seed[first]["weights"])
    save_reconstructions(model.to(device), val_images[:N_RECONSTRUCTIONS], samples,
                         device=device, seed=first,
                         title=f"{variant} ({v.arch}, seed {first}) on {cfg.dataset} validation")
    write_json(reports_dir / "metrics.json", metrics)
    remove_all(result["resume"] for result in by_seed.values())
    tracking.run_for(by_seed[first]["run"]).log_artifacts(
        (reports_dir / "history.csv", reports_dir / "metrics.json"))
    return metrics


class ReconstructionImages:
    """Epoch hook: a few fixed validation images (top row) and their reconstructions (bottom)
    as one PNG, logged to the run as the step image `reconstructions` about ten times a run.

    Runs under `torch.random.fork_rng`, so the MAE's random masks here never change the
    training's random stream (a resumed run stays bit-identical)."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, run, *, epochs: int,
                 device: torch.device, times: int = 10) -> None:
        self.model, self.run, self.device = model, run, device
        self.inputs = to_unit_range(images).to(device)
        self.epochs, self.every = epochs, max(1, epochs // times)

    def __call__(self, state, row: dict) -> None:
        epoch = state.epoch
        if epoch % self.every and epoch != self.epochs:
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            self.model.eval()
            recon, _ = self.model.reconstruct(self.inputs)
        grid = torch.cat([torch.cat(list(self.inputs), dim=2),
                          torch.cat(list(recon.float()), dim=2)], dim=1)  # [3, 2H, N*W]
        pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu()
        from PIL import Image

        png = io.BytesIO()  # the image travels to the agent as bytes: no file to leave behind
        Image.fromarray(pixels.numpy()).save(png, format="PNG")
        self.run.log_image(png.getvalue(), "reconstructions", epoch)


def save_reconstructions(model: torch.nn.Module, images: torch.Tensor, path: Path, *,
                         device: torch.device, seed: int, title: str) -> None:
    """Inputs, reconstructions and (MAE) masks of a few validation images, as tensors: the
    report stage draws them (matplotlib is imported there only)."""
    model.eval()
    seed_everything(seed)  # the same MAE masks every run
    with torch.no_grad():
        x = to_unit_range(images).to(device)
        recon, mask = model.reconstruct(x)
    blob = {"originals": x.cpu(), "reconstructions": recon.float().cpu(),
            "mask": None if mask is None else mask.float().cpu(), "title": title}
    save_torch(blob, path)
