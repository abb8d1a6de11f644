"""DVC stage `evaluate`: every selected classifier on the test split, once."""

from pathlib import Path

import click

from aelab.cli import stage_errors
from aelab.config import load_config
from aelab.evaluate import run_evaluate


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(path_type=Path), help="Validated params file.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Prepared dataset directory.")
@click.option("--models", "models_dir", required=True, type=click.Path(path_type=Path),
              help="Directory of classifier checkpoints <variant>-<mode>.pt.")
@click.option("--encoders", "encoders_dir", required=True, type=click.Path(path_type=Path),
              help="Directory of pretrained encoders <variant>/model.pt (for kNN).")
@click.option("--out", "out_json", required=True, type=click.Path(path_type=Path),
              help="Test metrics JSON to write.")
@stage_errors
def main(params_path: Path, data_dir: Path, models_dir: Path, encoders_dir: Path,
         out_json: Path) -> None:
    """Score each classifier on test, run the kNN check, write the metrics."""
    cfg = load_config(params_path)
    out = run_evaluate(cfg, data_dir, models_dir, encoders_dir, out_json)
    n = sum(len(row) for row in out["results"].values())
    click.echo(f"evaluated {n} classifiers on {cfg.dataset} test -> {out_json}")


if __name__ == "__main__":
    main()
