"""Checkpoints and small output files: written atomically, loaded with weights_only=True."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint; str(e) is one line."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict) -> None:
    """Save weights plus a JSON-able `meta` (the config that built them)."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state_dict, "meta": meta}, tmp)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load (state_dict, meta) from a checkpoint written by save_checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (run its DVC stage first)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt zips/pickles
        raise CheckpointError(f"cannot read checkpoint {path}: {err}".splitlines()[0]) from None
    if not isinstance(blob, dict) or "state_dict" not in blob or "meta" not in blob:
        raise CheckpointError(f"{path} is not an aelab checkpoint (no state_dict/meta)")
    return blob["state_dict"], blob["meta"]


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically, keys in insertion order (params order for tables)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, with a one-line error if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file: {path} (run the stage that writes it)")
    return json.loads(path.read_text())


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes (the same hash DVC records)."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
