"""Checkpoints and small output files: written atomically, loaded with weights_only=True."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A missing, unreadable, foreign or unwritable checkpoint or output file; str(e) is one
    line."""


def _write_error(path: Path, err: OSError) -> CheckpointError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(f"no space left on device while writing {path}; "
                               "free some space and rerun the stage")
    return CheckpointError(f"cannot write {path} ({err.strerror or err})")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; move it into place only if the block succeeds.

    The block only writes the temp file, so an OSError in it (a full disk: ENOSPC) is a
    one-line CheckpointError naming `path`; the temp file is removed and `path` left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise _write_error(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically, through a Python file object: torch's own file
    writer reports a full disk as an opaque RuntimeError, a Python file as OSError ENOSPC."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict) -> None:
    """Save weights plus a JSON-able `meta` (the config that built them)."""
    save_torch({"state_dict": state_dict, "meta": meta}, path)


def _load_error(path: Path, err: Exception) -> CheckpointError:
    """One line for a file that torch.load (weights only) refused or could not read."""
    if isinstance(err, pickle.UnpicklingError):  # the weights-only unpickler stopped
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:  # code, not weights
            return CheckpointError(f"refusing to load {path}: its pickle calls {found.group(1)} "
                                   "(checkpoints load with weights_only=True); delete it and "
                                   "rerun its stage")
        return CheckpointError(f"cannot read checkpoint {path}: not a torch.save file of "
                               "tensors (corrupt or foreign); rerun its stage")
    # The first sentence: torch goes on with advice that does not apply here.
    reason = str(err).strip().split("\n")[0].split(". ")[0] or type(err).__name__
    return CheckpointError(f"cannot read checkpoint {path}: {reason} (corrupt or truncated); "
                           "rerun its stage")


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load (state_dict, meta) from a checkpoint written by save_checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (run its DVC stage first)")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol: the error line says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt zips/pickles
        raise _load_error(path, err) from None
    if not isinstance(blob, dict) or "state_dict" not in blob or "meta" not in blob:
        raise CheckpointError(f"{path} is not an aelab checkpoint (no state_dict/meta)")
    return blob["state_dict"], blob["meta"]


def _names(keys: list[str], limit: int = 2) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _shape(tensor: Any) -> str:
    return "x".join(map(str, getattr(tensor, "shape", ()))) or "scalar"


def check_weights(module: nn.Module, state_dict: Mapping[str, Any], source: str | Path) -> None:
    """Raise a one-line CheckpointError unless `state_dict` has exactly `module`'s tensor names
    and shapes (`module` may live on the meta device: only its shapes are read)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    resized = [f"{k} is {_shape(state_dict[k])}, not {_shape(v)}" for k, v in own.items()
               if k in state_dict and _shape(state_dict[k]) != _shape(v)]
    parts = [f"{label}: {_names(keys)}" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatch", resized))
             if keys]
    if parts:
        raise CheckpointError(f"{source} holds weights of another architecture "
                              f"({'; '.join(parts)}); rerun the stage that writes it")


def load_weights(module: nn.Module, state_dict: Mapping[str, Any], source: str | Path) -> None:
    """`module.load_state_dict(state_dict)`, or a one-line CheckpointError naming `source` and
    what differs when the weights are of another architecture."""
    check_weights(module, state_dict, source)
    module.load_state_dict(state_dict)


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
