"""The training loops: one for autoencoder pretraining, one for classifiers.

Data stays in memory as uint8 tensors (on the device when it is a GPU) and is converted to
float per batch; losses are accumulated on the device and read back once per epoch, so the
hot loop has no host syncs. AMP (bf16) is used on CUDA only: on CPUs without bf16 units it is
slower than fp32 (see shared/reference.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from aelab.config import TrainConfig

EpochCallback = Callable[[dict], None]


class TrainingError(RuntimeError):
    """Training went wrong in a way the user must act on (e.g. NaN loss); one line."""


def resolve_device(name: str | None = None) -> torch.device:
    """`AELAB_DEVICE` (auto|cpu|cuda|cuda:N) or CUDA when present, else CPU."""
    name = name or os.environ.get("AELAB_DEVICE", "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"AELAB_DEVICE={name} but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] in 0..255 -> float [N,3,H,W] in [-1, 1] (the seeds' Normalize(0.5, 0.5))."""
    return images.float().div_(127.5).sub_(1.0)


class Batches:
    """Mini-batches sliced from in-memory tensors; reshuffled every epoch, seeded.

    uint8 images come out as floats in [-1, 1]; float tensors (cached features) as they are.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int, *,
                 device: torch.device, shuffle: bool, seed: int = 0):
        self.images = images.to(device)  # uint8 [N,3,H,W]
        self.labels = labels.to(device) if labels is not None else None
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        n = len(self.images)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        if order is not None:
            order = order.to(self.images.device)
        for start in range(0, n, self.batch_size):
            if order is None:
                x = self.images[start:start + self.batch_size]
                y = None if self.labels is None else self.labels[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                x = self.images.index_select(0, idx)
                y = None if self.labels is None else self.labels.index_select(0, idx)
            yield (to_unit_range(x) if x.dtype == torch.uint8 else x), y


@torch.no_grad()
def encode_images(encoder: nn.Module, images: torch.Tensor, *, batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """Features [N, D] (float32, on `device`) of uint8 images [N, 3, H, W], encoder in eval mode."""
    encoder.to(device).eval()
    feats = []
    for x, _ in Batches(images, None, batch_size, device=device, shuffle=False):
        with autocast(device):
            feats.append(encoder.encode(x).float())
    return torch.cat(feats)


def build_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD from a TrainConfig (fused kernels on CUDA)."""
    params = [p for p in params if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas,
                                weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas,
                                 weight_decay=cfg.weight_decay, **fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str,
              min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step`: linear warmup, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A LambdaLR stepped once per optimizer step (so it really moves, unlike the seed's)."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    min_ratio = cfg.min_lr / cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps=total, warmup_steps=warmup,
                               schedule=cfg.schedule, min_ratio=min_ratio),
    )


@dataclass
class RunStats:
    """Cost of a training run: wall-clock seconds and peak memory."""

    seconds: float
    peak_mem_mb: float


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _check_finite(value: float, what: str, epoch: int) -> None:
    if not math.isfinite(value):
        raise TrainingError(
            f"{what}: loss became {value} in epoch {epoch}; lower the learning rate or "
            "enable grad_clip in params.yaml"
        )


def _train_epoch(model: nn.Module, batches: Batches, loss_fn, optimizer, scheduler, *,
                 device: torch.device, grad_clip: float, desc: str):
    """One pass over `batches`; returns device tensors (loss sum, correct count, count)."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in tqdm(batches, desc=desc, leave=False, mininterval=1.0):
        with autocast(device):
            loss, logits = loss_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(x)
        if logits is not None:
            correct += (logits.argmax(1) == y).sum()
        seen += len(x)
    return loss_sum, correct, seen


@torch.no_grad()
def _eval_pass(model: nn.Module, batches: Batches, loss_fn, device: torch.device):
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in batches:
        with autocast(device):
            loss, logits = loss_fn(model, x, y)
        loss_sum += loss.float() * len(x)
        if logits is not None:
            correct += (logits.argmax(1) == y).sum()
        seen += len(x)
    return loss_sum, correct, seen


def _reconstruction_loss(model, x, _y):
    loss, _ = model(x)
    return loss, None


def _classification_loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.float(), y), logits


def train_autoencoder(model: nn.Module, train_images: torch.Tensor, val_images: torch.Tensor,
                      cfg: TrainConfig, *, device: torch.device, seed: int, name: str,
                      on_epoch: EpochCallback | None = None) -> tuple[list[dict], RunStats]:
    """Pretrain `model` (forward(x) -> (loss, recon)); returns per-epoch history and cost."""
    seed_everything(seed)
    model.to(device)
    train = Batches(train_images, None, cfg.batch_size, device=device, shuffle=True, seed=seed)
    val = Batches(val_images, None, cfg.batch_size, device=device, shuffle=False)
    optimizer = build_optimizer(model.parameters(), cfg, device)
    scheduler = build_scheduler(optimizer, cfg, len(train))
    history, start = [], time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        loss_sum, _, n = _train_epoch(model, train, _reconstruction_loss, optimizer, scheduler,
                                      device=device, grad_clip=cfg.grad_clip,
                                      desc=f"{name} epoch {epoch}/{cfg.epochs}")
        val_sum, _, n_val = _eval_pass(model, val, _reconstruction_loss, device)
        row = {"epoch": epoch, "train_loss": loss_sum.item() / n,
               "val_loss": val_sum.item() / n_val, "lr": lr,
               "epoch_seconds": time.perf_counter() - t0}
        _check_finite(row["train_loss"], name, epoch)
        history.append(row)
        tqdm.write(f"{name} epoch {epoch}/{cfg.epochs}: train_loss {row['train_loss']:.4f} "
                   f"val_loss {row['val_loss']:.4f}")
        if on_epoch:
            on_epoch(row)
    return history, RunStats(time.perf_counter() - start, peak_memory_mb(device))


def train_classifier(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                     val: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig, *,
                     device: torch.device, seed: int, name: str,
                     on_epoch: EpochCallback | None = None):
    """Train a classifier; keep the weights of the epoch with the best validation accuracy.

    Returns (history, best_state_dict, best_row, RunStats). The test split is not an argument:
    selection uses validation only.

    A frozen-encoder probe (`model.freeze`) gives the same features every epoch (encoder in eval
    mode, no augmentation), so they are computed once per split and only the probe's feature
    norm and head run per step; the state returned is still the whole classifier's.
    """
    seed_everything(seed)
    model.to(device)
    start = time.perf_counter()
    net = model
    if getattr(model, "freeze", False):
        train = (encode_images(model.backbone, train[0], batch_size=cfg.batch_size,
                               device=device), train[1])
        val = (encode_images(model.backbone, val[0], batch_size=cfg.batch_size, device=device),
               val[1])
        net = model.probe()
    train_b = Batches(*train, cfg.batch_size, device=device, shuffle=True, seed=seed)
    val_b = Batches(*val, cfg.batch_size, device=device, shuffle=False)
    params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else \
        model.parameters()
    optimizer = build_optimizer(params, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, len(train_b))
    history, best_row, best_state = [], None, None
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        loss_sum, correct, n = _train_epoch(net, train_b, _classification_loss, optimizer,
                                            scheduler, device=device, grad_clip=cfg.grad_clip,
                                            desc=f"{name} epoch {epoch}/{cfg.epochs}")
        v_loss, v_correct, n_val = _eval_pass(net, val_b, _classification_loss, device)
        row = {"epoch": epoch, "train_loss": loss_sum.item() / n, "train_acc": correct.item() / n,
               "val_loss": v_loss.item() / n_val, "val_acc": v_correct.item() / n_val,
               "lr": lr, "epoch_seconds": time.perf_counter() - t0}
        _check_finite(row["train_loss"], name, epoch)
        history.append(row)
        if best_row is None or row["val_acc"] > best_row["val_acc"]:
            best_row = row
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in
                          model.state_dict().items()}
        tqdm.write(f"{name} epoch {epoch}/{cfg.epochs}: train_acc {row['train_acc']:.4f} "
                   f"val_acc {row['val_acc']:.4f}")
        if on_epoch:
            on_epoch(row)
    return history, best_state, best_row, RunStats(time.perf_counter() - start,
                                                   peak_memory_mb(device))


def evaluate_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                        batch_size: int, device: torch.device) -> dict:
    """Accuracy and mean cross-entropy of `model` on (images, labels)."""
    model.to(device)
    batches = Batches(images, labels, batch_size, device=device, shuffle=False)
    loss_sum, correct, n = _eval_pass(model, batches, _classification_loss, device)
    return {"acc": correct.item() / n, "loss": loss_sum.item() / n, "n": n}
