"""Classifier on top of any autoencoder's `encode` (the five modes of seed 003's table).

Trainable modes (scratch / *_finetune) train backbone and head together. Frozen modes (*_probe)
train the head only on features of a backbone that stays in eval mode, with a parameter-free
BatchNorm1d before the head: the linear-probe recipe of the MAE paper (He et al. 2021), which
makes the probe insensitive to the scale of each feature.
"""

from __future__ import annotations

import torch
from torch import nn

from aelab.models.base import classification_loss

HEADS = ("mlp", "linear")


class Classifier(nn.Module):
    """`backbone.encode` -> (BatchNorm1d if frozen) -> MLP or linear head -> logits [N, num_classes]."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head: str = "mlp",
        hidden: int = 192,
        dropout: float = 0.2,
        freeze: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if hidden < 1:
            raise ValueError(f"hidden must be positive, got {hidden}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        feature_dim = getattr(backbone, "feature_dim", None)
        if not isinstance(feature_dim, int) or not callable(getattr(backbone, "encode", None)):
            raise ValueError("backbone must have an int `feature_dim` and an `encode(x)` method")

        self.backbone = backbone
        self.freeze = freeze
        self.label_smoothing = label_smoothing
        self.head_kind = head
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        # Frozen features have arbitrary scales; normalising them (no affine) is the probe recipe.
        self.feature_norm = nn.BatchNorm1d(feature_dim, affine=False) if freeze else nn.Identity()
        if head == "mlp":  # seed protocol: Linear -> ReLU -> Dropout -> Linear
            self.head = nn.Sequential(
                nn.Linear(feature_dim, hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        else:
            self.head = nn.Linear(feature_dim, num_classes)

        # The decoder never sees a classification gradient: frozen, it is neither counted as
        # trainable nor left for DDP to wait on (DDP fails on trainable parameters without one).
        for p in getattr(backbone, "decoder_parameters", tuple)():
            p.requires_grad_(False)
        if freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "Classifier":
        """Set train/eval mode; a frozen backbone stays in eval mode (no dropout, fixed norms)."""
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features [N, feature_dim]; no autograd graph through a frozen backbone."""
        if self.freeze:
            with torch.no_grad():
                return self.backbone.encode(x)
        return self.backbone.encode(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] in [-1, 1] -> logits [N, num_classes]."""
        return self.head(self.feature_norm(self.features(x)))

    def training_loss(self, x: torch.Tensor, y: torch.Tensor):
        """(cross-entropy, {"acc": correct count}) on images x [N, C, H, W], labels y [N]."""
        return classification_loss(self(x), y, self.label_smoothing)

    def probe(self) -> "Probe":
        """The part of a frozen-encoder classifier that trains: features -> norm -> head
        (the same modules, not copies), for training on features computed once."""
        if not self.freeze:
            raise ValueError("probe() is for frozen-encoder classifiers; this one trains its encoder")
        return Probe(self.feature_norm, self.head, self.label_smoothing)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer should update: head only when frozen, everything otherwise."""
        return [p for p in self.parameters() if p.requires_grad]


class Probe(nn.Module):
    """A frozen classifier's trainable part on cached features [N, feature_dim]."""

    def __init__(self, feature_norm: nn.Module, head: nn.Module, label_smoothing: float) -> None:
        super().__init__()
        self.feature_norm = feature_norm
        self.head = head
        self.label_smoothing = label_smoothing

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_norm(features))

    def training_loss(self, features: torch.Tensor, y: torch.Tensor):
        return classification_loss(self(features), y, self.label_smoothing)
