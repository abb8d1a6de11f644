"""DVC stage `classify@<variant>-<mode>`: train one classifier on one encoder."""

from pathlib import Path

import click

from aelab.cli import data_option, params_option, path_option, stage_errors, variant_option
from aelab.config import MODES, load_config
from aelab.classify import run_classify


@click.command()
@params_option
@variant_option
@click.option("--mode", required=True, type=click.Choice(MODES), help="Classifier mode.")
@data_option
@path_option("--init", "init_manifest", "Init manifest written by the variant's pretrain stage.")
@path_option("--out", "out_model",
             "Directory for each seed's selected (best on validation) classifier.")
@path_option("--reports", "reports_dir", "Directory for history.csv, metrics.json, accuracy.png.")
@stage_errors
def main(params_path: Path, variant: str, mode: str, data_dir: Path, init_manifest: Path,
         out_model: Path, reports_dir: Path) -> None:
    """Train classifier `mode` on `variant`'s encoder, selecting the epoch on validation."""
    cfg = load_config(params_path, check_models=False)  # run_classify builds its variant
    cfg.variant(variant)
    metrics = run_classify(cfg, variant, mode, data_dir, init_manifest, out_model, reports_dir)
    click.echo(f"classify/{variant}/{mode}: best val_acc {metrics['best_val_acc']:.4f} "
               f"(mean over {metrics['seeds']} seeds)")


if __name__ == "__main__":
    main()
