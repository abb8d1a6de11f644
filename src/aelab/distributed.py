"""Data-parallel training under torchrun: one process per device, DDP, rank 0 writes.

`runtime.devices > 1` in params.yaml makes a training stage start itself again under
`torch.distributed.run` (torchrun) with that many processes (`relaunch`). Each process joins the
group (`init`: NCCL on CUDA, one GPU per process; gloo on CPU), and the engine (aelab.training)
then
  - shares one shuffled order per epoch (drawn by rank 0, broadcast) and gives each rank its
    slice of every global batch, so `batch_size` stays the global batch size;
  - gives each rank its own random draws for crops, flips, masks and dropout
    (`decorrelate_ranks`), since every rank is seeded alike;
  - steps through DDP, which averages the gradients over the ranks;
  - all-reduces the epoch's loss sums, so every rank logs the same whole-epoch numbers.
Validation runs whole on every rank (the same weights give the same numbers). Only rank 0 logs
to MLflow and writes outputs and resume checkpoints; the other ranks train and exit.
Without torchrun every function here is a no-op, and training is exactly the one-process loop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


def active() -> bool:
    """True inside a torchrun process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process logs and writes (rank 0, or the only process)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(devices: int) -> int:
    """Run this very command again under torchrun with `devices` processes; its exit status.
    (CUDA: one process per GPU, at most as many as there are; CPU: gloo processes.)"""
    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        raise ValueError(f"params.yaml: 'runtime.devices' = {devices} but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    env = dict(os.environ)
    if not torch.cuda.is_available():  # CPU processes share the cores (torchrun's default: 1)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    # torchrun's per-rank log folders (left in $TMPDIR as torchelastic_* without --log-dir)
    with tempfile.TemporaryDirectory(prefix="aelab-torchrun-") as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={devices}", f"--log-dir={logs}", sys.argv[0], *sys.argv[1:]]
        return subprocess.call(cmd, env=env)


def init(device: torch.device) -> torch.device:
    """Join the torchrun group if this process was launched by torchrun; the device to use
    (cuda:LOCAL_RANK on GPUs)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over the ranks (a copy; `t` itself without DDP)."""
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's `t` on every rank (in place)."""
    if active():
        dist.broadcast(t, src=0)
    return t


def decorrelate_ranks() -> None:
    """Give each rank its own random streams for what it draws per image (crops, flips, masks,
    dropout): every rank seeds alike (and a resume restores rank 0's state on all of them), so
    rank r's k-th image would otherwise get the same draws as every other rank's k-th. One
    draw from the common CPU generator, then ranks > 0 reseed torch (CPU and CUDA) from it
    plus their rank: deterministic for a seed, rank 0's stream left as it was. The epoch order
    is not affected: it is rank 0's, broadcast."""
    if not active():
        return
    base = int(torch.randint(0, 2**62, (1,)).item())  # CPU: no device sync
    if rank() > 0:
        torch.manual_seed(base + rank())


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's share of one global batch's indices (every rank gets at least one)."""
    if not active():
        return idx
    n = world_size()
    if len(idx) < n:
        idx = idx.repeat(n)[:n]
    return idx[rank()::n]


class _TrainingLoss(nn.Module):
    """DDP synchronises gradients of calls to `forward`: route the model's loss through it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.training_loss(x, y)


def data_parallel(model: nn.Module) -> Callable:
    """What a training step calls for (loss, sums): DDP over `model` under torchrun, else
    `model.training_loss`."""
    if not active():
        return model.training_loss
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return DistributedDataParallel(_TrainingLoss(model), device_ids=device_ids)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def finish() -> None:
    """Leave the process group (end of a stage)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
