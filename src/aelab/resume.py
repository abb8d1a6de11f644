"""Resume checkpoints: a training run killed mid-way continues from its last saved epoch.

Every `runtime.checkpoint_every` epochs, and at its last epoch, a training run (one seed of a
pretraining, or one mode and seed of a classify stage) saves its whole `TrainState` (model,
optimiser, schedule position, grad scaler, RNG states, history), the best-so-far classifier, and
the run's progress to one file, atomically (a temp file renamed into place). Rerunning the stage
loads it and goes on from there: the same weights and metrics as a run never interrupted (CPU,
same seed), logged into the same MLflow run (found by its `resume_key` tag).

Where: `<repo>/.aelab/resume/<stage>/<run>-seed<s>-<fingerprint>.pt`, outside every DVC output
(DVC deletes a stage's outputs before running it again) and under the real repository for
temporary and queued experiments (DVC_ROOT). The fingerprint hashes everything the run's result
depends on: the model and training settings, the seed, the prepared data, the initial weights
and aelab's source code. A changed config looks for another file, so it can never resume from an
incompatible checkpoint. A stage deletes its resume files once its outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
from tqdm.auto import tqdm

import aelab
from aelab import distributed
from aelab.checkpoint import save_torch
from aelab.config import AugmentConfig, TrainConfig
from aelab.training import Batches, TrainingError, TrainState, fit

_SOURCE_DIGEST: list[str] = []


class Stateful(Protocol):
    def get_state(self) -> Any: ...

    def set_state(self, saved: Any) -> None: ...


def resume_root() -> Path:
    """AELAB_RESUME_DIR, else <repo>/.aelab/resume (repo: DVC_ROOT or the git top level)."""
    if os.environ.get("AELAB_RESUME_DIR"):
        return Path(os.environ["AELAB_RESUME_DIR"])
    from aelab.tracking import repo_root

    return repo_root() / ".aelab" / "resume"


def source_digest() -> str:
    """md5 over aelab's Python source: a code change never resumes an older run."""
    if not _SOURCE_DIGEST:
        digest = hashlib.md5()
        package = Path(aelab.__file__).parent
        for path in sorted(package.rglob("*.py")):
            digest.update(str(path.relative_to(package)).encode())
            digest.update(path.read_bytes())
        _SOURCE_DIGEST.append(digest.hexdigest())
    return _SOURCE_DIGEST[0]


def fingerprint(**parts: Any) -> str:
    """A stable hash of JSON-able `parts` plus the source digest."""
    blob = json.dumps({**parts, "source": source_digest()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ResumePoint:
    """One training run's resume file: `load()` what a killed run left, `restore()` it into a
    fresh TrainState, and (as an epoch hook, last in the list) save every `every` epochs."""

    def __init__(self, stage: str, run: str, seed: int, parts: dict, *, every: int,
                 epochs: int, extras: dict[str, Stateful] | None = None) -> None:
        self.fingerprint = fingerprint(stage=stage, run=run, seed=seed, **parts)
        self.path = resume_root() / stage / f"{run}-seed{seed}-{self.fingerprint}.pt"
        self.every, self.epochs = every, epochs
        self.extras = extras or {}
        self.label = f"{stage}/{run}/seed{seed}"
        self.key = f"{stage}/{run}/seed{seed}/{self.fingerprint}"  # tags the MLflow run
        self.saved: dict | None = None
        self.saved_epoch = 0

    def load(self) -> dict | None:
        """The saved run, or None (nothing saved, resume off, or unreadable: start over)."""
        if self.every <= 0:
            return None
        if not self.path.is_file():
            for other in self.path.parent.glob(f"{self.path.name.rsplit('-', 1)[0]}-*.pt"):
                tqdm.write(f"{self.label}: not resuming from {other} (other settings, data or "
                           "code; delete it when no longer needed)")
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a torn or foreign file: say so, start over
            tqdm.write(f"{self.label}: ignoring unreadable resume checkpoint {self.path} "
                       f"({str(err).splitlines()[0] if str(err) else type(err).__name__})")
            return None
        if blob.get("fingerprint") != self.fingerprint:
            return None
        self.saved, self.saved_epoch = blob, int(blob["state"]["epoch"])
        return blob

    def restore(self, state: TrainState) -> None:
        """Load what `load()` found into `state` and the extras; one line says so."""
        if self.saved is None:
            return
        state.load_state_dict(self.saved["state"])
        for name, extra in self.extras.items():
            extra.set_state(self.saved["extras"][name])
        done = state.epoch >= self.epochs
        tqdm.write(f"{self.label}: " + (
            f"finished before the interruption (epoch {state.epoch}/{self.epochs}), restored"
            if done else f"resuming from epoch {state.epoch}/{self.epochs} ({self.path})"))

    def __call__(self, state: TrainState, row: dict) -> None:
        """Epoch hook: save at every `every`-th epoch and the last (rank 0 only)."""
        if self.every <= 0 or not distributed.is_main():
            return
        if state.epoch % self.every and state.epoch < self.epochs:
            return
        blob = {"fingerprint": self.fingerprint, "state": state.state_dict(),
                "extras": {name: extra.get_state() for name, extra in self.extras.items()}}
        save_torch(blob, self.path)
        self.saved_epoch = state.epoch

    def describe(self) -> str:
        """Where the last good state is, for error messages."""
        if self.every <= 0:
            return "resume checkpoints are off (runtime.checkpoint_every: 0)"
        if not self.saved_epoch:
            return "no resume checkpoint was saved yet"
        return f"last good checkpoint: epoch {self.saved_epoch}, {self.path}"

    def detach(self) -> "ResumePoint":
        """This point after its run: without the saved state and the extras (model-sized),
        so a seed worker can send it back for `remove_all`."""
        self.saved, self.extras = None, {}
        return self

    def remove(self) -> None:
        if distributed.is_main():
            self.path.unlink(missing_ok=True)


def fit_resumable(state: TrainState, train: Batches, val: Batches | None, cfg: TrainConfig, *,
                  device: torch.device, name: str, hooks=(), resume: ResumePoint | None = None,
                  augment: AugmentConfig | None = None) -> list[dict]:
    """`fit` for `cfg.epochs`, first restoring `resume`'s saved state, and saving to it as the
    last epoch hook; a divergence error then also says where the last good state is."""
    if resume is None:
        return fit(state, train, val, epochs=cfg.epochs, device=device, augment=augment,
                   grad_clip=cfg.grad_clip, hooks=hooks, name=name)
    resume.restore(state)
    try:
        return fit(state, train, val, epochs=cfg.epochs, device=device, augment=augment,
                   grad_clip=cfg.grad_clip, hooks=[*hooks, resume], name=name)
    except TrainingError as err:
        raise TrainingError(f"{err}; {resume.describe()}") from None


def remove_all(points: Iterable[ResumePoint]) -> None:
    """After a stage wrote its outputs: its resume files are no longer needed."""
    for point in points:
        point.remove()
