"""The `aelab` console command on a real git + DVC repository with real experiments.

The repository is tiny: one DVC stage whose command writes reports/results.json and
reports/results.md (the report stage's outs, `cache: false`) from `label_fraction`, so
`dvc exp run -S label_fraction=...` makes real experiments in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from aelab.console import main
from tests.conftest import project_env

PARAMS = "dataset: shapes\nseeds: [0, 1]\nlabel_fraction: 1\nclassify: {epochs: 2}\n"

# The stage: results.json in the report stage's structure, results.md a table of it.
WRITE_RESULTS = '''\
import json, pathlib, yaml

p = yaml.safe_load(open("params.yaml"))
f = p["label_fraction"]
modes = ["scratch", "linear_probe"]
results = {v: {m: {"test_acc": a * f, "test_acc_std": 0.01,
                   "test_acc_per_seed": {"0": a * f - 0.01, "1": a * f + 0.01},
                   "test_loss": 2 - a * f}
               for m, a in zip(modes, (base, base - 0.1))}
           for v, base in (("fc_l1", 0.5), ("mae", 0.6))}
out = pathlib.Path("reports")
out.mkdir(exist_ok=True)
(out / "results.json").write_text(json.dumps(
    {"dataset": p["dataset"], "seeds": p["seeds"], "label_fraction": f, "modes": modes,
     "results": results}))
rows = [f"| {v} | " + " | ".join(f"{c['test_acc']:.3f}" for c in row.values()) + " |"
        for v, row in results.items()]
(out / "results.md").write_text("\\n".join(
    [f"# Results on {p['dataset']}", "", f"label fraction {f}", "",
     "| variant | " + " | ".join(modes) + " |", "|---|---|---|", *rows, ""]))
'''

DVC_YAML = """\
stages:
  report:
    cmd: python write_results.py
    deps: [write_results.py]
    params: [dataset, seeds, label_fraction]
    outs:
      - reports/results.json:
          cache: false
      - reports/results.md:
          cache: false
"""


def sh(cwd: Path, *args: str) -> str:
    """Run a command (git, dvc) in `cwd` with the project's environment; its stdout."""
    env = {**project_env(), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """Commit 1: no results; commit 2: the stage's results (label_fraction 1); experiments
    `a` (label_fraction 0.1) and `b` (0.5), b's results applied to the workspace."""
    repo = tmp_path_factory.mktemp("aelab-console")
    (repo / "params.yaml").write_text(PARAMS)
    (repo / "write_results.py").write_text(WRITE_RESULTS)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "pipeline")
    sh(repo, "dvc", "repro", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results")
    sh(repo, "dvc", "exp", "run", "-q", "-n", "a", "-S", "label_fraction=0.1")
    sh(repo, "dvc", "exp", "run", "-q", "-n", "b", "-S", "label_fraction=0.5")
    return repo


def exp_file(repo: Path, name: str, path: str) -> str:
    """A file of experiment `name`, read with git from its ref (refs/exps/.../<name>)."""
    refs = sh(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
    ref = next(r for r in refs if r.endswith(f"/{name}"))
    return sh(repo, "git", "show", f"{ref}:{path}")


def aelab(cwd: Path, *args: str):
    """Run `aelab ARGS` in `cwd` (click's runner: stdout and stderr apart)."""
    before = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, list(args))
    finally:
        os.chdir(before)


def test_results_prints_the_workspace_table(repo):
    out = aelab(repo, "results")
    assert out.exit_code == 0, out.output
    assert out.stdout == (repo / "reports" / "results.md").read_text()
    assert "label fraction 0.5" in out.stdout  # b's results, applied by dvc exp run


def test_results_of_an_experiment_a_commit_and_from_a_subdirectory(repo):
    out = aelab(repo, "results", "a")
    assert out.exit_code == 0, out.output
    assert out.stdout == exp_file(repo, "a", "reports/results.md")
    assert "label fraction 0.1" in out.stdout and "| fc_l1 | 0.050 | 0.040 |" in out.stdout
    assert "label fraction 1\n" in aelab(repo, "results", "HEAD").stdout
    (repo / "sub").mkdir(exist_ok=True)
    assert aelab(repo / "sub", "results", "a").stdout == out.stdout


def test_installed_script_prints_an_experiment(repo):
    script = Path(sys.executable).parent / "aelab"
    proc = subprocess.run([str(script), "results", "b"], cwd=repo, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == exp_file(repo, "b", "reports/results.md")


def test_compare_puts_experiments_side_by_side(repo):
    out = aelab(repo, "compare", "a", "b", "HEAD")
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert "params that differ: label_fraction" in lines[0] and "on shapes" in lines[0]
    assert ("| variant | mode | a (label_fraction=0.1) | b (label_fraction=0.5) "
            "| HEAD (label_fraction=1) |") in lines
    assert "| fc_l1 | scratch | 0.050 ± 0.010 | 0.250 ± 0.010 | 0.500 ± 0.010 |" in lines
    assert "| mae | linear_probe | 0.050 ± 0.010 | 0.250 ± 0.010 | 0.500 ± 0.010 |" in lines
    assert len([line for line in lines if line.startswith("| fc_l1 ")]) == 2


def test_compare_one_mode_another_metric_and_the_figure(repo, tmp_path):
    import matplotlib.image

    figure = tmp_path / "figs" / "sweep.png"
    out = aelab(repo, "compare", "a", "b", "--mode", "linear_probe", "--metric", "test_loss",
                "--figure", str(figure))
    assert out.exit_code == 0, out.output
    rows = [line for line in out.stdout.splitlines() if line.startswith("| fc_l1 ")]
    assert rows == ["| fc_l1 | linear_probe | 1.960 | 1.800 |"]  # no test_loss_std: no ±
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000
    assert matplotlib.image.imread(figure).shape[2] in (3, 4)
    assert f"wrote {figure}" in out.stderr


def test_compare_without_differing_params(repo):
    out = aelab(repo, "compare", "b", "workspace")  # the workspace holds b's results
    assert out.exit_code == 0, out.output
    assert "params that differ: none" in out.stdout
    assert "| variant | mode | b | workspace |" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["results", "nope"], "Error: unknown experiment or revision 'nope' (see dvc exp list)"),
    (["compare", "a", "nope"], "Error: unknown experiment or revision 'nope'"),
    (["results", "HEAD~1"], "Error: no results in 'HEAD~1': reports/results.md is missing"),
    (["compare", "a", "HEAD~1"], "Error: no results in 'HEAD~1': reports/results.json is"),
    (["compare", "a", "--mode", "zz"], "Error: no mode 'zz' in these results (modes: "
                                       "scratch, linear_probe)"),
    (["compare", "a", "--metric", "acc"], "Error: no metric 'acc' in these results (metrics: "
                                          "test_acc, test_loss)"),
])
def test_errors_are_one_line(repo, args, message):
    out = aelab(repo, *args)
    assert out.exit_code == 1
    assert out.stdout == "" and len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith(message), out.stderr


def test_outside_a_dvc_repository(tmp_path):
    out = aelab(tmp_path, "results")
    assert out.exit_code == 1
    assert out.stderr == f"Error: not inside a DVC repository: {tmp_path}\n"


def test_a_dvc_repository_without_git_has_only_its_workspace(tmp_path):
    sh(tmp_path, "dvc", "init", "-q", "--no-scm")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "results.md").write_text("# Results\n")
    assert aelab(tmp_path, "results").stdout == "# Results\n"
    out = aelab(tmp_path, "results", "a")
    assert out.exit_code == 1
    assert out.stderr == (f"Error: 'a': {tmp_path} is not a Git repository, so it has no "
                          "experiments or revisions\n")
