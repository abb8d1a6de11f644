"""Where a stage's time goes, for its timing line (aelab.cli.report_timing): the wall-clock
(time.time()) of its first and last training batch, and the seconds spent in named phases.

torch-free, so the tracking client (which must not import torch) records its waits here too.
Phases: "data load" (in start-up), "validation" (in training), "MLflow wait" (mostly in
wind-down); seed workers' phases arrive as "workers:<phase>" (aelab.parallel).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

TIMELINE: dict[str, float] = {}


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the seconds the block takes to TIMELINE[name]."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        TIMELINE[name] = TIMELINE.get(name, 0.0) + time.perf_counter() - t0
