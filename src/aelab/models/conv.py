"""Convolutional autoencoder (the Conv-192 / Conv-256 rows of seed 003, johanDDC/MIL_autoencoder).

Encoder: 4x [Conv2d(k4, s2, p1) -> LeakyReLU(0.2)], with a channels-first LayerNorm after layers
2-4, then flatten. Each conv halves the resolution, so 32x32 ends at 2x2:
channels (6, 12, 24, 48) -> 48*2*2 = 192 features, (8, 16, 32, 64) -> 64*2*2 = 256.
The decoder mirrors it with ConvTranspose2d (LayerNorm after every hidden layer, as in the seed)
and a Tanh output for [-1, 1] images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aelab.models.fc import UnmaskedAutoencoder, check_loss_name


def _down(c_in: int, c_out: int) -> nn.Conv2d:
    """Stride-2 conv that halves H and W exactly."""
    return nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1)


def _up(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    """Stride-2 transposed conv that doubles H and W exactly."""
    return nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels at every (h, w) of [N, C, H, W], affine over C.

    The same parameters (`weight`, `bias`) and maths as timm's LayerNorm2d, defined here so the
    fc/conv stages need not import timm (about 2 s of start-up per stage on a small CPU).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # a view when x is channels-last (ConvAutoencoder's layout)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvAutoencoder(UnmaskedAutoencoder):
    """Strided-conv autoencoder; `encode` gives the flattened bottleneck feature map."""

    def __init__(
        self,
        channels: tuple[int, ...] = (8, 16, 32, 64),
        loss: str = "l2",
        image_size: int = 32,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        self.check_options(channels=channels, loss=loss, image_size=image_size)
        stride = 2 ** len(channels)  # total downsampling, 16 for four layers
        self.loss_name = loss
        self.channels = channels
        self.image_size = image_size
        self.in_channels = in_channels
        self.latent_size = image_size // stride  # 2 for 32x32
        self.feature_dim = channels[-1] * self.latent_size**2

        # Encoder: [N, 3, 32, 32] -> [N, 8, 16, 16] -> ... -> [N, 64, 2, 2] -> [N, 256].
        encoder: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip((in_channels, *channels[:-1]), channels)):
            encoder += [_down(c_in, c_out), nn.LeakyReLU(0.2)]
            if i > 0:  # the seed normalises after every layer but the first
                encoder.append(LayerNorm2d(c_out))
        encoder.append(nn.Flatten())
        self.encoder = nn.Sequential(*encoder)

        # Decoder: [N, 256] -> [N, 64, 2, 2] -> ... -> [N, 8, 16, 16] -> [N, 3, 32, 32].
        decoder: list[nn.Module] = [nn.Unflatten(1, (channels[-1], self.latent_size, self.latent_size))]
        reversed_channels = channels[::-1]  # e.g. 64, 32, 16, 8
        for c_in, c_out in zip(reversed_channels[:-1], reversed_channels[1:]):
            decoder += [_up(c_in, c_out), nn.LeakyReLU(0.2), LayerNorm2d(c_out)]
        decoder += [_up(channels[0], in_channels), nn.Tanh()]
        self.decoder = nn.Sequential(*decoder)

        self.apply(_init_weights)
        # Channels-last (NHWC) weights and activations: oneDNN's convolutions are faster in it
        # on CPUs and tensor cores prefer it, and LayerNorm2d's permute becomes a free view.
        # Measured on 2 CPU cores: classifier steps ~25 % faster, autoencoder steps ~10 %.
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def check_options(*, channels=(8, 16, 32, 64), loss: str = "l2", image_size: int = 32,
                      **_unchecked) -> None:
        """Raise ValueError for inconsistent options, without building: the config check calls
        this for every stage (building on the meta device would import torch._dynamo, ~2 s)."""
        channels = tuple(channels)
        if not channels or min(int(c) for c in channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive sizes, got {channels}")
        stride = 2 ** len(channels)  # total downsampling, 16 for four layers
        if image_size < stride or image_size % stride != 0:
            raise ValueError(
                f"image_size must be a positive multiple of {stride} for {len(channels)} "
                f"stride-2 layers, got {image_size}"
            )
        check_loss_name(loss)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features for a classifier: [N, C, H, W] -> [N, feature_dim]."""
        return self.encoder(x.contiguous(memory_format=torch.channels_last))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from features: [N, feature_dim] -> [N, C, H, W]."""
        return self.decoder(z)


def _init_weights(module: nn.Module) -> None:
    """Xavier-normal conv weights and zero biases, as in the seed."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_normal_(module.weight)
        nn.init.zeros_(module.bias)
