"""DVC stage `evaluate`: every selected classifier on the test split, once."""

from pathlib import Path

import click

from aelab import tracking
from aelab.cli import data_option, output_option, params_option, path_option, run, stage_errors
from aelab.config import load_config


@click.command()
@params_option
@data_option
@path_option("--models", "models_dir", "models/classify: <variant>-<init>/<mode>/seed<s>.pt.")
@path_option("--encoders", "encoders_dir",
             "Pretrained encoders <variant>/seed<s>.pt (for kNN).")
@output_option("--out", "out_json", "Test metrics JSON to write.")
@stage_errors
def main(params_path: Path, data_dir: Path, models_dir: Path, encoders_dir: Path,
         out_json: Path) -> None:
    """Score each classifier on test, run the kNN check, write the metrics."""
    tracking.start("evaluate")  # MLflow loads in the agent (it registers the best models)
    cfg = load_config(params_path)
    from aelab.evaluate import run_evaluate

    out = run_evaluate(cfg, data_dir, models_dir, encoders_dir, out_json)
    n = sum(len(row) for row in out["results"].values())
    click.echo(f"evaluated {n} classifiers on {cfg.dataset} test -> {out_json}")


if __name__ == "__main__":
    run(main)
