"""Training throughput (images/s) of every committed variant, pretraining and fine-tuning.

    python benchmarks/throughput.py [--batch 64] [--steps 10]

Uses the model options of params.yaml (or --params), random data on the current device
(AELAB_DEVICE or CUDA when present), a few warm-up steps, then timed steps; on CUDA it
synchronises only around the timed block. Absolute images/s move from run to run on a shared
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


def measure(arch: str, options: dict, mask_ratio: float, batch: int, device: torch.device,
            warmup: int, steps: int) -> dict[str, float]:
    """Pretraining and fine-tuning images/s of one variant."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    # The engine's own step (aelab.training.train_step) on a TrainState, as in the stages.
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-4, optimizer="adamw")
    model = build_autoencoder(arch, options, mask_ratio=mask_ratio)
    state = build_state(model, cfg, batches_per_epoch=warmup + steps, device=device)
    clf = Classifier(model, 10, head="linear")
    clf_state = build_state(clf, cfg, batches_per_epoch=warmup + steps, device=device)

    def pretrain_step():
        train_step(state, x, None, device=device)

    def finetune_step():
        train_step(clf_state, x, y, device=device)

    return {"pretrain": images_per_second(pretrain_step, batch, device, warmup, steps),
            "finetune": images_per_second(finetune_step, batch, device, warmup, steps)}


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--batch", default=64, show_default=True)
@click.option("--warmup", default=3, show_default=True)
@click.option("--steps", default=10, show_default=True)
def main(params_path, batch, warmup, steps):
    """Measure every variant; print pretraining and fine-tuning images/s."""
    cfg = load_config(params_path)
    device = resolve_device()
    click.echo(f"device {device}, {torch.get_num_threads()} threads, batch {batch}, "
               f"{steps} timed steps (images/s)")
    click.echo(f"{'variant':<10} {'pretrain':>10} {'finetune':>10}")
    for name, v in cfg.variants.items():
        r = measure(v.arch, dict(v.model), cfg.mask_ratio, batch, device, warmup, steps)
        click.echo(f"{name:<10} {r['pretrain']:>10.0f} {r['finetune']:>10.0f}")


if __name__ == "__main__":
    main()
