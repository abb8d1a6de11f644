"""Autoencoder families behind one contract, a plain registry, and the classifier wrapper.

Every autoencoder takes images in [-1, 1] shaped [N, 3, H, W] and provides
`feature_dim`, `encode(x) -> [N, feature_dim]`, `forward(x) -> (loss, reconstruction)` and
`reconstruct(x) -> (reconstruction, pixel mask or None)`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

from aelab.models.classifier import Classifier, Probe
from aelab.models.conv import ConvAutoencoder
from aelab.models.fc import FCAutoencoder

# arch name -> "module:class". Modules are imported when an architecture is first used, so a
# stage imports only the model code it builds.
ARCHITECTURES: dict[str, str] = {
    "fc": "aelab.models.fc:FCAutoencoder",
    "conv": "aelab.models.conv:ConvAutoencoder",
    "mae": "aelab.models.mae:MAEViT",
    "mconv": "aelab.models.mconv:MaskedConvAutoencoder",
}


def architecture(arch: str) -> type[nn.Module]:
    """The autoencoder class registered as `arch`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    module, name = ARCHITECTURES[arch].split(":")
    return getattr(importlib.import_module(module), name)


def masks(arch: str) -> bool:
    """Whether `arch` is a masked autoencoder (its constructor takes a `mask_ratio`)."""
    return "mask_ratio" in inspect.signature(architecture(arch)).parameters


def __getattr__(name: str):  # `from aelab.models import MAEViT` imports it on demand
    if name == "MAEViT":
        return architecture("mae")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_autoencoder(
    arch: str, options: dict[str, Any], *, mask_ratio: float | None = None
) -> nn.Module:
    """Build `ARCHITECTURES[arch](**options)`; a masked architecture takes the given (top-level)
    `mask_ratio` unless `options` set its own; the others ignore it."""
    cls = architecture(arch)
    accepted = [name for name in inspect.signature(cls).parameters]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for architecture {arch!r}; "
            f"expected some of {', '.join(accepted)}"
        )
    kwargs = dict(options)
    # The top-level mask_ratio knob (dvc exp run -S mask_ratio=...) only concerns masked models.
    if mask_ratio is not None and "mask_ratio" in accepted and "mask_ratio" not in options:
        kwargs["mask_ratio"] = mask_ratio
    return cls(**kwargs)


from aelab.models.factory import (build_classifier, build_from_meta, classifier_meta,  # noqa: E402
                                  count_parameters, model_meta)

__all__ = [
    "ARCHITECTURES",
    "Classifier",
    "Probe",
    "build_classifier",
    "build_from_meta",
    "classifier_meta",
    "count_parameters",
    "model_meta",
    "ConvAutoencoder",
    "FCAutoencoder",
    "MAEViT",
    "architecture",
    "build_autoencoder",
    "masks",
]
