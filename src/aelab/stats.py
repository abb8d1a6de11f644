"""Summaries over repeated seeds."""

from __future__ import annotations

from typing import Iterable, Mapping


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((x - mean) ** 2 for x in values) / (len(values) - 1)) ** 0.5


def summarise(per_seed: Mapping[str, float], key: str) -> dict:
    """{key: mean, key_std: std, key_per_seed: {seed: value}}."""
    mean, std = mean_std(per_seed.values())
    return {key: mean, f"{key}_std": std, f"{key}_per_seed": dict(per_seed)}


def within_spread(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """True when two (mean, std) differ by less than their combined spread (std_a + std_b):
    the difference is not significant. Never true with zero spread (one seed): untested."""
    spread = a[1] + b[1]
    return spread > 0 and abs(a[0] - b[0]) < spread


def late_change(rows: Iterable[Mapping[str, float]], key: str, relative: bool = False) -> float:
    """How much `key` still moved at the end of training: the mean over the last fifth of the
    epochs minus the mean over the fifth before it (divided by the latter with `relative`),
    averaged over seeds (rows carry `seed` and `epoch`, as the history CSVs do). Near 0 on a
    plateau; fewer than 2 epochs give 0."""
    by_seed: dict[float, list[tuple[int, float]]] = {}
    for row in rows:
        by_seed.setdefault(row.get("seed", 0), []).append((row["epoch"], row[key]))
    changes = []
    for points in by_seed.values():
        values = [v for _, v in sorted(points)]
        tail = max(1, len(values) // 5)
        if len(values) < 2 * tail:
            changes.append(0.0)
            continue
        last, before = sum(values[-tail:]) / tail, sum(values[-2 * tail:-tail]) / tail
        change = last - before
        changes.append(change / before if relative and before else change)
    return sum(changes) / len(changes) if changes else 0.0
