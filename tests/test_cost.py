"""FLOP counting: exact on a case with a known answer, attention included for the MAE."""

import pytest

from aelab.cost import flops_per_image
from aelab.models import build_autoencoder


def test_fc_encoder_flops_are_exact():
    model = build_autoencoder("fc", {"hidden": (1536, 768, 384)})
    flops = flops_per_image(model)
    assert flops["encode"] == 2 * (3072 * 1536 + 1536 * 768 + 768 * 384)
    # forward of encoder+decoder is twice the encoder; backward adds about twice the forward
    assert 2.5 * 2 * flops["encode"] < flops["train_step"] < 3 * 2 * flops["encode"]


def test_mae_counts_attention_and_does_not_touch_the_model():
    model = build_autoencoder("mae", {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2,
                                      "decoder_dim": 32, "decoder_depth": 1,
                                      "decoder_heads": 2}, mask_ratio=0.75)
    flops = flops_per_image(model)
    tokens, dim, depth = 64 + 1, 32, 2
    linear = depth * 2 * tokens * (3 * dim * dim + dim * dim + 2 * 4 * dim * dim)
    attention = depth * 2 * 2 * tokens * tokens * dim  # q @ k^T and attn @ v
    patch = 2 * 64 * (4 * 4 * 3) * dim
    assert flops["encode"] == pytest.approx(linear + attention + patch, rel=0.02)
    assert all(getattr(m, "fused_attn", True) for m in model.modules())  # original untouched
