"""Compute cost of a model, counted rather than estimated: FLOPs per image.

Counted with torch's FlopCounterMode. The fused attention kernel is invisible to the counter
on CPU (shared/reference.md), so attention is switched to its explicit matmul form while
counting; the numbers are the same maths either way.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _countable(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` with explicit (countable) attention."""
    clone = copy.deepcopy(model).cpu().float()
    for module in clone.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return clone


def flops_per_image(model: nn.Module, image_size: int = 32, batch: int = 2) -> dict[str, float]:
    """{"train_step": forward+backward of model(x) -> loss, "encode": forward of encode(x)}."""
    model = _countable(model)
    x = torch.randn(batch, 3, image_size, image_size)
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(x)
        loss.backward()
    train_step = counter.get_total_flops() / batch
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode(x)
    return {"train_step": train_step, "encode": counter.get_total_flops() / batch}
