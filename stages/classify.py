"""DVC stage `classify@<variant>-<mode>`: train one classifier on one encoder."""

from pathlib import Path

import click

from aelab.cli import stage_errors
from aelab.config import MODES, load_config
from aelab.classify import run_classify


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(path_type=Path), help="Validated params file.")
@click.option("--variant", required=True, help="Key under `variants` in params.yaml.")
@click.option("--mode", required=True, type=click.Choice(MODES), help="Classifier mode.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Prepared dataset directory.")
@click.option("--init", "init_manifest", required=True, type=click.Path(path_type=Path),
              help="Init manifest written by the variant's pretrain stage.")
@click.option("--out", "out_model", required=True, type=click.Path(path_type=Path),
              help="Where to write the selected (best on validation) classifier.")
@click.option("--reports", "reports_dir", required=True, type=click.Path(path_type=Path),
              help="Directory for history.csv, metrics.json, accuracy.png.")
@stage_errors
def main(params_path: Path, variant: str, mode: str, data_dir: Path, init_manifest: Path,
         out_model: Path, reports_dir: Path) -> None:
    """Train classifier `mode` on `variant`'s encoder, selecting the epoch on validation."""
    cfg = load_config(params_path)
    cfg.variant(variant)
    metrics = run_classify(cfg, variant, mode, data_dir, init_manifest, out_model, reports_dir)
    click.echo(f"classify/{variant}/{mode}: best val_acc {metrics['best_val_acc']:.4f} "
               f"(epoch {metrics['best_epoch']})")


if __name__ == "__main__":
    main()
