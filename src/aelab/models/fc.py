"""Fully connected autoencoder (the FC+l1 / FC+l2 rows of seed 003, johanDDC/MIL_autoencoder).

Encoder 3072 -> 1536 -> 768 -> 384 with LeakyReLU(0.2) after every Linear; the decoder mirrors it
and ends in Tanh. Unlike the seed there is no ReLU before the Tanh: with a ReLU the output could
never go below 0, so half of the [-1, 1] pixel range was unreachable.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aelab.models.base import Autoencoder

# Reconstruction losses shared by the fc and conv families: name -> (prediction, target) -> scalar.
RECONSTRUCTION_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": F.l1_loss,  # mean absolute error
    "l2": F.mse_loss,  # mean squared error
}


def check_loss_name(loss: str) -> str:
    """Return `loss` if it names a reconstruction loss, else raise ValueError naming `loss`."""
    if loss not in RECONSTRUCTION_LOSSES:
        expected = ", ".join(RECONSTRUCTION_LOSSES)
        raise ValueError(f"loss must be one of {expected}, got {loss!r}")
    return loss


class UnmaskedAutoencoder(Autoencoder):
    """forward/reconstruct shared by autoencoders that see the whole image (fc, conv):
    subclasses define `encode`, `decode` and `loss_name`."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scalar reconstruction loss, reconstruction [N, C, H, W])."""
        recon = self.decode(self.encode(x))
        loss = RECONSTRUCTION_LOSSES[self.loss_name](recon, x)
        return loss, recon

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Return (reconstruction [N, C, H, W], None): nothing is masked in this family."""
        return self.decode(self.encode(x)), None


class FCAutoencoder(UnmaskedAutoencoder):
    """MLP autoencoder on flattened images; `encode` gives the bottleneck activations."""

    def __init__(
        self,
        hidden: tuple[int, ...] = (1536, 768, 384),
        loss: str = "l1",
        image_size: int = 32,
        channels: int = 3,
    ) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        self.check_options(hidden=hidden, loss=loss, image_size=image_size, channels=channels)
        self.loss_name = loss
        self.image_size = image_size
        self.channels = channels
        self.hidden = hidden
        self.feature_dim = hidden[-1]

        in_dim = channels * image_size * image_size  # 3072 for 3x32x32
        widths = (in_dim, *hidden)  # e.g. 3072, 1536, 768, 384

        # Encoder: Linear + LeakyReLU for every step, including the last one (seed protocol).
        encoder: list[nn.Module] = []
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            encoder += [nn.Linear(d_in, d_out), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*encoder)

        # Decoder: mirror image, LeakyReLU between layers, Tanh (and nothing else) on the output.
        reversed_widths = widths[::-1]  # e.g. 384, 768, 1536, 3072
        decoder: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(reversed_widths[:-1], reversed_widths[1:])):
            decoder.append(nn.Linear(d_in, d_out))
            is_last = i == len(reversed_widths) - 2
            decoder.append(nn.Tanh() if is_last else nn.LeakyReLU(0.2))
        self.decoder = nn.Sequential(*decoder)

    @staticmethod
    def check_options(*, hidden=(1536, 768, 384), loss: str = "l1", image_size: int = 32,
                      channels: int = 3, **_unchecked) -> None:
        """Raise ValueError for inconsistent options, without building: the config check calls
        this for every stage (building on the meta device would import torch._dynamo, ~2 s)."""
        if not hidden or min(int(h) for h in hidden) < 1:
            raise ValueError(f"hidden must be a non-empty list of positive sizes, got {tuple(hidden)}")
        if image_size < 1 or channels < 1:
            raise ValueError(f"image_size and channels must be positive, got {image_size}, {channels}")
        check_loss_name(loss)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features for a classifier: [N, C, H, W] -> [N, feature_dim]."""
        return self.encoder(x.flatten(1))  # [N, C*H*W] -> [N, hidden[-1]]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from features: [N, feature_dim] -> [N, C, H, W]."""
        flat = self.decoder(z)  # [N, C*H*W]
        return flat.view(-1, self.channels, self.image_size, self.image_size)

