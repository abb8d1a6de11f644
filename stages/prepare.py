"""DVC stage `prepare`: download/verify/decode the dataset once into uint8 tensors + a val split."""

from pathlib import Path

import click

from aelab.cli import params_option, path_option, stage_errors
from aelab.config import load_config


@click.command()
@params_option
@path_option("--out", "out", "Output directory for train/val/test tensors and meta.json.")
@path_option("--external", "external", "Folder of user-provided archives (tracked by data.dvc).")
@path_option("--downloads", "downloads", "Where downloaded archives are kept (not tracked).")
@stage_errors
def main(params_path: Path, out: Path, external: Path, downloads: Path) -> None:
    """Build the prepared dataset named by params.yaml's `dataset`."""
    cfg = load_config(params_path)
    from aelab.data import prepare

    d = cfg.data
    meta = prepare(cfg.dataset, out, seed=cfg.seed, val_fraction=d.val_fraction,
                   train_limit=d.train_limit, test_limit=d.test_limit, external_dir=external,
                   download_dir=downloads, verify_checksum=d.verify_checksum,
                   shapes_train=d.shapes_train, shapes_test=d.shapes_test,
                   imagefolder=Path(d.imagefolder))
    click.echo(f"prepared {cfg.dataset}: {meta['sizes']} -> {out}")


if __name__ == "__main__":
    main()
