"""What the stage scripts share: turning expected failures into one clear line and exit 1."""

from __future__ import annotations

import functools
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
    """Decorator for a click command: expected errors become `Error: <one line>`, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _expected_errors() as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise click.ClickException(message) from None

    return wrapper
