"""Seeds in parallel on a CPU: `runtime.seed_workers` forked processes, one seed each.

A small model's step on a CPU does not keep two cores busy: its convolutions and matrix
products are too small to split well, and the Python between them runs on one core. Two
processes with one thread each train two seeds about 1.2-1.5 times faster than one process with
two threads does one after the other (README "Seed workers"). So a training stage on a CPU with
`runtime.seed_workers` > 1 forks one worker per seed (at most that many at once), each with the
cores divided among them, after the data and the initial weights are loaded: the workers share
them, and start in milliseconds (no imports).

What a worker computes is exactly the serial loop's work for its seed (the same function, the
same seeded random streams); it returns its results to the stage process, which writes every
output, as before. A worker's tracking requests go to the stage process too
(aelab.tracking.relay), which passes them on to its one MLflow agent in the order each worker
sent them. Per-batch progress bars are off in the workers (two processes cannot share a
terminal line); each epoch still prints its line, with the seed in its name.

With one worker, on a GPU, or under torchrun, `map_seeds` is the plain loop in this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing
import pickle
import signal
import uuid
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

import torch

from aelab import distributed, tracking, training
from aelab import timeline as stage_timeline


class WorkerError(RuntimeError):
    """A seed worker died or failed in a way that could not be sent back; one line."""


def worker_count(requested: int, seeds: Sequence[int], device: torch.device) -> int:
    """How many seed workers to fork: `requested`, at most one per seed, and none (1: train in
    this process) on a GPU, under torchrun, or where fork is unavailable."""
    if (device.type != "cpu" or distributed.active()
            or "fork" not in multiprocessing.get_all_start_methods()):
        return 1
    return max(1, min(requested, len(seeds)))


def map_seeds(fn: Callable[[int], Any], seeds: Sequence[int], *, workers: int) -> dict[int, Any]:
    """{seed: fn(seed)} for every seed, in order; `workers` > 1: in forked processes (see the
    module docstring), at most `workers` at once. The first failure stops the others and is
    raised here (the worker's own exception where it can be sent back)."""
    if workers <= 1:
        return {seed: fn(seed) for seed in seeds}
    threads = training.worker_threads(workers)
    call = uuid.uuid4().hex[:8]  # run keys unique across calls (each fork copies the counter)
    ctx = multiprocessing.get_context("fork")
    pending, running, results = list(seeds), {}, {}
    open_runs: dict[int, list[str]] = {}  # per seed: MLflow runs started and not yet ended
    try:
        while pending or running:
            while pending and len(running) < workers:
                seed = pending.pop(0)
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, name=f"aelab-seed{seed}", daemon=True,
                                   args=(fn, seed, threads, send, f"{call}-seed{seed}-"))
                proc.start()
                send.close()  # the worker holds the only write end: its exit is our EOF
                running[receive] = (seed, proc)
            for conn in wait(list(running)):
                seed, proc = running[conn]
                try:
                    kind, payload = pickle.loads(conn.recv_bytes())
                except EOFError:
                    proc.join()
                    raise WorkerError(f"the worker training seed {seed} died (exit code "
                                      f"{proc.exitcode}) before sending its results") from None
                if kind == "track":
                    tracking.forward(payload)
                    runs = open_runs.setdefault(seed, [])
                    if payload["op"] == "start":
                        runs.append(payload["key"])
                    elif payload["op"] == "end" and payload["key"] in runs:
                        runs.remove(payload["key"])
                elif kind == "error":
                    raise payload
                else:  # done
                    results[seed], timeline = payload
                    _merge_timeline(timeline)
                    conn.close()
                    proc.join()
                    del running[conn]
    finally:
        for conn, (seed, proc) in running.items():  # after a failure: stop the others
            proc.kill()
            proc.join()
            conn.close()
            for key in open_runs.get(seed, ()):  # their runs end KILLED, not RUNNING forever
                with contextlib.suppress(tracking.TrackingError):
                    tracking.forward({"op": "end", "key": key, "status": "KILLED"})
    return {seed: results[seed] for seed in seeds}


def _worker(fn: Callable[[int], Any], seed: int, threads: int, conn, key_prefix: str) -> None:
    """A forked worker: train `seed` with `threads` threads, relaying tracking (run keys
    starting with `key_prefix`), and send ("done", (result, timeline)) or ("error", exception)
    back."""
    _die_with_parent()
    torch.set_num_threads(threads)
    training.PROGRESS_BARS = False
    stage_timeline.TIMELINE.clear()
    tracking.relay(lambda request: conn.send_bytes(pickle.dumps(("track", request))),
                   key_prefix=key_prefix)
    try:
        message = ("done", (fn(seed), dict(stage_timeline.TIMELINE)))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the stage
        message = ("error", err)
    try:
        data = pickle.dumps(message)
        pickle.loads(data)  # an exception class whose arguments do not round-trip fails here
    except Exception as err:
        text = (str(message[1]).splitlines() or [type(message[1]).__name__])[0] \
            if message[0] == "error" else f"its results cannot be sent back ({err})"
        data = pickle.dumps(("error", WorkerError(f"seed {seed}: {text}")))
    conn.send_bytes(data)
    conn.close()
    # multiprocessing ends a forked worker with os._exit: no atexit handlers run here (the
    # stage process's MLflow agent is not this process's to close).


def _die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the stage process dies (killed, out of memory), so
    no orphan goes on training. Elsewhere a no-op: an orphan stops at its next tracking write."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _merge_timeline(timeline: dict[str, float]) -> None:
    """A worker's first and last batch, and its seconds per phase (aelab.timeline.phase), into
    this process's TIMELINE (the stage's timing line): the phases as `workers:<phase>`, summed over
    workers, with their number in `workers` (the line shows the mean: the workers run at once)."""
    current = stage_timeline.TIMELINE
    if "first_batch" in timeline:
        current["first_batch"] = min(current.get("first_batch", timeline["first_batch"]),
                                     timeline["first_batch"])
        current["last_batch"] = max(current.get("last_batch", timeline["last_batch"]),
                                    timeline["last_batch"])
    current["workers"] = current.get("workers", 0) + 1
    for name, seconds in timeline.items():
        if name not in ("first_batch", "last_batch"):
            current[f"workers:{name}"] = current.get(f"workers:{name}", 0.0) + seconds
