"""The ViT pieces of the MAE: patch embedding and the pre-norm transformer block.

The same modules, parameter names and maths as timm's `PatchEmbed` and
`vision_transformer.Block` with the options the MAE uses (qkv bias, no qk-norm, no layer scale,
no drop path, no dropout, GELU MLP, the caller's LayerNorm), defined here so that a stage that
builds an MAE need not import timm. `import timm` imports torchvision, whose `ops` import
`torch._dynamo`: 1.5 s of a stage's start-up on a 2-core CPU, where the whole start-up budget is
2.5 s (aelab.optim avoids `torch.optim` for the same reason). Modules are created in timm's
order, so a seed gives the same initial weights as timm's blocks; `tests/test_vit.py` checks
weights, outputs and gradients against timm's own modules, bit for bit, and a checkpoint
written with timm's blocks loads unchanged (the state-dict keys are the same).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a conv with kernel = stride = patch size,
    [N, C, H, W] -> [N, L, D] with the patches in row-major order."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int = 3,
                 embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"PatchEmbed expects {self.img_size[0]}x{self.img_size[1]} images, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, D, h, w] -> [N, L, D]


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[b, rows[b]] for every b: [B, N, C] gathered at [B, R] token indices -> [B, R, C]."""
    return torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Attention(nn.Module):
    """Multi-head self-attention over all tokens. `fused_attn` (default) calls
    `F.scaled_dot_product_attention`; False computes softmax(q k^T / sqrt(d)) v with explicit
    matmuls (what FLOP counting needs: the fused CPU kernel is invisible to FlopCounterMode)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]; with `rows` ([B, R] token indices), the output at those tokens
        only, [B, R, C]: queries there, keys and values at every token (the same values as
        `forward(x)` gathered at `rows`, without computing the others)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        if rows is not None:  # the queries at `rows` (projecting the others too costs little)
            n = rows.shape[1]
            q = torch.gather(q, 2, rows[:, None, :, None].expand(-1, self.num_heads, -1, self.head_dim))
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]; with `rows` ([B, R] token indices) the block's output at those
        tokens only, [B, R, C] (every token still serves as a key and a value)."""
        if rows is None:
            x = x + self.attn(self.norm1(x))
        else:
            x = take_rows(x, rows) + self.attn(self.norm1(x), rows)
        return x + self.mlp(self.norm2(x))


class Blocks(nn.Sequential):
    """Blocks applied in turn, as nn.Sequential (same state-dict keys); with `rows` ([B, R] token
    indices) the last block's output at those tokens only (`Block.forward`)."""

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        last = len(self) - 1
        for i, block in enumerate(self):
            x = block(x, rows) if rows is not None and i == last else block(x)
        return x
