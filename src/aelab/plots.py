"""Every figure of the project: loss curves, accuracy curves, reconstructions, the bar chart,
accuracy against pretraining compute."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: stages run under DVC with no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from aelab.checkpoint import atomic_path  # noqa: E402


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def _to_image_row(images: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] in [-1,1] -> one HxNW RGB strip in [0,1] with 1-px white gaps."""
    images = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    n, _, h, w = images.shape
    strip = torch.ones(3, h, n * (w + 1) - 1)
    for i in range(n):
        strip[:, :, i * (w + 1):i * (w + 1) + w] = images[i]
    return strip.permute(1, 2, 0).numpy()


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor,
                        mask: torch.Tensor | None, path: str | Path, title: str) -> None:
    """Originals above reconstructions; with a mask (MAE) also the masked input, and the
    reconstruction shows visible patches pasted back as in the MAE paper's figures."""
    rows = [("original", originals)]
    if mask is not None:
        grey = torch.full_like(originals, 0.0)  # mid-grey in [-1, 1]
        rows.append(("masked input", originals * (1 - mask) + grey * mask))
        rows.append(("reconstruction", reconstructions))
        rows.append(("reconstruction + visible", originals * (1 - mask) + reconstructions * mask))
    else:
        rows.append(("reconstruction", reconstructions))
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.7 * len(originals) + 1, 1.0 * len(rows)))
    for ax, (label, images) in zip(np.atleast_1d(axes), rows):
        ax.imshow(_to_image_row(images), interpolation="nearest")
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _curves(histories: Mapping[str, Sequence[Mapping]], metric: str, path: str | Path,
            title: str, ylabel: str, log: bool) -> None:
    """train_<metric> (solid) and val_<metric> (dashed) per epoch, one colour per run."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, rows) in enumerate(histories.items()):
        epochs = [r["epoch"] for r in rows]
        colour = f"C{i % 10}"
        ax.plot(epochs, [r[f"train_{metric}"] for r in rows], color=colour, label=f"{label} train")
        ax.plot(epochs, [r[f"val_{metric}"] for r in rows], color=colour, linestyle="--",
                label=f"{label} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def loss_curves(histories: Mapping[str, Sequence[Mapping]], path: str | Path, title: str) -> None:
    """Pretraining: train and validation reconstruction loss per epoch (log scale)."""
    _curves(histories, "loss", path, title, "reconstruction loss", log=True)


def accuracy_curves(histories: Mapping[str, Sequence[Mapping]], path: str | Path,
                    title: str) -> None:
    """Classifiers: train and validation accuracy per epoch, one colour per mode."""
    _curves(histories, "acc", path, title, "accuracy", log=False)


def accuracy_bars(table: Mapping[str, Mapping[str, float]], modes: Sequence[str],
                  path: str | Path, title: str,
                  errors: Mapping[str, Mapping[str, float]] | None = None,
                  chance: float | None = None) -> None:
    """Grouped bars: one group per variant, one bar per mode (test accuracy, ± std if given),
    and a dashed line at the chance accuracy if given."""
    variants = list(table)
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(1.6 * len(variants) + 2, 4))
    x = np.arange(len(variants))
    for j, mode in enumerate(modes):
        values = [table[v].get(mode, np.nan) for v in variants]
        err = [errors[v].get(mode, 0.0) for v in variants] if errors else None
        ax.bar(x + (j - (len(modes) - 1) / 2) * width, values, width, label=mode, yerr=err,
               capsize=2)
    if chance is not None:
        ax.axhline(chance, color="black", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, variants)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(modes) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    _save(fig, path)


def accuracy_vs_compute(accuracy: Mapping[str, Mapping[str, tuple[float, float]]],
                        costs: Mapping[str, Mapping[str, float]],
                        fronts: Mapping[str, Mapping[str, Sequence[str]]],
                        path: str | Path, title: str,
                        baseline: tuple[str, float, float] | None = None) -> None:
    """One row per mode ({mode: {variant: (mean, std)}}), one column per cost measure
    ({axis label: {variant: cost}}): each variant's test accuracy ± std against its cost (log
    axis), that measure's Pareto front ({axis label: {mode: variants}}) joined in black, and
    `baseline` (label, mean, std) as a dashed line in a band, the accuracy without any cost."""
    modes, measures = list(accuracy), list(costs)
    variants = list(next(iter(accuracy.values())))
    colours = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig, axes = plt.subplots(len(modes), len(measures), squeeze=False, sharey="row",
                             figsize=(5.5 * len(measures), 3.2 * len(modes)))
    for row, mode in zip(axes, modes):
        for ax, measure in zip(row, measures):
            for v in variants:
                mean, std = accuracy[mode][v]
                ax.errorbar(costs[measure][v], mean, yerr=std, fmt="o", color=colours[v],
                            capsize=3, label=v)
                ax.annotate(v, (costs[measure][v], mean), textcoords="offset points",
                            xytext=(5, 4), fontsize=7)
            front = fronts[measure][mode]
            ax.plot([costs[measure][v] for v in front], [accuracy[mode][v][0] for v in front],
                    color="black", linewidth=1, marker="o", markerfacecolor="none",
                    markersize=11, zorder=3, label="Pareto front")
            if baseline is not None:
                label, mean, std = baseline
                ax.axhline(mean, color="grey", linestyle="--", linewidth=1, label=label)
                ax.axhspan(mean - std, mean + std, color="grey", alpha=0.15, linewidth=0)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))  # labels even
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # within one decade
            ax.set_title(mode, fontsize=9)
            ax.set_xlabel(measure, fontsize=8)
            ax.grid(alpha=0.3, which="both")
        row[0].set_ylabel("test accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.legend(handles, labels, fontsize=7, ncol=min(len(labels), 4), loc="upper center",
               bbox_to_anchor=(0.5, 0))  # below the panels; the tight bounding box keeps it
    _save(fig, path)
