"""DVC stage `report`: results.json, results.md and the figures."""

from pathlib import Path

import click

from aelab.cli import stage_errors
from aelab.config import load_config
from aelab.report import run_report


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(path_type=Path), help="Validated params file.")
@click.option("--test", "test_json", required=True, type=click.Path(path_type=Path),
              help="Test metrics written by the evaluate stage.")
@click.option("--pretrain-reports", "pretrain_dir", required=True,
              type=click.Path(path_type=Path), help="reports/pretrain directory.")
@click.option("--classify-reports", "classify_dir", required=True,
              type=click.Path(path_type=Path), help="reports/classify directory.")
@click.option("--json", "out_json", required=True, type=click.Path(path_type=Path),
              help="results.json to write.")
@click.option("--md", "out_md", required=True, type=click.Path(path_type=Path),
              help="results.md to write.")
@click.option("--figures", "figures_dir", required=True, type=click.Path(path_type=Path),
              help="Directory for the figures.")
@stage_errors
def main(params_path, test_json, pretrain_dir, classify_dir, out_json, out_md,
         figures_dir) -> None:
    """Build the results table and figures from the stage outputs."""
    cfg = load_config(params_path)
    run_report(cfg, test_json, pretrain_dir, classify_dir, out_json, out_md, figures_dir)
    click.echo(f"wrote {out_md} and {out_json}")


if __name__ == "__main__":
    main()
