"""Masked autoencoder with a ViT encoder, built from timm-equivalent PatchEmbed and Blocks.

Follows the MAE paper (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners") and its
official code's layout: forward_encoder -> forward_decoder -> forward_loss, fixed 2-D sin-cos
positions, per-sample random masking by argsort of noise, loss on masked patches only.
The CIFAR-sized defaults (32x32 images, patch 2, dim 192, 12 + 4 blocks, 3 heads) follow
IcarusWizard/MAE, the code behind seed 000. The blocks are aelab.models.vit's, timm's modules
re-stated (same parameters, initial weights and maths, checked against timm bit for bit) so that
building an MAE does not import timm and, through it, torchvision and torch._dynamo.

Fixes over seed 003: `encode` never masks (the seed kept hiding 75% of patches while classifying),
and patchify/unpatchify are real inverse reshapes (the seed used `view` on the wrong layout, which
misaligned the loss mask with the image).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from aelab.models.base import Autoencoder
from aelab.models.vit import Block, Blocks, PatchEmbed, take_rows


def sincos_pos_embed(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions for a grid_size^2 token grid plus a zero CLS slot: [1 + L, dim]."""
    if dim % 4 != 0:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    # Half the channels encode the row, half the column; each half is [sin | cos] of pos * omega.
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # [D/4]
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # row-major, like PatchEmbed

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # [L, D/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [L, D/2]

    patches = torch.cat([embed_1d(rows), embed_1d(cols)], dim=1)  # [L, D]
    cls = torch.zeros(1, dim, dtype=torch.float64)  # CLS gets no position
    return torch.cat([cls, patches], dim=0).float()  # [1 + L, D]


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into flattened patches: [N, C, H, W] -> [N, L, p*p*C], row-major patch order."""
    n, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(n, c, h // p, p, w // p, p)  # [N, C, h, p, w, p]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [N, h, w, p, p, C]
    return x.reshape(n, (h // p) * (w // p), p * p * c)  # [N, L, p*p*C]


def unpatchify(x: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Exact inverse of `patchify` for square images: [N, L, p*p*C] -> [N, C, H, W]."""
    n, length, _ = x.shape
    p = patch_size
    g = int(round(length**0.5))
    if g * g != length:
        raise ValueError(f"unpatchify expects a square patch grid, got {length} patches")
    x = x.reshape(n, g, g, p, p, channels)  # [N, h, w, p, p, C]
    x = x.permute(0, 5, 1, 3, 2, 4)  # [N, C, h, p, w, p]
    return x.reshape(n, channels, g * p, g * p)  # [N, C, H, W]


def random_masking(
    x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample (MAE paper) -> (kept, mask, ids_restore).

    Shapes: kept [N, K, D] with K = int(L * (1 - mask_ratio)) (at least 1), mask [N, L] with
    1 = removed, ids_restore [N, L] (the argsort that undoes the shuffle).
    """
    n, length, _ = x.shape
    len_keep = min(length, max(1, int(length * (1 - mask_ratio))))
    noise = torch.rand(n, length, device=x.device, generator=generator)  # [N, L] in [0, 1)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first K are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # undoes the shuffle
    ids_keep = ids_shuffle[:, :len_keep]  # [N, K]
    kept = take_rows(x, ids_keep)  # [N, K, D]
    # Mask in shuffled order (0 = kept, 1 = removed), then put back in the original patch order.
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [N, L]
    return kept, mask, ids_restore


class MAEViT(Autoencoder):
    """ViT encoder + narrow ViT decoder trained to reconstruct masked patches; `encode` sees all patches."""

    DECODER = ("decoder_embed", "mask_token", "decoder_blocks", "decoder_norm", "decoder_pred")

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 2,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        decoder_dim: int = 192,
        decoder_depth: int = 4,
        decoder_heads: int = 3,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        self.check_options(image_size=image_size, patch_size=patch_size, dim=dim, heads=heads,
                           decoder_dim=decoder_dim, decoder_heads=decoder_heads,
                           mask_ratio=mask_ratio, pool=pool)
        self.image_size = image_size
        self.patch_size = patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.pool = pool
        self.feature_dim = dim
        grid = image_size // patch_size
        self.num_patches = grid * grid  # L, 256 for 32x32 with patch 2
        norm_layer = partial(nn.LayerNorm, eps=1e-6)  # as in the official MAE code

        # Encoder: patches -> tokens, CLS, fixed positions (buffers: never trained), ViT Blocks.
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans=3, embed_dim=dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid).unsqueeze(0))  # [1, 1+L, D]
        self.blocks = nn.Sequential(
            *[Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(dim)

        # Decoder: narrower ViT over kept tokens + mask tokens, predicting every patch's pixels.
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_dim, grid).unsqueeze(0))
        self.decoder_blocks = Blocks(
            *[
                Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * 3)

        self._init_weights()

    @staticmethod
    def check_options(*, image_size: int = 32, patch_size: int = 2, dim: int = 192, heads: int = 3,
                      decoder_dim: int = 192, decoder_heads: int = 3, mask_ratio: float = 0.75,
                      pool: str = "cls", **_unchecked) -> None:
        """Raise ValueError for inconsistent options, without building: the config check calls
        this for every stage."""
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if patch_size < 1 or image_size < patch_size or image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if heads < 1 or dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if decoder_heads < 1 or decoder_dim % decoder_heads != 0:
            raise ValueError(
                f"decoder_dim ({decoder_dim}) must be divisible by decoder_heads ({decoder_heads})"
            )
        if dim % 4 != 0 or decoder_dim % 4 != 0:
            raise ValueError(
                f"dim ({dim}) and decoder_dim ({decoder_dim}) must be divisible by 4 (sin-cos positions)"
            )
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")

    def _init_weights(self) -> None:
        """Initialisation of the official MAE code: Xavier-uniform Linears and patch projection."""
        self.apply(_init_module)
        w = self.patch_embed.proj.weight  # conv kernel, initialised like a Linear on flat patches
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- patches ------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, L, p*p*3]."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*3] -> [N, 3, H, W]; exact inverse of `patchify`."""
        return unpatchify(x, self.patch_size)

    random_masking = staticmethod(random_masking)

    def _tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions: [N, 3, H, W] -> [N, L, D]."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:]

    def _with_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the CLS token: [N, K, D] -> [N, 1+K, D]."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # [N, 1, D]
        return torch.cat([cls.to(x.dtype), x], dim=1)

    # -- MAE pretraining ------------------------------------------------------------------------
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches: -> (latent [N, 1+K, D], mask [N, L], ids_restore [N, L])."""
        x = self._tokens(imgs)  # [N, L, D]
        x, mask, ids_restore = random_masking(x, mask_ratio)  # [N, K, D]
        x = self.norm(self.blocks(self._with_cls(x)))  # [N, 1+K, D]
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                        patches: torch.Tensor | None = None) -> torch.Tensor:
        """Predict every patch from visible latents + mask tokens: -> pred [N, L, p*p*3]; with
        `patches` ([N, R] patch indices), the prediction of those patches only, [N, R, p*p*3]:
        the last block attends from them only, and its MLP, the final norm and the prediction
        run on them alone, with the same values as `forward_decoder(latent, ids_restore)`
        gathered there."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)  # [N, L-K, Dd]
        tokens = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, L, Dd], shuffled order
        tokens = take_rows(tokens, ids_restore)  # original order
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed  # [N, 1+L, Dd]
        if patches is None:
            x = self.decoder_norm(self.decoder_blocks(x))
            return self.decoder_pred(x)[:, 1:]  # drop CLS: [N, L, p*p*3]
        x = self.decoder_norm(self.decoder_blocks(x, patches + 1))  # +1: the CLS token is 0
        return self.decoder_pred(x)  # [N, R, p*p*3]

    def targets(self, imgs: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """What the decoder predicts: every patch's pixels [N, L, p*p*3] (those of `patches`,
        [N, R], only: [N, R, p*p*3]), each patch normalised with `norm_pix_loss`."""
        target = self.patchify(imgs).float()  # [N, L, p*p*3]
        if patches is not None:
            target = take_rows(target, patches)
        if self.norm_pix_loss:  # per-patch normalised targets (MAE paper, better features)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean per-patch MSE over the masked patches only (visible patches do not count)."""
        per_patch = ((pred.float() - self.targets(imgs)) ** 2).mean(dim=-1)  # [N, L]
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)  # clamp: no 0/0 if nothing masked

    def training_loss(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """The engine's loss: `forward(x, masked_only=True)`'s."""
        return self(x, masked_only=True)[0], {}

    def forward(self, x: torch.Tensor,
                masked_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (masked-patch loss, reconstruction [N, 3, H, W] of all patches). With
        `masked_only`, (the same loss, None), without predicting the visible patches, which the
        loss never reads: the decoder's last block attends from the masked tokens only and runs
        its MLP on them, and the final norm and the prediction run on them alone. The same loss
        and gradients (to float rounding) for about a fifth less of the last block's work at
        mask 0.75, 3 % of seed 000's step's FLOPs; what training uses (`training_loss`)."""
        latent, mask, ids_restore = self.forward_encoder(x, self.mask_ratio)
        if masked_only:
            masked = ids_restore.argsort(dim=1)[:, latent.shape[1] - 1:]  # the shuffle's hidden part
            pred = self.forward_decoder(latent, ids_restore, masked)  # [N, L-K, p*p*3]
            return ((pred.float() - self.targets(x, masked)) ** 2).mean(), None
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*3]
        loss = self.forward_loss(x, pred, mask)
        # With norm_pix_loss the prediction lives in normalised-patch space, not pixel space.
        return loss, self.unpatchify(pred)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (prediction for all patches [N, 3, H, W], pixel mask [N, 1, H, W], 1 = hidden)."""
        latent, mask, ids_restore = self.forward_encoder(x, self.mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        g, p = self.image_size // self.patch_size, self.patch_size
        pixel_mask = mask.reshape(-1, 1, g, g)  # [N, 1, h, w], patches are row-major
        pixel_mask = pixel_mask.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)  # [N, 1, H, W]
        return self.unpatchify(pred), pixel_mask

    # -- features for classifiers ---------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features from ALL patches (no masking): final LayerNorm, then CLS or mean pool -> [N, D]."""
        tokens = self.norm(self.blocks(self._with_cls(self._tokens(x))))  # [N, 1+L, D]
        if self.pool == "cls":
            return tokens[:, 0]
        return tokens[:, 1:].mean(dim=1)


def _init_module(module: nn.Module) -> None:
    """Xavier-uniform Linear weights, zero biases; LayerNorm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
