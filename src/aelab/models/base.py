"""The training contract every model meets, so the engine never looks inside one.

`training_loss(x, y) -> (loss, sums)`: the scalar loss to minimise on batch `x` (labels `y`, or
None for autoencoders) and a dict of per-batch *sums* (e.g. correct predictions) that the engine
accumulates on the device and divides by the number of images once per epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Autoencoder(nn.Module):
    """Base of the autoencoder families: `forward(x)` returns (loss, reconstruction).

    `DECODER` names the attributes (modules or parameters) that only reconstruction uses:
    a classifier built on the autoencoder freezes them, since `encode` never reaches them."""

    DECODER: tuple[str, ...] = ("decoder",)

    @staticmethod
    def check_options(**options) -> None:
        """Raise ValueError for options the constructor would reject, without building (the
        config check of every stage calls it). Every family defines its own."""
        raise NotImplementedError("an autoencoder family must define check_options")

    def decoder_parameters(self):
        """The parameters `encode` never uses."""
        for name in self.DECODER:
            part = getattr(self, name)
            yield from [part] if isinstance(part, nn.Parameter) else part.parameters()

    def training_loss(self, x: torch.Tensor, y: torch.Tensor | None = None):
        loss, _ = self(x)
        return loss, {}


def classification_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0):
    """Cross-entropy (in fp32 under autocast) and the number of correct predictions."""
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    return loss, {"acc": (logits.argmax(1) == y).sum()}
