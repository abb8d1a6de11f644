"""DVC stage `pretrain@<variant>`: train one autoencoder variant."""

from pathlib import Path

import click

from aelab import tracking
from aelab.cli import (data_option, launch_distributed, output_option, params_option, path_option,
                       run, stage_errors, variant_option)
from aelab.config import load_config


@click.command()
@params_option
@variant_option
@data_option
@output_option("--out", "out_dir", "Directory for seed<s>.pt and the init manifests.")
@output_option("--reports", "reports_dir",
               "Directory for history.csv, metrics.json, reconstructions.pt.")
@stage_errors
def main(params_path: Path, variant: str, data_dir: Path, out_dir: Path,
         reports_dir: Path) -> None:
    """Pretrain the autoencoder `variant` and write its checkpoint and reports."""
    tracking.start(f"pretrain@{variant}")  # MLflow loads in the agent while torch loads
    cfg = load_config(params_path, check_models=False)  # run_pretrain builds its variant
    cfg.variant(variant)  # unknown variant: fail before loading data
    launch_distributed(cfg.runtime.devices)  # devices > 1: under torchrun, then exit
    from aelab.pretrain import run_pretrain

    metrics = run_pretrain(cfg, variant, data_dir, out_dir, reports_dir)
    if metrics:  # rank 0 (or the only process)
        click.echo(f"pretrain/{variant}: val_loss {metrics['val_loss']:.4f} "
                   f"in {metrics['train_seconds']:.0f}s")


if __name__ == "__main__":
    run(main)
