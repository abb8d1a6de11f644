"""What the stage scripts share: turning expected failures into one clear line and exit 1."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

import click

from aelab.checkpoint import CheckpointError
from aelab.config import ConfigError
from aelab.training import TrainingError


def _expected_errors() -> tuple[type[BaseException], ...]:
    from aelab.data import DataError

    # ValueError covers bad model options raised by the model constructors.
    return (ConfigError, CheckpointError, TrainingError, DataError, ValueError)


def stage_errors(fn: Callable) -> Callable:
    """Decorator for a click command: expected errors become `Error: <one line>`, exit 1
    (set AELAB_DEBUG=1 for the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _expected_errors() as err:
            if os.environ.get("AELAB_DEBUG"):  # full traceback when investigating
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise click.ClickException(message) from None

    return wrapper


def path_option(flag: str, dest: str, help: str) -> Callable:
    """A required path option: paths live in dvc.yaml, the stage scripts take them as options."""
    return click.option(flag, dest, required=True, type=click.Path(path_type=Path), help=help)


params_option = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             type=click.Path(path_type=Path), help="Validated params file.")
data_option = path_option("--data", "data_dir", "Prepared dataset directory.")
variant_option = click.option("--variant", required=True,
                              help="Key under `variants` in params.yaml.")
