"""The report step: the results table (JSON and Markdown, in the seed's layout) and figures."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from aelab import layout, tracking
from aelab.checkpoint import CheckpointError, atomic_path, read_json, write_json
from aelab.config import MODE_SPECS, Config
from aelab.history import read_history
from aelab.plots import (accuracy_bars, accuracy_curves, accuracy_vs_compute, loss_curves,
                         reconstruction_grid)
from aelab.seeds import reported
from aelab.stats import late_change, within_spread

# A classifier whose validation accuracy still gained this much between the last two fifths of
# its epochs, or a pretraining whose validation loss still fell by this share, is undertrained:
# the report names it (more epochs would move its cell).
STILL_RISING_ACC = 0.02
STILL_FALLING_LOSS = 0.03

SELECTION = ("each classifier's checkpoint is the epoch with the best validation accuracy; "
             "the test split is evaluated once, after selection")

# The pretraining costs accuracy is set against: a key of results["pretrain"][variant] (per
# seed) -> (the results key of its Pareto fronts, the figure's axis label).
COSTS = {"train_tflops_total": ("pareto", "pretraining TFLOP per seed (counted)"),
         "train_seconds": ("pareto_wallclock", "pretraining wall-clock per seed (s), {machine}")}


def machine(results: dict) -> str:
    """Where the pretraining wall-clock was measured: the device(s) the pretrain stages name."""
    devices = sorted({p["device"] for p in results["pretrain"].values() if p.get("device")})
    return f"on {' / '.join(devices)}" if devices else "on the machine that ran the pipeline"


def classifier_metrics(cfg: Config, classify_dir: Path) -> dict[tuple[str, str], dict]:
    """Each mode's metrics from its classify stage's metrics.json, keyed by (variant, mode)."""
    out = {}
    for v in cfg.variants:
        for m in cfg.modes:
            path = layout.classify_reports_in(classify_dir, v, m) / "metrics.json"
            stage = read_json(path)
            if m not in stage:
                raise CheckpointError(f"{path} has no '{m}' classifier (rerun its stage)")
            out[(v, m)] = stage[m]
    return out


def build_results(cfg: Config, test: dict, pretrain_dir: Path,
                  trained_metrics: dict[tuple[str, str], dict],
                  late_acc: dict[tuple[str, str], float] | None = None,
                  late_loss: dict[str, float] | None = None) -> dict:
    """Gather test scores, validation selection and cost into one machine-readable table;
    `late_acc` / `late_loss` (from `late_changes`) add how much each classifier's validation
    accuracy and each pretraining's validation loss still moved at the end."""
    late_acc, late_loss = late_acc or {}, late_loss or {}
    results: dict[str, dict] = {}
    for variant in cfg.variants:
        for mode in cfg.modes:
            scores = test["results"][variant][mode]
            trained = trained_metrics[(variant, mode)]
            results.setdefault(variant, {})[mode] = {
                **{k: x for k, x in scores.items() if k.startswith(("test_acc", "test_loss"))},
                "best_val_acc": trained["best_val_acc"],
                "best_epoch_per_seed": {s: r["best_epoch"]
                                        for s, r in trained["per_seed"].items()},
                "train_seconds": trained["train_seconds"],
                "trainable_params": trained["trainable_params"]}
            if (variant, mode) in late_acc:
                results[variant][mode]["late_val_acc_gain"] = late_acc[(variant, mode)]
    pretrain = {}
    for variant, v in cfg.variants.items():
        m = read_json(pretrain_dir / variant / "metrics.json")
        pretrain[variant] = {"arch": v.arch, "params": m["params"], "epochs": m["epochs"],
                             **test["cost"][variant],
                             "train_tflops_total": test["cost"][variant]["train_gflops_per_image"]
                             * m["images_seen"] / 1e3,
                             "train_seconds": m["train_seconds"], "peak_mem_mb": m["peak_mem_mb"],
                             "val_loss": m["val_loss"], "device": m.get("device")}
        if variant in late_loss:
            pretrain[variant]["late_val_loss_change"] = late_loss[variant]
    out = {"dataset": cfg.dataset, "seed": cfg.seed, "seeds": list(cfg.seeds),
           "mask_ratio": cfg.mask_ratio, "label_fraction": cfg.label_fraction,
           "n_train_labelled": test["n_train_labelled"], "num_classes": test["num_classes"],
           "chance_acc": 1 / test["num_classes"],
           "modes": list(cfg.modes), "selection": SELECTION, "results": results,
           "pretrain": pretrain, "knn": test["knn"], "seed_reported": reported(cfg.dataset)}
    for cost, (key, _) in COSTS.items():
        out[key] = pareto_fronts(out, cost)
    return out


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """The names of the (cost, accuracy) points nothing beats on both: no other point is at
    most as costly and at least as accurate while differing. Identical points both stay.
    Ordered by increasing cost, so it reads as the accuracy each budget can buy."""
    front = [name for name, (cost, acc) in points.items()
             if not any(c <= cost and a >= acc and (c, a) != (cost, acc)
                        for c, a in points.values())]
    return sorted(front, key=lambda name: (points[name][0], name))


def pretrained_modes(results: dict) -> list[str]:
    """The modes whose encoder was pretrained: the ones a pretraining cost applies to."""
    return [m for m in results["modes"] if MODE_SPECS[m].pretrained]


def pareto_fronts(results: dict, cost: str) -> dict[str, list[str]]:
    """{pretrained mode: its Pareto front of mean test accuracy against the pretraining
    `cost` (a key of results["pretrain"][variant])}."""
    rows, pretrain = results["results"], results["pretrain"]
    return {m: pareto_front({v: (pretrain[v][cost], rows[v][m]["test_acc"]) for v in rows})
            for m in pretrained_modes(results)}


def _cell(mean: float, std: float, n_seeds: int) -> str:
    return f"{mean:.3f} ± {std:.3f}" if n_seeds > 1 else f"{mean:.3f}"


def render_markdown(results: dict) -> str:
    """The table for people: one row per variant, one column per mode, test accuracy."""
    modes = results["modes"]
    knn = results["knn"]
    n = len(results["seeds"])
    k = next(iter(knn.values()))["k"]
    spread = (f"mean ± sample std over {n} seeds ({', '.join(map(str, results['seeds']))}); "
              "best mode of each row in bold, and `~` marks a mode whose difference from the "
              "row's best is smaller than their combined spread (not significant)"
              if n > 1 else
              f"one seed ({results['seeds'][0]}), so no spread and no significance test; best "
              "mode of each row in bold")
    lines = [f"# Results on {results['dataset']}", "",
             f"Test accuracy per autoencoder (row) and classifier mode (column): {spread}. "
             f"`kNN` is the training-free k={k} nearest-neighbour accuracy of the frozen "
             f"pretrained encoder. Chance is {results['chance_acc']:.3f} "
             f"({results['num_classes']} classes). {_labels_caption(results)} "
             f"Data seed {results['seed']}, mask ratio of the masked autoencoders "
             f"{results['mask_ratio']}.", "",
             "| variant | " + " | ".join(modes) + " | kNN |",
             "|---|" + "---|" * (len(modes) + 1)]
    for variant, row in results["results"].items():
        stats = {m: (row[m]["test_acc"], row[m].get("test_acc_std", 0.0)) for m in modes}
        best = max(modes, key=lambda m: stats[m][0])
        cells = []
        for m in modes:
            text = _cell(*stats[m], n)
            if m == best:
                text = f"**{text}**"
            elif within_spread(stats[m], stats[best]):
                text += " ~"
            cells.append(text)
        pre = knn[variant]["pretrained"]
        cells.append(_cell(pre["test_acc"], pre.get("test_acc_std", 0.0), n))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", f"## kNN accuracy (k={k}, cosine): does pretraining help?", "",
              "The same encoder at its random initialisation (the one `scratch` starts from) "
              "gives the baseline row a pretrained encoder must beat.", "",
              "| encoder | val | test |", "|---|---|---|"]
    for variant, scores in knn.items():
        for init in ("pretrained", "random_init"):
            sc = scores[init]
            lines.append(f"| {variant} ({init.replace('_', ' ')}) | "
                         f"{_cell(sc['val_acc'], sc.get('val_acc_std', 0.0), n)} | "
                         f"{_cell(sc['test_acc'], sc.get('test_acc_std', 0.0), n)} |")
    lines += ["", f"Selection: {results['selection']}.", "",
              "## Pretraining cost", "",
              "FLOPs are counted (torch FlopCounterMode, attention included): one training "
              "step (forward + backward) per image, the encoder's forward per image, and the "
              "whole pretraining run of one seed; time, memory and loss are means over seeds.", "",
              "| variant | arch | parameters | GFLOP/img train step | GFLOP/img encode "
              "| TFLOP per seed | epochs | wall-clock per seed (s) | peak memory (MB) "
              "| final val loss |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, p in results["pretrain"].items():
        lines.append(f"| {variant} | {p['arch']} | {p['params']:,} | "
                     f"{p['train_gflops_per_image']:.4g} | {p['encode_gflops_per_image']:.4g} | "
                     f"{p['train_tflops_total']:.4g} | {p['epochs']} | "
                     f"{p['train_seconds']:.1f} | {p['peak_mem_mb']:.0f} | {p['val_loss']:.4f} |")
    theirs = results.get("seed_reported")
    if theirs:
        lines += ["", "## Reported by the seeds (not measured here)", "",
                  f"Source: {theirs['source']}. Same layout; — where they report nothing.", "",
                  "| variant | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        for variant in results["results"]:
            row = theirs["results"].get(variant, {})
            cells = ["—" if row.get(m) is None else f"{row[m]:.3f}" for m in modes]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "## Classifier training time per seed (s)", "",
              "| variant | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for variant, row in results["results"].items():
        lines.append(f"| {variant} | " + " | ".join(f"{row[m]['train_seconds']:.1f}"
                                                   for m in modes) + " |")
    lines += ["", "Figures: `reports/figures/` (test accuracy per mode, accuracy against "
              "pretraining compute, pretraining loss, classifier accuracy curves, "
              "reconstructions).", "",
              "## What the table says", ""]
    lines += [f"- {text}" for text in findings(results)]
    lines += ["", "## Which pretraining for my budget?", "", _budget_caption(results), ""]
    lines += [f"- {text}" for text in budget(results)]
    lines.append("")
    return "\n".join(lines)


def _labels_caption(results: dict) -> str:
    fraction = results.get("label_fraction", 1.0)
    if fraction >= 1:
        return "Classifiers train on every training label."
    n = results.get("n_train_labelled")
    return (f"Classifiers train on {fraction:.0%} of the training labels"
            f"{f' ({n:,} images, stratified)' if n else ''}; pretraining used every training "
            "image without labels.")


def _acc(cell: dict) -> tuple[float, float]:
    return cell["test_acc"], cell.get("test_acc_std", 0.0)


def _versus(a: tuple[float, float], b: tuple[float, float], n_seeds: int) -> str:
    """How a gap compares with the seeds' spread."""
    if n_seeds < 2:
        return "one seed, so no spread to compare with"
    if within_spread(a, b):
        return "within the seeds' spread (not significant)"
    return "larger than the seeds' spread"


def findings(results: dict) -> list[str]:
    """One generated sentence per mode: which pretraining wins it, by how much, and whether
    that exceeds the spread over seeds; pretrained modes are also set against `scratch`."""
    rows, n = results["results"], len(results["seeds"])
    lines = []
    for mode in results["modes"]:
        ranked = sorted(rows, key=lambda v: rows[v][mode]["test_acc"], reverse=True)
        best = ranked[0]
        a = _acc(rows[best][mode])
        text = f"**{mode}**: {best} is best with {a[0]:.3f}"
        if n > 1:
            text += f" ± {a[1]:.3f}"
        if len(ranked) > 1:
            b = _acc(rows[ranked[1]][mode])
            text += (f", {a[0] - b[0]:+.3f} over {ranked[1]} ({b[0]:.3f}): "
                     f"{_versus(a, b, n)}")
        if mode != "scratch" and "scratch" in results["modes"]:
            s = _acc(rows[best]["scratch"])
            text += (f". Against {best} trained from scratch ({s[0]:.3f}) its pretraining "
                     f"gains {a[0] - s[0]:+.3f}, {_versus(a, s, n)}")
        lines.append(text + ".")
    rising = [f"{v} {m} ({c['late_val_acc_gain']:+.3f})" for v, row in rows.items()
              for m, c in row.items() if c.get("late_val_acc_gain", 0.0) > STILL_RISING_ACC]
    if rising:
        lines.append(f"Still rising when training ended (mean validation accuracy of the last "
                     f"fifth of the epochs minus the fifth before, over {STILL_RISING_ACC}): "
                     f"{', '.join(rising)}; more classifier epochs would raise these cells.")
    falling = [f"{v} ({p['late_val_loss_change']:+.1%})"
               for v, p in results.get("pretrain", {}).items()
               if p.get("late_val_loss_change", 0.0) < -STILL_FALLING_LOSS]
    if falling:
        lines.append(f"Pretraining loss still falling at the end (by more than "
                     f"{STILL_FALLING_LOSS:.0%} over the last fifth of the epochs): "
                     f"{', '.join(falling)}; longer pretraining may change these rows.")
    if not rising and not falling and any("late_val_acc_gain" in c for row in rows.values()
                                          for c in row.values()):
        lines.append("Every classifier's validation accuracy and every pretraining loss had "
                     "stopped moving by the end of training (by the measures above).")
    chance = results.get("chance_acc")
    if chance is not None:
        weak = [v for v in rows if max(rows[v][m]["test_acc"] for m in results["modes"])
                < 2 * chance]
        if weak:
            lines.append(f"Rows whose best cell is under twice chance ({2 * chance:.2f}): "
                         f"{', '.join(weak)}; read them as untrained, not as a ranking.")
    return lines


def _budget_caption(results: dict) -> str:
    rule = ("a mean at least the best's mean minus the best's std over seeds"
            if len(results["seeds"]) > 1 else
            "one seed, so no spread: only a tie with the best")
    return ("Pretraining compute is the counted TFLOP of one seed's whole pretraining run "
            f"(wall-clock: seconds per seed, {machine(results)}). "
            f"\"Within one std\" of a mode's best variant means {rule}. The Pareto front "
            "holds the variants no other variant beats on both cost and mean accuracy. "
            "Figure: `reports/figures/accuracy_vs_compute.png`.")


def _relative(cost: float, reference: float) -> str:
    """`cost` against `reference` as a factor: '12x less', '1.5x more' or 'the same'."""
    if cost == reference:
        return "the same"
    return f"{reference / cost:.3g}x less" if cost < reference else f"{cost / reference:.3g}x more"


def best_scratch(results: dict) -> str | None:
    """The variant with the best `scratch` accuracy: the no-pretraining baseline."""
    if "scratch" not in results["modes"]:
        return None
    rows = results["results"]
    return max(rows, key=lambda v: rows[v]["scratch"]["test_acc"])


def budget(results: dict) -> list[str]:
    """Generated answer to "which pretraining for my budget?": per pretrained mode, the best
    variant, the one with the fewest pretraining FLOPs within one std of it, and the
    Pareto front; set against the best variant trained without pretraining."""
    rows, pretrain, n = results["results"], results["pretrain"], len(results["seeds"])
    lines, fronts = [], pareto_fronts(results, "train_tflops_total")
    base = best_scratch(results)
    if base is not None:
        s = _acc(rows[base]["scratch"])
        lines.append(f"**No pretraining**: the best `scratch` variant is {base} with "
                     f"{_cell(*s, n)}, the baseline each mode's best is set against below.")
    for mode, front in fronts.items():
        best = max(rows, key=lambda v: rows[v][mode]["test_acc"])
        a = _acc(rows[best][mode])
        close = [v for v in rows if rows[v][mode]["test_acc"] >= a[0] - a[1]]
        cheap = min(close, key=lambda v: (pretrain[v]["train_tflops_total"],
                                          -rows[v][mode]["test_acc"], v))
        flops, seconds = pretrain[best]["train_tflops_total"], pretrain[best]["train_seconds"]
        text = f"**{mode}**: {best} is best with {_cell(*a, n)} ({flops:.3g} TFLOP per seed); "
        if cheap == best:
            text += "no cheaper variant comes within one std of it"
        else:
            c = pretrain[cheap]
            text += (f"the cheapest within one std of it is {cheap} with "
                     f"{_cell(*_acc(rows[cheap][mode]), n)}, at "
                     f"{_relative(c['train_tflops_total'], flops)} pretraining compute "
                     f"({c['train_tflops_total']:.3g} TFLOP) and "
                     f"{_relative(c['train_seconds'], seconds)} wall-clock")
        text += f". Pareto front by FLOPs, cheapest first: {', '.join(front)}"
        if base is not None:
            text += (f". Against the no-pretraining baseline its best gains "
                     f"{a[0] - s[0]:+.3f}, {_versus(a, s, n)}")
        lines.append(text + ".")
    return lines


def late_changes(pretrain_histories: dict[str, list[dict]],
                 classify_histories: dict[str, dict[str, list[dict]]]
                 ) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """({(variant, mode): late validation-accuracy gain}, {variant: late relative change of
    the pretraining validation loss}) (aelab.stats.late_change)."""
    acc = {(v, m): late_change(rows, "val_acc")
           for v, modes in classify_histories.items() for m, rows in modes.items()}
    loss = {v: late_change(rows, "val_loss", relative=True)
            for v, rows in pretrain_histories.items()}
    return acc, loss


def dvc_metrics(results: dict) -> dict:
    """The numbers `dvc exp show` / `dvc metrics` show (numbers only, one column each):
    test accuracy mean and std per variant and mode, and the pretrained encoders' kNN."""
    cells = results["results"]
    return {"test_acc": {v: {m: c["test_acc"] for m, c in row.items()} for v, row in cells.items()},
            "test_acc_std": {v: {m: c["test_acc_std"] for m, c in row.items()}
                             for v, row in cells.items()},
            "knn_test_acc": {v: k["pretrained"]["test_acc"] for v, k in results["knn"].items()}}


def run_report(cfg: Config, test_json: Path, pretrain_dir: Path, classify_dir: Path,
               out_json: Path, out_md: Path, figures_dir: Path,
               out_metrics: Path | None = None) -> dict:
    """Write results.json, results.md, reports/figures and (for DVC) the metrics file; log them
    to MLflow."""
    trained = classifier_metrics(cfg, classify_dir)
    pretrain_histories = {v: read_history(pretrain_dir / v / "history.csv") for v in cfg.variants}
    classify_histories = {v: {m: read_history(layout.history_csv(
        layout.classify_reports_in(classify_dir, v, m), m)) for m in cfg.modes}
        for v in cfg.variants}
    late_acc, late_loss = late_changes(pretrain_histories, classify_histories)
    results = build_results(cfg, read_json(test_json), pretrain_dir, trained, late_acc,
                            late_loss)
    # Each classifier's training run gets its test metrics (a run not in this MLflow store,
    # e.g. restored from DVC's cache, is skipped). The agent writes them on the other core while
    # the figures are drawn; the stage's tracking.close() waits for them (and raises if it failed).
    for (variant, mode), metrics in trained.items():
        cell = results["results"][variant][mode]
        for seed, run in metrics["per_seed"].items():
            tracking.log_to_run(run["mlflow_run_id"], {
                "test_acc": cell["test_acc_per_seed"][seed],
                "test_loss": cell["test_loss_per_seed"][seed]})
    figures_dir.mkdir(parents=True, exist_ok=True)
    table = {v: {m: c["test_acc"] for m, c in row.items()} for v, row in results["results"].items()}
    errors = {v: {m: c["test_acc_std"] for m, c in row.items()}
              for v, row in results["results"].items()}
    labels = "" if cfg.label_fraction >= 1 else f", {cfg.label_fraction:.0%} of labels"
    accuracy_bars(table, results["modes"], figures_dir / "test_accuracy.png",
                  f"Test accuracy per variant and mode ({cfg.dataset}, "
                  f"{len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''}{labels})", errors,
                  chance=results["chance_acc"])
    modes = pretrained_modes(results)
    if modes:
        base, where = best_scratch(results), machine(results)
        accuracy_vs_compute(
            {m: {v: _acc(row[m]) for v, row in results["results"].items()} for m in modes},
            {label.format(machine=where): {v: p[cost] for v, p in results["pretrain"].items()}
             for cost, (_, label) in COSTS.items()},
            {label.format(machine=where): results[key] for key, label in COSTS.values()},
            figures_dir / "accuracy_vs_compute.png",
            f"Test accuracy against pretraining compute ({cfg.dataset}, mean ± std over "
            f"{len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''}{labels}); "
            "black: Pareto front",
            baseline=None if base is None else (
                f"no pretraining (scratch, best variant: {base})",
                *_acc(results["results"][base]["scratch"])))
    loss_curves(pretrain_histories, figures_dir / "pretrain_loss.png",
                f"Pretraining loss ({cfg.dataset})")
    for variant in cfg.variants:
        accuracy_curves(classify_histories[variant], figures_dir / f"accuracy_{variant}.png",
                        f"{variant}: classifier accuracy ({cfg.dataset})")
        samples = torch.load(pretrain_dir / variant / "reconstructions.pt", weights_only=True)
        reconstruction_grid(samples["originals"], samples["reconstructions"], samples["mask"],
                            figures_dir / f"reconstructions_{variant}.png", samples["title"])
    write_json(out_json, results)
    if out_metrics is not None:
        write_json(out_metrics, dvc_metrics(results))
    with atomic_path(out_md) as tmp:
        tmp.write_text(render_markdown(results))

    with tracking.stage_run("report", stage="report", dataset=cfg.dataset,
                            params={"variants": list(cfg.variants), "modes": list(cfg.modes),
                                    "label_fraction": cfg.label_fraction}) as run:
        run.log_metrics({f"test_acc.{v}.{m}": a for v, row in table.items()
                         for m, a in row.items()})
        run.log_artifacts((out_json, out_md, *sorted(figures_dir.glob("*.png"))))
    return results
