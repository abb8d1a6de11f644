"""Build models from the config or from a checkpoint's meta: one place for every step."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from aelab.config import MODE_SPECS, ConfigError
from aelab.models.classifier import Classifier

if TYPE_CHECKING:
    from aelab.config import Config


def model_meta(cfg: "Config", variant: str, dataset_meta: dict) -> dict:
    """What is needed to rebuild `variant`'s autoencoder (stored in every checkpoint)."""
    v = cfg.variant(variant)
    return {"variant": variant, "arch": v.arch,
            "model": {k: list(x) if isinstance(x, tuple) else x for k, x in v.model.items()},
            "mask_ratio": v.model.get("mask_ratio", cfg.mask_ratio), "dataset": cfg.dataset,
            "image_size": dataset_meta["image_size"], "num_classes": dataset_meta["num_classes"]}


def build_from_meta(meta: dict) -> nn.Module:
    """The autoencoder a meta describes (model_meta's or a checkpoint's); options the
    constructor rejects (e.g. dim not divisible by heads) are a ConfigError naming their key."""
    from aelab.models import build_autoencoder

    try:
        return build_autoencoder(meta["arch"], meta["model"], mask_ratio=meta["mask_ratio"])
    except ValueError as err:
        raise ConfigError(f"params.yaml: 'variants.{meta['variant']}.model': {err}") from None


def classifier_meta(cfg: "Config", variant: str, mode: str, dataset_meta: dict) -> dict:
    """model_meta plus the head: what rebuilds a classifier of `mode` on `variant`."""
    v = cfg.variant(variant)
    return {**model_meta(cfg, variant, dataset_meta), "mode": mode,
            "head_hidden": v.head_hidden, "dropout": v.dropout}


def build_classifier(meta: dict, label_smoothing: float = 0.0) -> Classifier:
    """A classifier (backbone + head) from classifier_meta or a classifier checkpoint's meta."""
    spec = MODE_SPECS[meta["mode"]]
    return Classifier(build_from_meta(meta), meta["num_classes"], head=spec.head,
                      hidden=meta["head_hidden"], dropout=meta["dropout"], freeze=spec.frozen,
                      label_smoothing=label_smoothing)


def count_parameters(module: nn.Module, trainable: bool = False) -> int:
    """Number of scalar parameters (only those that train, with `trainable`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)
