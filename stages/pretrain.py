"""DVC stage `pretrain@<variant>`: train one autoencoder variant."""

from pathlib import Path

import click

from aelab.cli import stage_errors
from aelab.config import load_config
from aelab.pretrain import run_pretrain


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(path_type=Path), help="Validated params file.")
@click.option("--variant", required=True, help="Key under `variants` in params.yaml.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Prepared dataset directory.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory for model.pt and the init manifests.")
@click.option("--reports", "reports_dir", required=True, type=click.Path(path_type=Path),
              help="Directory for history.csv, metrics.json, reconstructions.png.")
@stage_errors
def main(params_path: Path, variant: str, data_dir: Path, out_dir: Path,
         reports_dir: Path) -> None:
    """Pretrain the autoencoder `variant` and write its checkpoint and reports."""
    cfg = load_config(params_path)
    cfg.variant(variant)  # unknown variant: fail before loading data
    metrics = run_pretrain(cfg, variant, data_dir, out_dir, reports_dir)
    click.echo(f"pretrain/{variant}: val_loss {metrics['val_loss']:.4f} "
               f"in {metrics['train_seconds']:.0f}s")


if __name__ == "__main__":
    main()
