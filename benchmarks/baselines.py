"""The straightforward ways `benchmarks/bench.py` measures the project against.

Each is what a careful first implementation would write, with nothing of the engine's own
shortcuts (aelab.training, aelab.optim, aelab.augment):

- `BaselineMAE` + `baseline_mae_step`: the MAE paper's official code layout for seed 000's
  ViT-Tiny: timm's PatchEmbed and Blocks, learned position embeddings, per-sample random masking
  by argsort of noise, loss on masked patches, eager fp32, `torch.optim.AdamW`, a float batch
  as a torchvision pipeline hands it over.
- `reencoding_probe`: a frozen-encoder probe trained the re-encoding way: the encoder (in eval
  mode, no augmentation) runs on every batch of every epoch, training and validation.
- `torchvision_loader`: a `DataLoader` over PIL images with RandomCrop(32, padding=4) +
  RandomHorizontalFlip + ToTensor + Normalize, the classic CIFAR recipe.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from aelab.augment import to_unit_range
from aelab.config import TrainConfig
from aelab.models import Classifier
from aelab.optim import LRSchedule, Optimizer
from aelab.training import autocast, grad_scaler, seed_everything


# --- 1. MAE pretraining step --------------------------------------------------------------

class BaselineMAE(nn.Module):
    """MAE ViT as in the paper's official code: learned positions, argsort masking, timm Blocks.

    Takes the options of params.yaml's `variants.mae.model` (pool is irrelevant to pretraining).
    """

    def __init__(self, image_size: int = 32, patch_size: int = 2, dim: int = 192, depth: int = 12,
                 heads: int = 3, mlp_ratio: float = 4.0, decoder_dim: int = 192,
                 decoder_depth: int = 4, decoder_heads: int = 3, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = False, **_ignored) -> None:
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        self.patch_size = patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans=3, embed_dim=dim)
        length = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + length, dim))
        self.blocks = nn.ModuleList(
            [Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
             for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + length, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * 3)
        for p in (self.cls_token, self.pos_embed, self.mask_token, self.decoder_pos_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        n, c, h, w = imgs.shape
        p = self.patch_size
        x = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """The masked-patch reconstruction loss of a float batch [N, 3, H, W] in [-1, 1]."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        n, length, d = x.shape
        keep = int(length * (1 - self.mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.repeat(n, length + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


def baseline_mae_step(model: BaselineMAE, lr: float, betas, weight_decay: float):
    """A step function `step(x)` for a float batch: forward, zero_grad, backward, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas),
                                  weight_decay=weight_decay)

    def step(x: torch.Tensor) -> None:
        loss = model(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


# --- 2. Frozen-encoder probe, re-encoding every batch ---------------------------------------

def reencoding_probe(model: Classifier, train: tuple[torch.Tensor, torch.Tensor],
                     val: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig, *,
                     device: torch.device, seed: int) -> tuple[float, dict]:
    """Train a frozen classifier's probe with the encoder run on every batch of every epoch
    (training and validation; encoder in eval mode, no augmentation). Same optimiser,
    schedule, batches and epochs as the engine, so that the only difference from
    `aelab.classify.train_classifier` is where the features come from.
    Returns (best validation accuracy, that epoch's weights)."""
    if not model.freeze:
        raise ValueError("reencoding_probe needs a frozen-encoder classifier")
    seed_everything(seed)
    model.to(device)
    images, labels = train[0].to(device), train[1].to(device)
    val_images, val_labels = val[0].to(device), val[1].to(device)
    n, bs = len(images), cfg.batch_size
    steps_per_epoch = math.ceil(n / bs)
    optimizer = Optimizer(model.trainable_parameters(), kind=cfg.optimizer, lr=cfg.lr,
                          betas=cfg.betas, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    schedule = LRSchedule(cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                          warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                          kind=cfg.schedule, min_lr=cfg.min_lr)
    scaler = grad_scaler(device)  # fp16 (GPUs before the A100), as the engine's
    step, best, best_state = 0, -1.0, None
    for _ in range(cfg.epochs):
        model.train()  # the frozen backbone stays in eval mode (Classifier.train)
        order = torch.randperm(n).to(device)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            x = to_unit_range(images.index_select(0, idx))
            optimizer.lr = schedule(step)
            with autocast(device):
                loss, _ = model.training_loss(x, labels.index_select(0, idx))
            optimizer.zero_grad()
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            step += 1
        model.eval()
        correct = torch.zeros((), device=device)
        with torch.no_grad():
            for start in range(0, len(val_images), bs):
                with autocast(device):
                    logits = model(to_unit_range(val_images[start:start + bs]))
                correct += (logits.argmax(1) == val_labels[start:start + bs]).sum()
        acc = correct.item() / len(val_images)
        if acc > best:  # keep the best epoch's weights on the CPU, as the stage's KeepBest does
            best = acc
            best_state = {k: v.detach().to("cpu", copy=True)
                          for k, v in model.state_dict().items()}
    return best, best_state


# --- 3. torchvision's data path -----------------------------------------------------------

class PILImages(torch.utils.data.Dataset):
    """A torchvision-style dataset: PIL images in memory, a transform per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        from PIL import Image

        self.images = [Image.fromarray(img) for img in images]  # [N, H, W, 3] uint8
        self.labels = [int(y) for y in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def torchvision_loader(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                       num_workers: int, pin_memory: bool = False):
    """DataLoader with RandomCrop(32, padding=4, reflect) + flip + ToTensor + Normalize(0.5)."""
    from torchvision import transforms as T

    transform = T.Compose([
        T.RandomCrop(images.shape[1], padding=4, padding_mode="reflect"),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])
    return torch.utils.data.DataLoader(
        PILImages(images, labels, transform), batch_size=batch_size, shuffle=True,
        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory)

