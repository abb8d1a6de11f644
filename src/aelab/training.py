"""The training engine: one loop, `fit()`, over an explicit `TrainState`.

Autoencoder pretraining, every classifier mode and the benchmarks all run through `fit`. The
model defines what a step computes (`model.training_loss(x, y) -> (loss, sums)`, see
aelab.models.base); the loop only augments, steps the optimiser on the schedule, accumulates,
validates, checks the loss is finite and calls the epoch hooks (logging, selection, checkpoints).

Data stays in memory as uint8 tensors (on the device when it is a GPU) and is converted to float
per batch; losses are accumulated on the device and read back once per epoch, so the hot loop
has no host syncs. AMP is used on CUDA only (bf16, or fp16 with a grad scaler on GPUs without
bf16): on CPUs without bf16 units it is slower than fp32 (see shared/reference.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from aelab.augment import augment as augment_batch
from aelab.augment import to_unit_range
from aelab import distributed
from aelab.timeline import TIMELINE, phase
from aelab.config import AugmentConfig, TrainConfig
from aelab.optim import LRSchedule, Optimizer


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


def device_name(device: torch.device, seed_workers: int = 1) -> str:
    """What a person calls `device`: the GPU's name, or the CPU's model and its thread count
    (shared by `seed_workers` processes, aelab.parallel)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        if match := re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(),
                              re.M):
            cpu = match.group(1).strip()
    if seed_workers > 1:
        each = worker_threads(seed_workers)
        return f"{cpu}, {seed_workers} seed workers of {each} thread{'s' * (each > 1)}"
    return f"{cpu}, {torch.get_num_threads()} threads"


def worker_threads(workers: int) -> int:
    """Threads for each of `workers` processes sharing this process's threads (aelab.parallel)."""
    return max(1, torch.get_num_threads() // workers)


_ALLOCATOR_TUNED = False


def keep_freed_memory(device: torch.device | None = None) -> bool:
    """On Linux with glibc, let freed memory of any size go back to the heap for reuse instead of
    to the operating system (mallopt: mmap and trim thresholds of 1 GiB). By default glibc
    serves every block over 32 MiB (a ViT's activations and their gradients) with a fresh
    mmap and unmaps it when freed, so each training step page-faults and zero-fills those pages
    again: for seed 000's MAE on the CPU, about 120,000 page faults and 5-10 % of a step; the
    committed mconv encodes images 1.5-2x slower at batches of 256-512 without it. Forked seed
    workers inherit the setting. With `device`, only when that is the CPU (the host's
    allocator holds no activations otherwise). Once per process; returns whether it applied."""
    global _ALLOCATOR_TUNED
    if device is not None and device.type != "cpu":
        return False
    if _ALLOCATOR_TUNED:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, 1 << 30)
                                and libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False
    return _ALLOCATOR_TUNED


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA GPUs with bf16 tensor cores (compute capability 8.0 on, and ROCm), fp16
    on older ones (a T4, a V100), none (fp32) elsewhere. Not `torch.cuda.is_bf16_supported()`:
    by default it also says yes where bf16 is only emulated, as on a T4, whose fp16 tensor cores
    would then sit idle."""
    if device.type != "cuda":
        return None
    if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float16


def grad_scaler(device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 training needs (amp_dtype fp16: GPUs before the A100); None else."""
    return torch.amp.GradScaler("cuda") if amp_dtype(device) == torch.float16 else None


def autocast(device: torch.device):
    """Mixed precision on CUDA (amp_dtype); a no-op elsewhere."""
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """A batch as the models take it: uint8 images to [-1, 1]; float features as they are."""
    return to_unit_range(x) if x.dtype == torch.uint8 else x


class Batches:
    """Mini-batches sliced from in-memory tensors; reshuffled every epoch.

    The order comes from torch's global CPU generator, which `seed_everything` seeds and
    `TrainState.state_dict` saves, so a resumed run draws the same batches. Under DDP
    (aelab.distributed) a shuffled epoch uses rank 0's order and each rank gets its slice of
    every batch. Iterating gives
    uint8 images as floats in [-1, 1] and float tensors (cached features) as they are; `raw()`
    gives them as stored (the engine augments uint8 batches before converting them).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int, *,
                 device: torch.device, shuffle: bool):
        self.images = images.to(device)  # uint8 [N,3,H,W] or float features [N, D]
        self.labels = labels.to(device) if labels is not None else None
        self.batch_size = batch_size
        self.shuffle = shuffle

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for x, y in self.raw():
            yield as_float(x), y

    def raw(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Batches as stored: uint8 images or float features."""
        n = len(self.images)
        order = None
        if self.shuffle:  # under DDP: rank 0's order, each rank its slice of every batch
            order = distributed.broadcast(torch.randperm(n).to(self.images.device))
        for start in range(0, n, self.batch_size):
            if order is None:
                x = self.images[start:start + self.batch_size]
                y = None if self.labels is None else self.labels[start:start + self.batch_size]
            else:
                idx = distributed.shard(order[start:start + self.batch_size])
                x = self.images.index_select(0, idx)
                y = None if self.labels is None else self.labels.index_select(0, idx)
            yield x, y


@torch.no_grad()
def encode_images(encoder: nn.Module, images: torch.Tensor, *, batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """Features [N, D] (float32, on `device`) of uint8 images [N, 3, H, W], encoder in eval mode."""
    keep_freed_memory(device)
    encoder.to(device).eval()
    feats = []
    for x, _ in Batches(images, None, batch_size, device=device, shuffle=False):
        with autocast(device):
            feats.append(encoder.encode(x).float())
    return torch.cat(feats)


# --- the train state ----------------------------------------------------------------------

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():  # a CPU run on a GPU machine drew nothing there
        state["cuda"] = torch.cuda.get_rng_state_all()  # one per visible GPU
    return state


def _set_rng_state(state: Mapping) -> None:
    """Restore `_rng_state()`'s generators; CUDA's for the GPUs this process sees (a run saved
    on a machine with more GPUs resumes on fewer, e.g. under CUDA_VISIBLE_DEVICES)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        for index, generator_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(generator_state, index)


@dataclass
class TrainState:
    """Everything a run needs to continue exactly: model, optimiser, schedule, grad scaler,
    epoch and step done, and (in `state_dict`) the RNG states of torch's generators."""

    model: nn.Module
    optimizer: Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler | None = None
    epoch: int = 0  # epochs finished
    step: int = 0  # optimiser steps taken
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # wall-clock spent in `fit` (training and validation), resumes included
    accumulate: int = 1  # batches per optimiser step (gradient accumulation); a setting
    compile: bool = False  # fit runs the loss through torch.compile; a setting

    def state_dict(self) -> dict:
        """A weights_only-loadable snapshot (tensors on their devices; save copies them)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch, "step": self.step, "history": list(self.history),
                "seconds": self.seconds, "rng": _rng_state()}

    def load_state_dict(self, state: Mapping) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.seconds = float(state.get("seconds", 0.0))
        _set_rng_state(state["rng"])


def build_state(model: nn.Module, cfg: TrainConfig, *, batches_per_epoch: int,
                device: torch.device, params: Iterable[nn.Parameter] | None = None,
                compile: bool = False) -> TrainState:
    """A fresh TrainState for `model` (moved to `device`) under `cfg`; `params` defaults to
    every parameter that requires grad. The schedule counts optimiser steps: with
    `cfg.accumulate` = k, an epoch of `batches_per_epoch` batches is ceil(batches / k) steps.
    `compile`: fit runs the model's loss through torch.compile (runtime.compile). On a CPU,
    tunes the allocator (keep_freed_memory)."""
    keep_freed_memory(device)
    model.to(device)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    optimizer = Optimizer(params, kind=cfg.optimizer, lr=cfg.lr, betas=cfg.betas,
                          weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.accumulate)
    schedule = LRSchedule(cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                          warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                          kind=cfg.schedule, min_lr=cfg.min_lr)
    return TrainState(model, optimizer, schedule, grad_scaler(device), accumulate=cfg.accumulate,
                      compile=compile)


# --- the loop -----------------------------------------------------------------------------

EpochHook = Callable[[TrainState, dict], None]

# A per-batch progress bar per epoch; off in seed workers (aelab.parallel), which share a terminal.
PROGRESS_BARS = True


@dataclass
class RunStats:
    """Cost of a training run: wall-clock seconds and peak memory."""

    seconds: float
    peak_mem_mb: float


def reset_peak_memory(device: torch.device) -> None:
    """Start a run's peak-memory count on a GPU, where the peak is per process and one process
    trains every seed and mode of a stage. (A CPU's peak RSS cannot be reset: there each seed
    runs in a worker process of its own, whose later modes report the largest peak so far.)"""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _means(loss_sum: torch.Tensor, sums: dict[str, torch.Tensor], n, prefix: str, *,
           reduce: bool = True) -> dict:
    """Device sums -> means as floats, in one host sync; `n` (samples) may be a tensor. Under
    DDP (`reduce`) the sums are all-reduced first, so every rank reports the whole epoch;
    `<prefix>n` is the number of samples."""
    totals = torch.stack([torch.as_tensor(n, device=loss_sum.device).float(), loss_sum.float(),
                          *(torch.as_tensor(v).float() for v in sums.values())])
    values = (distributed.all_reduce_sum(totals) if reduce else totals).tolist()
    n = values[0]
    out = {f"{prefix}loss": values[1] / n}
    out.update({f"{prefix}{k}": v / n for k, v in zip(sums, values[2:])})
    out[f"{prefix}n"] = n
    return out


def _divergence(step_losses: torch.Tensor, epoch: int, first_step: int, accumulate: int,
                name: str) -> TrainingError:
    """The error for an epoch whose mean loss is not finite, naming the epoch and the optimiser
    step of this rank's first non-finite loss (found only now, on the failure path)."""
    where = (~torch.isfinite(step_losses)).nonzero()
    batch = int(where[0]) + 1 if len(where) else 1  # DDP: another rank's batch diverged
    value = step_losses[batch - 1].item() if len(where) else float("nan")
    step = first_step + (batch - 1) // accumulate + 1
    return TrainingError(f"{name}: loss became {value} in epoch {epoch} at step "
                         f"{step} (batch {batch} of {len(step_losses)}); "
                         "lower the learning rate or enable grad_clip in params.yaml")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, device: torch.device, prefix: str = "") -> dict:
    """Mean loss and metrics of `model.training_loss` over `batches`, in eval mode."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    for x, y in batches:
        with autocast(device):
            loss, batch_sums = model.training_loss(x, y)
        loss_sum += loss.float() * len(x)
        for k, v in batch_sums.items():
            sums[k] = sums.get(k, 0) + v
        seen += len(x)
    means = _means(loss_sum, sums, seen, prefix, reduce=False)  # every rank sees all of it
    means.pop(f"{prefix}n")
    return means


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor | None, *,
               device: torch.device, grad_clip: float = 0.0, loss_fn: Callable | None = None):
    """One optimiser step on batch (x, y) at the schedule's lr; returns (loss, sums) on device.
    `loss_fn` defaults to `state.model.training_loss` (fit passes DDP's wrapper under torchrun)."""
    state.optimizer.zero_grad(set_to_none=True)
    loss, sums = _backward(state, x, y, 1.0, device=device,
                           loss_fn=loss_fn or state.model.training_loss)
    _optimizer_step(state, grad_clip)
    return loss, sums


def _backward(state: TrainState, x: torch.Tensor, y: torch.Tensor | None, weight: float, *,
              device: torch.device, loss_fn: Callable):
    """Forward and backward of one batch, adding `weight` x its gradient to the parameters'
    (`weight`: the batch's share of the optimiser step's images); returns (loss, sums)."""
    with autocast(device):
        loss, sums = loss_fn(x, y)
    scaled = loss * weight if weight != 1.0 else loss
    (state.scaler.scale(scaled) if state.scaler is not None else scaled).backward()
    return loss.detach(), sums


def _optimizer_step(state: TrainState, grad_clip: float) -> None:
    """Step on the accumulated gradients at the schedule's lr (grad scaler and clipping
    included)."""
    optimizer, scaler = state.optimizer, state.scaler
    optimizer.lr = state.schedule(state.step)
    if scaler is not None:
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(optimizer.params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(optimizer.params, grad_clip)
        optimizer.step()
    state.step += 1


def _groups(batches: Iterator, k: int) -> Iterator[list]:
    """Consecutive runs of `k` batches (the last one of an epoch may be shorter)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def fit(state: TrainState, train: Batches, val: Batches | None, *, epochs: int,
        device: torch.device, augment: AugmentConfig | None = None, grad_clip: float = 0.0,
        hooks: Iterable[EpochHook] = (), name: str = "train") -> list[dict]:
    """Train from `state.epoch` to `epochs`; one history row per epoch (also kept in
    `state.history`), passed to every hook after validation. With `state.accumulate` = k the
    optimiser steps once per k batches, on the gradient of their images' mean loss (an epoch's
    last step may have fewer batches). Raises TrainingError on a non-finite loss."""
    hooks = list(hooks)
    distributed.decorrelate_ranks()  # under torchrun: each rank its own augmentation draws
    ddp = distributed.data_parallel(state.model)  # model.training_loss, or DDP's
    # runtime.compile: the first steps pay the compilation (minutes for a ViT on a CPU), a
    # batch of another shape (an epoch's last) one recompilation.
    loss_fn = torch.compile(ddp) if state.compile else ddp
    for epoch in range(state.epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        lr = state.schedule(state.step)
        first_step = state.step
        state.model.train()
        step_losses = torch.zeros(len(train), device=device)  # where a NaN began, no host sync
        sums: dict[str, torch.Tensor] = {}
        seen = torch.zeros((), device=device)
        batches = tqdm(train.raw(), desc=f"{name} epoch {epoch}/{epochs}", leave=False,
                       mininterval=1.0, total=len(train), disable=not PROGRESS_BARS)
        i = 0
        for group in _groups(batches, state.accumulate):
            TIMELINE.setdefault("first_batch", time.time())
            n_group = sum(len(x) for x, _ in group)
            state.optimizer.zero_grad(set_to_none=True)
            for j, (x, y) in enumerate(group):
                if augment is not None and augment.active:
                    x = augment_batch(x, augment)  # on the uint8 batch where it can (crop, flip)
                x = as_float(x)
                # Under DDP, gradients are all-reduced once per optimiser step, on its last batch.
                sync = j == len(group) - 1 or not hasattr(ddp, "no_sync")
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    loss, batch_sums = _backward(state, x, y, len(x) / n_group, device=device,
                                                 loss_fn=loss_fn)
                step_losses[i] = loss.float() * len(x)
                i += 1
                for k, v in batch_sums.items():
                    sums[k] = sums.get(k, 0) + v
                seen += len(x)
            _optimizer_step(state, grad_clip)
        # One host sync for the epoch (an all-reduce first under DDP: every rank's batches);
        # a non-finite step makes the mean non-finite on every rank.
        row = {"epoch": epoch, **_means(step_losses.sum(), sums, seen, "train_")}
        TIMELINE["last_batch"] = time.time()  # after the sync: on a GPU, when it finished
        if not math.isfinite(row["train_loss"]):
            raise _divergence(step_losses, epoch, first_step, state.accumulate, name)
        seconds = time.perf_counter() - t0
        row.update({"lr": lr, "epoch_seconds": seconds, "img_s": row.pop("train_n") / seconds})
        if val is not None:
            with phase("validation"):
                row.update(evaluate(state.model, val, device, prefix="val_"))
        state.epoch = epoch
        state.seconds += time.perf_counter() - t0
        state.history.append(row)
        tqdm.write(f"{name} epoch {epoch}/{epochs}: " + " ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("train_", "val_"))))
        for hook in hooks:
            hook(state, row)
    return state.history


class KeepBest:
    """Epoch hook: keep a CPU copy of `module`'s weights at the best `metric` so far
    (validation accuracy for classifiers: selection never sees the test split)."""

    def __init__(self, module: nn.Module, metric: str = "val_acc") -> None:
        self.module = module
        self.metric = metric
        self.row: dict | None = None
        self.state_dict: dict[str, torch.Tensor] | None = None

    def __call__(self, state: TrainState, row: dict) -> None:
        if self.row is None or row[self.metric] > self.row[self.metric]:
            self.row = row
            self.state_dict = {k: v.detach().to("cpu", copy=True)
                               for k, v in self.module.state_dict().items()}

    def get_state(self) -> dict:
        """For resume checkpoints (aelab.resume)."""
        return {"row": self.row, "state_dict": self.state_dict}

    def set_state(self, saved: Mapping) -> None:
        self.row, self.state_dict = saved["row"], saved["state_dict"]


def evaluate_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                        batch_size: int, device: torch.device) -> dict:
    """Accuracy and mean cross-entropy of `model` on (images, labels)."""
    keep_freed_memory(device)
    model.to(device)
    scores = evaluate(model, Batches(images, labels, batch_size, device=device, shuffle=False),
                      device)
    return {"acc": scores["acc"], "loss": scores["loss"], "n": len(labels)}
