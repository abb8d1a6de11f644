"""Training throughput (images/s) of every committed variant, pretraining and fine-tuning.

    python benchmarks/throughput.py [--batch N] [--steps 10]

Uses the model options of params.yaml (or --params), random data on the current device
(AELAB_DEVICE or CUDA when present), a few warm-up steps, then timed steps; on CUDA it
synchronises only around the timed block. The batch: `--batch` for every step, else on a GPU
each variant's own batch sizes from params.yaml (pretraining and classifier; a GPU step at a
small batch is bound by kernel launches, not by the GPU), and 64 on a CPU (where the
committed 512 would take minutes a step). Absolute images/s move from run to run on a shared
machine: the claims with targets are the side-by-side ratios of `make bench`
(benchmarks/bench.py). Speed is checked here, never in unit tests.
"""

from __future__ import annotations

import time

import click
import torch

from aelab.config import TrainConfig, load_config
from aelab.models import Classifier, build_autoencoder
from aelab.training import build_state, resolve_device, train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step, batch: int, device: torch.device, warmup: int, steps: int) -> float:
    """Run `step()` warmup + steps times; images per second over the timed steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


CPU_BATCH = 64


def step_batches(variant, batch: int | None, device: torch.device) -> tuple[int, int]:
    """(pretraining, fine-tuning) batch of a variant's timed steps: `batch` for both when
    given, else the variant's own from params.yaml on a GPU and CPU_BATCH on a CPU."""
    if batch is None:
        if device.type != "cuda":
            return CPU_BATCH, CPU_BATCH
        return variant.pretrain.batch_size, variant.classify.batch_size
    return batch, batch


def measure(arch: str, options: dict, mask_ratio: float, batches: tuple[int, int],
            device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Pretraining and fine-tuning images/s of one variant, at batches (pretrain, finetune)."""
    torch.manual_seed(0)
    # The engine's own step (aelab.training.train_step) on a TrainState, as in the stages.
    model = build_autoencoder(arch, options, mask_ratio=mask_ratio)
    clf = Classifier(model, 10, head="linear")
    result = {}
    for kind, net, batch in (("pretrain", model, batches[0]), ("finetune", clf, batches[1])):
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch,), device=device) if kind == "finetune" else None
        cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-4, optimizer="adamw")
        state = build_state(net, cfg, batches_per_epoch=warmup + steps, device=device)
        result[kind] = images_per_second(lambda: train_step(state, x, y, device=device), batch,
                                         device, warmup, steps)
    return result


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Batch of every step [default: params.yaml's on a GPU, 64 on a CPU].")
@click.option("--warmup", default=3, show_default=True)
@click.option("--steps", default=10, show_default=True)
def main(params_path, batch, warmup, steps):
    """Measure every variant; print pretraining and fine-tuning images/s."""
    cfg = load_config(params_path)
    device = resolve_device()
    click.echo(f"device {device}, {torch.get_num_threads()} threads, "
               f"batch {batch or ('as in params.yaml' if device.type == 'cuda' else CPU_BATCH)}, "
               f"{steps} timed steps (images/s)")
    click.echo(f"{'variant':<10} {'pretrain':>10} {'(batch)':>8} {'finetune':>10} {'(batch)':>8}")
    for name, v in cfg.variants.items():
        batches = step_batches(v, batch, device)
        r = measure(v.arch, dict(v.model), cfg.mask_ratio, batches, device, warmup, steps)
        click.echo(f"{name:<10} {r['pretrain']:>10.0f} {batches[0]:>8} "
                   f"{r['finetune']:>10.0f} {batches[1]:>8}")


if __name__ == "__main__":
    main()
