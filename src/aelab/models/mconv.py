"""Masked convolutional autoencoder (`mconv`): MAE-style masking for a CNN, after SparK
(Tian et al. 2023, "Designing BERT for Convolutional Networks") and ConvNeXt V2's FCMAE.

The open direction both seed write-ups end with ("adapt masks to a convolutional architecture").
A CNN cannot drop hidden patches the way a ViT drops tokens, so it emulates sparse convolution
densely:

- Random patch masking on the encoder's final-stride grid: a 32x32 image with channels of
  length 3 (total stride 4) is masked on an 8x8 grid of 4x4 patches; length 4, or length 3
  with a stride-2 stem, on a 4x4 grid of 8x8 patches. Per sample, exactly `int(L * (1 - mask_ratio))` patches stay visible (at least 1).
- The hidden pixels are zeroed, and every activation is re-masked after every convolution and
  normalisation, so a visible position never sees a hidden one (a 3x3 conv at the edge of a
  visible patch reads zeros). `tests/test_mconv.py` proves it with gradients.
- BatchNorm statistics come from the visible positions only (`MaskedBatchNorm2d`).
- The decoder (light UNet) fills the hidden positions of every encoder scale with a learned
  mask token per scale, upsamples with transposed convs and predicts the pixels.
- The loss is the MSE on hidden pixels only, optionally against per-patch normalised targets
  (`norm_pix_loss`, as in the MAE paper and SparK).
- `encode` (what a classifier sees) never masks: the whole image, global average pooled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aelab.models.base import Autoencoder
from aelab.models.mae import patchify, unpatchify


def random_patch_mask(n: int, grid: int, mask_ratio: float, device: torch.device) -> torch.Tensor:
    """Per-sample random visibility of a grid x grid patch layout: [N, 1, grid, grid], 1 = visible,
    exactly `int(L * (1 - mask_ratio))` (at least one) visible patches per image."""
    length = grid * grid
    keep = min(length, max(1, int(length * (1 - mask_ratio))))
    ranks = torch.rand(n, length, device=device).argsort(dim=1).argsort(dim=1)  # a permutation
    return (ranks < keep).float().reshape(n, 1, grid, grid)


def upsample_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A [N, 1, g, g] patch mask at a finer [N, 1, size, size] scale (nearest, exact)."""
    return mask.repeat_interleave(size // mask.shape[-1], dim=2).repeat_interleave(
        size // mask.shape[-1], dim=3)


def _keep(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the hidden positions (mask 0); identity when nothing is masked."""
    return x if mask is None else x * mask


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from the visible positions only.

    With `mask` [N, 1, H, W] (1 = visible) in training, the mean and variance per channel are
    over visible positions, the running statistics are updated from them (unbiased variance,
    like BatchNorm2d) and the output is zero where hidden. Without a mask, or in eval mode
    (running statistics: a per-position affine map), it is BatchNorm2d, re-masked."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None or not self.training:
            return _keep(super().forward(x), mask)
        dtype, x, m = x.dtype, x.float(), mask.float()  # statistics in fp32 under autocast
        count = m.sum()  # visible positions per channel
        mean = (x * m).sum(dim=(0, 2, 3)) / count
        centred = (x - mean[None, :, None, None]) * m
        var = (centred * centred).sum(dim=(0, 2, 3)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                unbiased = var * count / (count - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype),
                                       self.momentum)
        scale = torch.rsqrt(var + self.eps) * self.weight
        out = (centred * scale[None, :, None, None] + self.bias[None, :, None, None]) * m
        return out.to(dtype)


class MaskedConvBlock(nn.Module):
    """Residual basic block (3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, + input, ReLU), masked
    after every conv and norm when a mask is given."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = MaskedBatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = MaskedBatchNorm2d(channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x), mask))  # the norm re-masks; relu(0) = 0
        y = self.norm2(self.conv2(y), mask)
        return F.relu(x + y)  # both terms are zero where hidden


class MaskedConvAutoencoder(Autoencoder):
    """Masked convolutional autoencoder; `encode` gives the pooled features of the whole image.

    `channels` (c0, c1, ...): a 3x3 stem to c0 (at full resolution, or half with
    `stem_stride` 2), then per further entry a stride-2 3x3 conv (halving H and W) and `blocks`
    residual blocks. The total stride, stem_stride * 2 ** (len(channels) - 1), is the mask
    patch size.
    """

    DECODER = ("mask_tokens", "ups", "fuse", "head")

    def __init__(
        self,
        channels: tuple[int, ...] = (32, 64, 128),
        blocks: int = 1,
        stem_stride: int = 1,
        mask_ratio: float = 0.6,
        norm_pix_loss: bool = True,
        image_size: int = 32,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        self.check_options(channels=channels, blocks=blocks, stem_stride=stem_stride,
                           mask_ratio=mask_ratio, image_size=image_size)
        self.channels, self.blocks_per_stage = channels, int(blocks)
        self.mask_ratio, self.norm_pix_loss = float(mask_ratio), bool(norm_pix_loss)
        self.image_size, self.in_channels = image_size, in_channels
        self.stem_stride = int(stem_stride)
        self.patch_size = self.stem_stride * 2 ** (len(channels) - 1)  # the total stride
        self.grid = image_size // self.patch_size
        self.feature_dim = channels[-1]

        # Encoder: scale 0 is full resolution; scale i has H / 2**i.
        self.stem = nn.Conv2d(in_channels, channels[0], 3, stride=stem_stride, padding=1,
                              bias=False)
        self.stem_norm = MaskedBatchNorm2d(channels[0])
        self.downs = nn.ModuleList()
        self.down_norms = nn.ModuleList()
        self.stages = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.downs.append(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False))
            self.down_norms.append(MaskedBatchNorm2d(c_out))
            self.stages.append(nn.ModuleList(MaskedConvBlock(c_out) for _ in range(blocks)))

        # Decoder: densify each scale with its mask token, then coarse to fine, UNet-style.
        self.mask_tokens = nn.ParameterList(
            nn.Parameter(torch.zeros(1, c, 1, 1)) for c in channels)
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
            for c_in, c_out in zip(channels[:0:-1], channels[-2::-1]))
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                          nn.ReLU(inplace=True))
            for c in channels[-2::-1])
        self.head = (nn.Conv2d(channels[0], in_channels, 1) if stem_stride == 1 else
                     nn.ConvTranspose2d(channels[0], in_channels, 2, stride=2))
        self._init_weights()
        # Channels-last weights and activations, as in ConvAutoencoder: oneDNN's convolutions
        # are faster in it (measured on 2 CPU cores: ~15 % per step) and tensor cores prefer it.
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def check_options(*, channels=(32, 64, 128), blocks: int = 1, stem_stride: int = 1,
                      mask_ratio: float = 0.6, image_size: int = 32, **_unchecked) -> None:
        """Raise ValueError for inconsistent options, without building."""
        channels = tuple(channels)
        if len(channels) < 2 or min(int(c) for c in channels) < 1:
            raise ValueError(f"channels must list at least two positive sizes, got {list(channels)}")
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if int(blocks) < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        stride = stem_stride * 2 ** (len(channels) - 1)
        if image_size % stride or image_size // stride < 2:
            raise ValueError(
                f"{len(channels)} channel entries and stem_stride {stem_stride} give a total "
                f"stride of {stride}: image_size "
                f"({image_size}) must be a multiple of it with a mask grid of at least 2x2")

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for token in self.mask_tokens:
            nn.init.normal_(token, std=0.02)

    # -- encoder --------------------------------------------------------------------------------
    def _masks(self, mask: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The patch mask at every encoder scale (finest first), or Nones."""
        if mask is None:
            return [None] * len(self.channels)
        size = self.image_size // self.stem_stride
        return [upsample_mask(mask, size >> i) for i in range(len(self.channels))]

    def features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Feature maps at every scale, finest first; with `mask` [N, 1, g, g] (1 = visible)
        every map is zero where hidden and depends on visible pixels only."""
        masks = self._masks(mask)
        pixels = None if mask is None else upsample_mask(mask, self.image_size)
        x = x.contiguous(memory_format=torch.channels_last)
        h = F.relu(self.stem_norm(self.stem(_keep(x, pixels)), masks[0]))
        maps = [h]
        for i, (down, norm, stage) in enumerate(zip(self.downs, self.down_norms, self.stages)):
            m = masks[i + 1]
            h = norm(down(h), m)
            for block in stage:
                h = block(h, m)
            maps.append(h)
        return maps

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features for a classifier, nothing masked: [N, C, H, W] -> [N, channels[-1]]."""
        return self.features(x)[-1].mean(dim=(2, 3))

    # -- decoder and loss -----------------------------------------------------------------------
    def decode(self, maps: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Pixels [N, 3, H, W] from masked feature maps: every hidden position gets its scale's
        mask token, then transposed convs go coarse to fine, adding each densified scale."""
        masks = self._masks(mask)
        dense = [f * m + token * (1 - m) for f, m, token in zip(maps, masks, self.mask_tokens)]
        h = dense[-1]
        for up, fuse, skip in zip(self.ups, self.fuse, dense[-2::-1]):
            h = fuse(up(h) + skip)
        return self.head(h)

    def _patch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each mask patch's mean and standard deviation (+ eps), as [N, L, 1]."""
        patches = patchify(x.float(), self.patch_size)  # [N, L, p*p*C]
        return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6) ** 0.5

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder predicts: the image, or each patch normalised by its own mean/std."""
        if not self.norm_pix_loss:
            return x.float()
        mean, std = self._patch_stats(x)
        return unpatchify((patchify(x.float(), self.patch_size) - mean) / std, self.patch_size,
                          self.in_channels)

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the hidden pixels only (visible ones do not count)."""
        hidden = 1 - upsample_mask(mask, self.image_size)  # [N, 1, H, W]
        error = ((pred.float() - self._target(x)) ** 2).mean(dim=1, keepdim=True)
        return (error * hidden).sum() / hidden.sum().clamp_min(1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (MSE on hidden pixels, prediction [N, 3, H, W]; normalised patches with
        norm_pix_loss)."""
        mask = random_patch_mask(x.shape[0], self.grid, self.mask_ratio, x.device)
        pred = self.decode(self.features(x, mask), mask)
        return self.forward_loss(x, pred, mask), pred

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (prediction for every pixel [N, 3, H, W], pixel mask [N, 1, H, W], 1 = hidden).
        With norm_pix_loss the prediction is de-normalised with each patch's true mean and std,
        as the MAE paper's figures do, so it can be drawn as an image."""
        mask = random_patch_mask(x.shape[0], self.grid, self.mask_ratio, x.device)
        pred = self.decode(self.features(x, mask), mask).float()
        if self.norm_pix_loss:
            mean, std = self._patch_stats(x)
            pred = unpatchify(patchify(pred, self.patch_size) * std + mean, self.patch_size,
                              self.in_channels)
        return pred, 1 - upsample_mask(mask, self.image_size)
