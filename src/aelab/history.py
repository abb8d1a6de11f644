"""Per-epoch history as CSV (what `dvc plots` reads) and back."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping, Sequence

from aelab.checkpoint import atomic_path


def write_history(path: str | Path, rows: Sequence[Mapping[str, float]]) -> None:
    """Write history rows (same keys each) as CSV, atomically."""
    if not rows:
        raise ValueError(f"no history rows to write to {path}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def read_history(path: str | Path) -> list[dict[str, float]]:
    """Read a history CSV written by write_history (numbers as float, epoch as int)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in rows]
