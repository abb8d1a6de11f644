"""DVC stage `prepare`: download/verify/decode the dataset once into uint8 tensors + a val split."""

from pathlib import Path

import click

from aelab.cli import output_option, params_option, path_option, run, stage_errors
from aelab.config import load_config


@click.command()
@params_option
@output_option("--out", "out", "Output directory for train/val/test tensors and meta.json.")
@path_option("--external", "external", "Folder of user-provided archives (tracked by data.dvc).")
@path_option("--downloads", "downloads", "Where downloaded archives are kept (not tracked).")
@stage_errors
def main(params_path: Path, out: Path, external: Path, downloads: Path) -> None:
    """Build the prepared dataset named by params.yaml's `dataset`."""
    cfg = load_config(params_path)
    from aelab.data import prepare_from_config

    meta = prepare_from_config(cfg, out, external_dir=external, download_dir=downloads)
    click.echo(f"prepared {cfg.dataset}: {meta['sizes']} -> {out}")


if __name__ == "__main__":
    run(main)
