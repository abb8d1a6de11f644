"""Per-stage start-up and wind-down, DVC's bookkeeping included (issue target: <= 2.5 s).

    python benchmarks/startup.py [--repeats 3]

Builds a throwaway git + DVC copy of the project with a tiny shapes dataset and one-epoch
settings, then runs `dvc repro --force --single-item` on one stage of each kind several times.
Each stage prints its own timing line (aelab.cli.report_timing): start-up is process start to
the first training batch, wind-down the last batch to process exit (MLflow writes included).
DVC's per-stage bookkeeping is the wall-clock of a forced `dvc repro` of the stage, minus the
stage process's own time, minus an up-to-date `dvc repro` of it (DVC's own start-up, paid once
per command however many stages run). Medians are printed; the machine is shared and noisy, so
read the spread too.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's helpers for a throwaway project copy
from tests.conftest import copy_project, project_env  # noqa: E402
STAGES = ("pretrain@conv_256", "classify@conv_256-pretrained", "pretrain@mae")
TIMING = re.compile(r"timing: start-up ([\d.]+) s, training ([\d.]+) s, wind-down ([\d.]+) s")


def _copy_project(repo: Path) -> None:
    copy_project(repo)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw.update(dataset="shapes", seeds=[0])
    raw["data"].update(shapes_train=600, shapes_test=100)
    for v in raw["variants"].values():
        v["pretrain"].update(epochs=1, batch_size=100, warmup_epochs=0)
        v["classify"].update(warmup_epochs=0)
    raw["variants"]["mae"]["model"].update(patch_size=8, dim=64, depth=4, heads=4,
                                           decoder_dim=64, decoder_depth=1, decoder_heads=2)
    raw["classify"].update(epochs=1, batch_size=100)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (repo / "data" / "external").mkdir(parents=True, exist_ok=True)


def _run(repo: Path, env: dict, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


@click.command()
@click.option("--repeats", default=3, show_default=True, help="Runs of each stage.")
@click.option("--target", default=2.5, show_default=True, help="Seconds, per stage.")
def main(repeats: int, target: float) -> None:
    """Measure start-up, wind-down and DVC bookkeeping per stage."""
    env = project_env()
    with tempfile.TemporaryDirectory(prefix="aelab-startup-") as tmp:
        repo = Path(tmp)
        _copy_project(repo)
        for cmd in (("git", "init", "-q"), ("dvc", "commit", "-q", "-f", "data.dvc"),
                    ("git", "add", "-A"), ("git", "commit", "-qm", "bench"),
                    ("dvc", "repro", "-q", "classify@conv_256-pretrained", "pretrain@mae")):
            _run(repo, env, *cmd)
        rows = []
        for stage in STAGES:
            figures: dict[str, list[float]] = {"start-up": [], "wind-down": [], "dvc": []}
            for _ in range(repeats):
                t0 = time.perf_counter()  # DVC's own start and status check, run nothing
                _run(repo, env, "dvc", "repro", "--single-item", stage)
                noop = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = _run(repo, env, "dvc", "repro", "--force", "--single-item", stage)
                wall = time.perf_counter() - t0 - noop  # paid once per `dvc repro`, not per stage
                match = TIMING.search(out)
                if not match:
                    raise click.ClickException(f"{stage}: no timing line in its output")
                start, train, wind = map(float, match.groups())
                figures["start-up"].append(start)
                figures["wind-down"].append(wind)
                figures["dvc"].append(wall - start - train - wind)
            rows.append((stage, {k: statistics.median(v) for k, v in figures.items()},
                         {k: (min(v), max(v)) for k, v in figures.items()}))
    click.echo(f"{'stage':32} {'start-up':>9} {'wind-down':>10} {'DVC':>6} {'total':>6}"
               f"  (medians of {repeats}, seconds; target {target} s)")
    for stage, med, spread in rows:
        total = med["start-up"] + med["wind-down"] + med["dvc"]
        click.echo(f"{stage:32} {med['start-up']:9.2f} {med['wind-down']:10.2f} "
                   f"{med['dvc']:6.2f} {total:6.2f}  {'met' if total <= target else 'NOT met'}"
                   f"  start-up range {spread['start-up'][0]:.2f}-{spread['start-up'][1]:.2f}")


if __name__ == "__main__":
    main()
