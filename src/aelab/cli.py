"""What the stage scripts share: turning expected failures into one clear line and exit 1.

Light on purpose (click and the standard library): a stage imports torch and its step module
inside its command, after starting the tracking agent, so MLflow loads on the other core while
torch loads here.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn

import click

from aelab import timeline as stage_timeline, tracking
from aelab.quick_exit import quick_exit


def _expected_errors() -> tuple[type[BaseException], ...]:
    errors = [tracking.TrackingError, ValueError]  # ValueError: bad model options, ConfigError
    # The others are defined in modules that import torch: only those already imported can
    # have been raised.
    for module, name in (("aelab.checkpoint", "CheckpointError"),
                         ("aelab.training", "TrainingError"), ("aelab.data.errors", "DataError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def process_start() -> float | None:
    """When this process started (time.time() scale), from /proc; None where there is none.

    /proc/self/stat gives the start in clock ticks since boot; the time since boot comes from
    CLOCK_BOOTTIME (the same clock), not /proc/stat's btime, which is rounded to whole seconds.
    """
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def report_timing(name: str) -> None:
    """One stderr line: start-up (process start to first batch), training, wind-down (last
    batch to exit, tracking included), or the whole run for a stage that trains nothing; then
    what part of them went to loading the data (in start-up), validation (in training; with
    seed workers, their mean) and waiting for MLflow (mostly in wind-down). The README's
    per-stage breakdown and `make bench` are built from these."""
    timeline = stage_timeline.TIMELINE
    start, now = process_start(), time.time()
    if start is None or os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 speaks
        return
    parts: dict[str, float] = {}  # timeline.phase's, this process's and its workers' mean
    workers = max(1, timeline.get("workers", 0))
    for key, seconds in timeline.items():
        if key not in ("first_batch", "last_batch", "workers"):
            part = key.removeprefix("workers:")
            parts[part] = parts.get(part, 0.0) + (seconds / workers if part != key else seconds)
    waits_last = sorted(parts, key=lambda p: p == "MLflow wait")  # mostly in the wind-down
    of_which = ", ".join(f"{p} {parts[p]:.2f} s" for p in waits_last if parts[p] > 0)
    of_which = f"; of which {of_which}" if of_which else ""
    if "first_batch" not in timeline:
        click.echo(f"{name} timing: {now - start:.2f} s (no training{of_which})", err=True)
        return
    click.echo(f"{name} timing: start-up {timeline['first_batch'] - start:.2f} s, training "
               f"{timeline['last_batch'] - timeline['first_batch']:.2f} s, wind-down "
               f"{now - timeline['last_batch']:.2f} s{of_which}", err=True)


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    ctx.meta["aelab_debug"] = value


debug_option = click.option("--debug", is_flag=True, expose_value=False, callback=_set_debug,
                            help="Show the full traceback of an error (or set AELAB_DEBUG=1).")


def stage_errors(fn: Callable) -> Callable:
    """Decorator for a click command: expected errors become `Error: <one line>`, exit 1; adds
    `--debug` (or set AELAB_DEBUG=1) for the full traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            tracking.close()  # every run written, or a TrackingError
            if "aelab.distributed" in sys.modules:
                sys.modules["aelab.distributed"].finish()
            report_timing(click.get_current_context().command_path)
            return result
        except SystemExit as done:
            if done.code:  # e.g. launch_distributed's workers' status
                remove_outputs()
            raise
        except BaseException as err:
            tracking.abort()
            remove_outputs()  # all or nothing: no partial output that looks complete
            if not isinstance(err, _expected_errors()):
                raise
            if os.environ.get("AELAB_DEBUG") or click.get_current_context().meta.get(
                    "aelab_debug"):  # full traceback when investigating
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise click.ClickException(message) from None

    return debug_option(wrapper)


def run(command: click.Command) -> NoReturn:
    """A stage script's main: run `command` as click would, then end the process without the
    interpreter's teardown (aelab.quick_exit), with the status click gave. An unexpected error
    (a traceback) takes the normal way out."""
    try:
        command.main()
    except SystemExit as done:  # click's standalone mode always ends this way
        quick_exit(done.code)
    quick_exit(0)


def path_option(flag: str, dest: str, help: str) -> Callable:
    """A required path option: paths live in dvc.yaml, the stage scripts take them as options."""
    return click.option(flag, dest, required=True, type=click.Path(path_type=Path), help=help)


def output_option(flag: str, dest: str, help: str) -> Callable:
    """A path option naming one of the stage's outputs (a DVC out): removed if the stage fails,
    so a failed stage never leaves files that look like a result."""

    def remember(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
        ctx.meta.setdefault("aelab_outputs", []).append(value)
        return value

    return click.option(flag, dest, required=True, type=click.Path(path_type=Path), help=help,
                        callback=remember)


def remove_outputs() -> None:
    """Delete the current stage's outputs (output_option), on rank 0 / the only process. Never
    the working directory or one of its parents, and links themselves, not what they point to."""
    import shutil

    ctx = click.get_current_context(silent=True)
    if ctx is None or os.environ.get("RANK", "0") != "0":
        return
    cwd = Path.cwd().resolve()
    for path in ctx.meta.get("aelab_outputs", []):
        if path.resolve() == cwd or path.resolve() in cwd.parents:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()


def launch_distributed(devices: int) -> None:
    """With `runtime.devices` > 1, run this stage again under torchrun (one process per device,
    aelab.distributed) and exit with its status; inside torchrun, or with one device, return."""
    if devices <= 1 or os.environ.get("LOCAL_RANK") is not None:
        return
    from aelab import distributed

    tracking.abort()  # rank 0 of the group logs; this launcher does not
    status = distributed.relaunch(devices)
    if status:
        raise click.ClickException(f"the {devices} torchrun processes failed (exit {status}); "
                                   "their errors are above")
    raise SystemExit(0)


params_option = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             type=click.Path(path_type=Path), help="Validated params file.")
data_option = path_option("--data", "data_dir", "Prepared dataset directory.")
variant_option = click.option("--variant", required=True,
                              help="Key under `variants` in params.yaml.")
