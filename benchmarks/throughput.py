"""Training throughput (images/s) of every committed variant, pretraining and fine-tuning.

    python benchmarks/throughput.py                 # print a table, compare with the baseline
    python benchmarks/throughput.py --write FILE    # record a new baseline (JSON)

Uses the model options of params.yaml (or --params), random data on the current device
(AELAB_DEVICE or CUDA when present), a few warm-up steps, then timed steps; on CUDA it
synchronises only around the timed block. Reference: benchmarks/baseline-cpu-2core.json,
measured on the 2-core development machine. Speed is checked here, never in unit tests.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import click
import torch

from aelab.config import TrainConfig, load_config
from aelab.models import Classifier, build_autoencoder
from aelab.training import build_state, resolve_device, train_step

HERE = Path(__file__).resolve().parent


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
    state = build_state(model, cfg, steps_per_epoch=warmup + steps, device=device)
    clf = Classifier(model, 10, head="linear")
    clf_state = build_state(clf, cfg, steps_per_epoch=warmup + steps, device=device)

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
@click.option("--baseline", default=str(HERE / "baseline-cpu-2core.json"), show_default=True)
@click.option("--write", "write_path", default=None, help="Write the results as a baseline.")
def main(params_path, batch, warmup, steps, baseline, write_path):
    """Measure every variant; print images/s beside the baseline's."""
    cfg = load_config(params_path)
    device = resolve_device()
    results = {name: measure(v.arch, dict(v.model), cfg.mask_ratio, batch, device, warmup, steps)
               for name, v in cfg.variants.items()}
    ref = json.loads(Path(baseline).read_text())["results"] if Path(baseline).is_file() else {}
    click.echo(f"device {device}, batch {batch}, {steps} timed steps (images/s)")
    click.echo(f"{'variant':<10} {'pretrain':>10} {'baseline':>10} {'finetune':>10} {'baseline':>10}")
    for name, r in results.items():
        b = ref.get(name, {})
        click.echo(f"{name:<10} {r['pretrain']:>10.0f} {b.get('pretrain', float('nan')):>10.0f} "
                   f"{r['finetune']:>10.0f} {b.get('finetune', float('nan')):>10.0f}")
    if write_path:
        Path(write_path).write_text(json.dumps({
            "device": str(device), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "batch": batch,
            "steps": steps, "results": results}, indent=2) + "\n")
        click.echo(f"wrote {write_path}")


if __name__ == "__main__":
    main()
