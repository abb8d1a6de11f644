"""Batched data augmentation on the device: whole batches at once, no PIL, no per-image Python.

Images are float [N, C, H, W] in [-1, 1]; every transform keeps shape, dtype and device, and each
image gets its own random draw from torch's generator of that device (seeded by the engine, so a
run is reproducible and its RNG state can be saved). Evaluation never augments.

- `pad`: random crop of the image reflect-padded by `pad` pixels (the CIFAR classifier recipe;
  airbench, seed-era ResNets), done as one gather.
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


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop H x W at a random offset from the reflect-padded image: [N, C, H, W] -> same."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # [N, C, H+2p, W+2p]
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=x.device)
    rows = dy + torch.arange(h, device=x.device).view(1, h, 1)  # [N, H, 1]
    cols = dx + torch.arange(w, device=x.device).view(1, 1, w)  # [N, 1, W]
    index = (rows * (w + 2 * pad) + cols).view(n, 1, h * w).expand(n, c, h * w)  # [N, C, H*W]
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


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
    """Apply `cfg` (crop, then flip) to a batch [N, C, H, W]; labels are untouched."""
    if cfg.crop == "pad":
        x = random_crop(x, cfg.pad)
    elif cfg.crop == "resized":
        x = random_resized_crop(x, cfg.scale, cfg.ratio)
    if cfg.flip:
        x = random_flip(x)
    return x
