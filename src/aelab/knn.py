"""k-nearest-neighbour accuracy of frozen encoder features: the training-free SSL sanity check.

Cosine similarity between L2-normalised features; the k nearest training images vote with
weight exp(similarity / T), T = 0.07, as in Wu et al. 2018 (instance discrimination) and the
kNN monitors of DINO, solo-learn and lightly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aelab.training import encode_images

TEMPERATURE = 0.07


def encode_all(encoder: nn.Module, images: torch.Tensor, *, batch_size: int,
               device: torch.device) -> torch.Tensor:
    """L2-normalised features [N, D] (float32, on `device`) of uint8 images [N, 3, H, W]."""
    return F.normalize(encode_images(encoder, images, batch_size=batch_size, device=device), dim=1)


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *,
                k: int, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Predicted labels [M] for normalised queries [M, D] from a normalised bank [N, D]."""
    k = min(k, len(bank))
    preds = []
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ bank.T  # [B, N] cosine similarities
        top_sims, top_idx = sims.topk(k, dim=1)  # [B, k]
        votes = torch.zeros(len(sims), num_classes, device=sims.device)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sims / TEMPERATURE).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                 labels: torch.Tensor, *, k: int, num_classes: int) -> float:
    """Share of queries whose kNN vote matches their label."""
    preds = knn_predict(bank, bank_labels.to(bank.device), queries, k=k, num_classes=num_classes)
    return (preds == labels.to(preds.device)).float().mean().item()
