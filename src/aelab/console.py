"""`aelab`: the results table of the workspace or of a DVC experiment, and experiments side by
side (table and figure), in the terminal.

An experiment is anything DVC resolves: an experiment name (`dvc exp show`), a branch, tag or
commit; `workspace` is the working tree. The report stage's outs (dvc.yaml, `cache: false`) are
committed into each experiment's Git ref, so they are read as of that revision.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import click

if TYPE_CHECKING:
    from dvc.repo import Repo

WORKSPACE = "workspace"  # DVC's name for the working tree
# The report stage's outs in dvc.yaml, from the repository root.
RESULTS_MD = "reports/results.md"
RESULTS_JSON = "reports/results.json"
DEFAULT_PARAMS = "params.yaml"  # its keys are shown bare; other params files as file:key
ABSENT = object()  # a param key an experiment lacks (added by another with `-S ++key=...`)


def _fail(message: str) -> click.ClickException:
    """`Error: <message>` (its first line), exit 1."""
    return click.ClickException((message.strip().splitlines() or ["unknown error"])[0])


@contextmanager
def _repo() -> Iterator[Repo]:
    """The DVC repository around the working directory; DVC errors become one line."""
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo()
    except NotDvcRepoError:
        raise _fail(f"not inside a DVC repository: {Path.cwd()}") from None
    try:
        with repo:
            yield repo
    except DvcException as err:
        raise _fail(str(err)) from None


def _where(rev: str) -> str:
    return "the workspace" if rev == WORKSPACE else f"'{rev}'"


@contextmanager
def _at(repo: Repo, rev: str) -> Iterator[None]:
    """The repository's files (repo.dvcfs, repo.params) as of `rev`."""
    from dvc.scm import NoSCM, RevError, resolve_rev

    if rev != WORKSPACE:
        if isinstance(repo.scm, NoSCM):
            raise _fail(f"'{rev}': {repo.root_dir} is not a Git repository, so it has no "
                        "experiments or revisions")
        try:
            rev = resolve_rev(repo.scm, rev)
        except RevError:
            raise _fail(f"unknown experiment or revision '{rev}' (see dvc exp list)") from None
    with repo.switch(rev):
        yield


def _read(repo: Repo, path: str, rev: str) -> str:
    """A file of the current revision (inside `_at`), tracked by Git or DVC."""
    try:
        return repo.dvcfs.read_text(f"/{path}")
    except FileNotFoundError:
        raise _fail(f"no results in {_where(rev)}: {path} is missing (the report stage has not "
                    "run there)") from None


def _results_json(repo: Repo, rev: str) -> dict:
    """results.json of the current revision; checks it holds a results table."""
    try:
        data = json.loads(_read(repo, RESULTS_JSON, rev))
    except json.JSONDecodeError as err:
        raise _fail(f"{RESULTS_JSON} in {_where(rev)} is not JSON: {err}") from None
    rows = data.get("results") if isinstance(data, dict) else None
    if not rows or not isinstance(rows, dict) or not all(
            isinstance(row, dict) and all(isinstance(c, dict) for c in row.values())
            for row in rows.values()):
        raise _fail(f"{RESULTS_JSON} in {_where(rev)} holds no results table")
    return data


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _params(repo: Repo) -> dict[str, object]:
    """Every param of the current revision, flat: `key` for params.yaml, `file:key` else."""
    files = repo.params.show().get("", {}).get("data", {})
    flat: dict[str, object] = {}
    for name, content in files.items():
        prefix = "" if name == DEFAULT_PARAMS else f"{name}:"
        flat.update(_flatten(content.get("data", {}), prefix))
    return flat


def _value(value: object) -> str:
    """A param value as `dvc exp run -S` writes it; — for a key the experiment lacks."""
    if value is ABSENT:
        return "—"
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _differing(params: list[dict[str, object]]) -> list[str]:
    """The param keys whose value is not the same in every experiment, in first-seen order."""
    keys = list(dict.fromkeys(k for p in params for k in p))
    return [k for k in keys if len({_value(p.get(k, ABSENT)) for p in params}) > 1]


def _numeric(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(cell: dict | None, metric: str) -> tuple[float, float, int] | None:
    """(mean, std, seeds) of `metric` in one results.json cell; None where it has none."""
    if not cell or not _numeric(cell.get(metric)):
        return None
    return (cell[metric], cell.get(f"{metric}_std", 0.0),
            len(cell.get(f"{metric}_per_seed", {})) or 1)


def _text(value: tuple[float, float, int] | None) -> str:
    if value is None:
        return "—"
    mean, std, n = value
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def _rows(results: list[dict], modes: tuple[str, ...], metric: str) -> list[tuple[str, str]]:
    """(variant, mode) rows of the comparison: union over the experiments, table order; checks
    that the asked modes and metric exist."""
    variants = list(dict.fromkeys(v for r in results for v in r["results"]))
    known = list(dict.fromkeys(m for r in results for row in r["results"].values() for m in row))
    for mode in modes:
        if mode not in known:
            raise _fail(f"no mode '{mode}' in these results (modes: {', '.join(known)})")
    cells = [c for r in results for row in r["results"].values() for c in row.values()]
    if not any(_numeric(c.get(metric)) for c in cells):
        metrics = sorted({k for c in cells for k, v in c.items()
                          if _numeric(v) and not k.endswith("_std")})
        raise _fail(f"no metric '{metric}' in these results (metrics: {', '.join(metrics)})")
    return [(v, m) for v in variants for m in (modes or known)
            if any(m in r["results"].get(v, {}) for r in results)]


def _label(name: str, params: dict[str, object], keys: list[str]) -> str:
    shown = ", ".join(f"{k}={_value(params.get(k, ABSENT))}" for k in keys)
    return f"{name} ({shown})" if shown else name


def render_comparison(names: list[str], results: list[dict], params: list[dict[str, object]],
                      modes: tuple[str, ...] = (), metric: str = "test_acc") -> str:
    """The Markdown comparison: one row per variant and mode, one column per experiment
    labelled with the params that differ between them."""
    rows = _rows(results, modes, metric)
    keys = _differing(params)
    datasets = {r.get("dataset") for r in results}
    on = f" on {datasets.pop()}" if len(datasets) == 1 and None not in datasets else ""
    lines = [f"{metric}{on} per variant and mode: mean ± sample std over seeds; params that "
             f"differ: {', '.join(keys) or 'none'}", "",
             "| variant | mode | " + " | ".join(_label(n, p, keys)
                                                 for n, p in zip(names, params)) + " |",
             "|---|---|" + "---|" * len(names)]
    for variant, mode in rows:
        cells = [_text(_cell(r["results"].get(variant, {}).get(mode), metric)) for r in results]
        lines.append(f"| {variant} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_figure(names: list[str], results: list[dict], params: list[dict[str, object]],
                      path: Path, modes: tuple[str, ...] = (), metric: str = "test_acc") -> None:
    """One panel per mode: `metric` against the experiments (or the one param that differs,
    when it is numeric; log axis over a decade or more), one line per variant, error bars the
    std over seeds."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(results, modes, metric)
    keys = _differing(params)
    panels = list(dict.fromkeys(m for _, m in rows))
    values = [p.get(keys[0], ABSENT) for p in params] if len(keys) == 1 else []
    numeric = bool(values) and all(_numeric(x) for x in values)
    xs = values if numeric else list(range(len(names)))
    order = sorted(range(len(names)), key=lambda i: xs[i])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 1, 3.8), sharey=True,
                             squeeze=False)
    for ax, mode in zip(axes[0], panels):
        for j, variant in enumerate(dict.fromkeys(v for v, m in rows if m == mode)):
            points = [_cell(results[i]["results"].get(variant, {}).get(mode), metric)
                      for i in order]
            ax.errorbar([xs[i] for i in order], [p[0] if p else math.nan for p in points],
                        yerr=[p[1] if p else 0.0 for p in points], color=f"C{j % 10}",
                        marker="o", capsize=3, label=variant)
        ax.set_title(mode)
        ax.grid(alpha=0.3)
        if numeric:
            ax.set_xlabel(keys[0])
            if min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
                ax.minorticks_off()
            ax.set_xticks(sorted(set(xs)), [_value(x) for x in sorted(set(xs))], fontsize=7)
        else:
            ax.set_xticks(xs, [_label(n, p, keys) for n, p in zip(names, params)],
                          rotation=30, ha="right", fontsize=7)
    axes[0][0].set_ylabel(metric)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{metric} per mode (error bars: std over seeds)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


@click.group()
def main() -> None:
    """aelab results in the terminal: a DVC experiment's table, or several side by side."""


@main.command()
@click.argument("exp", default=WORKSPACE)
def results(exp: str) -> None:
    """Print the results table (reports/results.md) of EXP: a DVC experiment name, branch, tag
    or commit; the workspace by default."""
    with _repo() as repo, _at(repo, exp):
        click.echo(_read(repo, RESULTS_MD, exp), nl=False)


@main.command()
@click.argument("exps", nargs=-1, required=True, metavar="EXP...")
@click.option("--mode", "modes", multiple=True, metavar="MODE",
              help="Only this classifier mode (repeat for several); default: all.")
@click.option("--metric", default="test_acc", show_default=True,
              help="Key of a results.json cell: test_acc, test_loss, best_val_acc, ...")
@click.option("--figure", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the comparison as a PNG: one panel per mode.")
def compare(exps: tuple[str, ...], modes: tuple[str, ...], metric: str,
            figure: Path | None) -> None:
    """Put experiments side by side: METRIC per variant and mode, one column per EXP (a DVC
    experiment name, branch, tag, commit or `workspace`), labelled with the params that differ
    between them."""
    names, results, params = list(exps), [], []
    with _repo() as repo:
        for exp in names:
            with _at(repo, exp):
                results.append(_results_json(repo, exp))
                params.append(_params(repo))
    click.echo(render_comparison(names, results, params, modes, metric), nl=False)
    if figure:
        comparison_figure(names, results, params, figure, modes, metric)
        click.echo(f"wrote {figure}", err=True)
