"""DVC stage `report`: results.json, results.md, the figures and DVC's metrics.json."""

from pathlib import Path

import click

from aelab.cli import output_option, params_option, path_option, run, stage_errors
from aelab import tracking
from aelab.config import load_config


@click.command()
@params_option
@path_option("--test", "test_json", "Test metrics written by the evaluate stage.")
@path_option("--pretrain-reports", "pretrain_dir", "reports/pretrain directory.")
@path_option("--classify-reports", "classify_dir", "reports/classify directory.")
@output_option("--json", "out_json", "results.json to write.")
@output_option("--md", "out_md", "results.md to write.")
@output_option("--figures", "figures_dir", "Directory for the figures.")
@output_option("--metrics", "out_metrics",
               "metrics.json to write: the numbers `dvc exp show` shows.")
@stage_errors
def main(params_path, test_json, pretrain_dir, classify_dir, out_json, out_md,
         figures_dir, out_metrics) -> None:
    """Build the results table and figures from the stage outputs."""
    tracking.start("report")  # MLflow loads in the agent while torch and matplotlib load
    cfg = load_config(params_path, check_models=False)  # builds no model
    from aelab.report import run_report

    run_report(cfg, test_json, pretrain_dir, classify_dir, out_json, out_md, figures_dir,
               out_metrics)
    click.echo(f"wrote {out_md} and {out_json}")


if __name__ == "__main__":
    run(main)
