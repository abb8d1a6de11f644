"""Batched data augmentation on the device: whole batches at once, no PIL, no per-image Python.

Images are [N, C, H, W], uint8 as stored or float in [-1, 1]; every transform keeps shape and
device, and each image gets its own random draw from torch's generator of that device (seeded by
the engine, so a run is reproducible and its RNG state can be saved). Crop and flip keep the
dtype, so the engine augments the uint8 batch (a quarter of the bytes) and converts afterwards;
the resized crop resamples, so it returns floats. Evaluation never augments.

- `pad`: random crop of the image reflect-padded by `pad` pixels (the CIFAR classifier recipe;
  airbench, seed-era ResNets), with the flip folded in: one gather, no padded copy.
- `resized`: random-resized crop, area fraction in `scale` and aspect ratio in `ratio` (log-
  uniform), resampled bilinearly back to H x W (the MAE paper's pretraining augmentation). Unlike
  torchvision's retry loop, a crop that would leave the image is shrunk to fit.
- `flip`: horizontal flip with probability 1/2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from aelab.config import AugmentConfig


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] in 0..255 -> float [N,3,H,W] in [-1, 1] (the seeds' Normalize(0.5, 0.5))."""
    return images.float().div_(127.5).sub_(1.0)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map positions in [-size+1, 2*size-2] into [0, size) by mirroring at the borders without
    repeating the edge pixel (F.pad's "reflect")."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def random_crop(x: torch.Tensor, pad: int, flip: bool = False) -> torch.Tensor:
    """Crop H x W at a random offset from the image reflect-padded by `pad`, and with `flip`
    mirror each image left-right with probability 1/2: [N, C, H, W] -> same, any dtype.

    The padded image is never built: each output pixel's source index (reflection and flip
    included) is computed per image, then one gather reads them all.
    """
    if pad <= 0 and not flip:
        return x
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device) - pad
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device) - pad
    rows = _reflect(dy + torch.arange(h, device=x.device).view(1, h, 1), h)  # [N, H, 1]
    out_cols = torch.arange(w, device=x.device).view(1, 1, w).expand(n, 1, w)  # [N, 1, W]
    if flip:  # output column j of a flipped image is column w-1-j of the unflipped crop
        mirror = torch.rand(n, device=x.device) < 0.5
        out_cols = torch.where(mirror.view(n, 1, 1), w - 1 - out_cols, out_cols)
    cols = _reflect(dx + out_cols, w)  # [N, 1, W]
    index = (rows * w + cols).view(n, 1, h * w).expand(n, c, h * w)  # [N, C, H*W]
    return x.flatten(2).gather(2, index).view(n, c, h, w)


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float],
                        ratio: tuple[float, float]) -> torch.Tensor:
    """Per-image crop of area fraction ~U(scale), aspect ~logU(ratio), resized to H x W."""
    n = x.shape[0]
    area = torch.empty(n, device=x.device).uniform_(*scale)
    log_ratio = torch.empty(n, device=x.device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the image side
    height = (area / aspect).sqrt().clamp(max=1.0)
    # Crop centres in normalised [-1, 1] coordinates, so that the crop stays inside the image.
    cx = (torch.rand(n, device=x.device) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, device=x.device) * 2 - 1) * (1 - height)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [N, H, W, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def augment(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Apply `cfg` (crop, then flip) to a batch [N, C, H, W]; labels are untouched. uint8 in,
    uint8 out, except the resized crop, which resamples and returns floats in [-1, 1]."""
    if cfg.crop == "pad":
        return random_crop(x, cfg.pad, flip=cfg.flip)
    if cfg.crop == "resized":
        if x.dtype == torch.uint8:
            x = to_unit_range(x)
        x = random_resized_crop(x, cfg.scale, cfg.ratio)
    if cfg.flip:
        x = random_flip(x)
    return x
