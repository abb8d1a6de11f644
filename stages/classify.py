"""DVC stage `classify@<variant>-<init>`: a variant's classifiers, random or pretrained init."""

from pathlib import Path

import click

from aelab import tracking
from aelab.cli import (data_option, launch_distributed, output_option, params_option, path_option,
                       run, stage_errors, variant_option)
from aelab.config import INITS, load_config


@click.command()
@params_option
@variant_option
@click.option("--init", "init", required=True, type=click.Choice(INITS),
              help="scratch: the random-init modes; pretrained: every mode on the pretrained "
                   "encoder (of classify.modes).")
@data_option
@path_option("--manifest", "init_manifest",
             "Init manifest written by the variant's pretrain stage (init/<init>.json).")
@output_option("--out", "out_dir", "Directory for <mode>/seed<s>.pt, the selected classifiers.")
@output_option("--reports", "reports_dir", "Directory for metrics.json and history/<mode>.csv.")
@stage_errors
def main(params_path: Path, variant: str, init: str, data_dir: Path, init_manifest: Path,
         out_dir: Path, reports_dir: Path) -> None:
    """Train `variant`'s classifiers of `init`, each selected on validation, once per seed."""
    tracking.start(f"classify@{variant}-{init}")  # MLflow loads in the agent meanwhile
    cfg = load_config(params_path, check_models=False)  # run_classify builds its variant
    cfg.variant(variant)
    launch_distributed(cfg.runtime.devices)  # devices > 1: under torchrun, then exit
    from aelab.classify import run_classify

    metrics = run_classify(cfg, variant, init, data_dir, init_manifest, out_dir, reports_dir)
    for mode, m in metrics.items():
        click.echo(f"classify/{variant}/{mode}: best val_acc {m['best_val_acc']:.4f} "
                   f"(mean over {m['seeds']} seeds, {m['n_train_labelled']} labelled images)")


if __name__ == "__main__":
    run(main)
