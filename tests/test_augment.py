"""Batched augmentation: shapes, value range and labels kept, randomness per image."""

import pytest
import torch

from aelab.augment import augment, random_crop, random_flip, random_resized_crop
from aelab.config import AugmentConfig


def _batch(n=64):
    torch.manual_seed(0)
    return torch.rand(n, 3, 32, 32) * 2 - 1


@pytest.mark.parametrize("cfg", [AugmentConfig(crop="pad", pad=4, flip=True),
                                 AugmentConfig(crop="resized", scale=(0.2, 1.0), flip=True),
                                 AugmentConfig(flip=True), AugmentConfig()])
def test_shape_dtype_range_kept(cfg):
    x = _batch()
    out = augment(x, cfg)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5
    if not cfg.active:
        assert out is x


def test_crop_is_a_shift_of_the_padded_image():
    """Every output is a 32x32 window of the reflect-padded input, at its own offset."""
    x = _batch(32)
    out = random_crop(x, 4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    offsets = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(padded[i, :, dy:dy + 32, dx:dx + 32], out[i])]
        assert hits, f"image {i} is not a window of its padded input"
        offsets.add(hits[0])
    assert len(offsets) > 5  # per-image draws, not one shift for the batch


def test_flip_mirrors_about_half_and_keeps_the_others():
    x = _batch(400)
    out = random_flip(x)
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 150 < sum(flipped) < 250


def test_resized_crop_full_scale_is_identity_and_labels_stay_paired():
    """With scale and ratio fixed at 1 the crop is the whole image: bilinear resampling at
    pixel centres gives the input back, so each output still belongs to its own label."""
    x = _batch(8)
    out = random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    zoomed = random_resized_crop(x, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    assert not torch.allclose(zoomed, x)
    # images of one flat colour each: any crop of image i is still exactly colour i
    flat = torch.linspace(-0.9, 0.9, 8).view(8, 1, 1, 1).expand(8, 3, 32, 32).contiguous()
    out = augment(flat, AugmentConfig(crop="resized", scale=(0.2, 1.0), flip=True))
    torch.testing.assert_close(out, flat, atol=1e-5, rtol=0)


def test_crop_and_flip_on_bytes_is_one_window_of_the_padded_or_mirrored_image():
    """The fused crop + flip on uint8 images (what the engine runs) gives, for every image, a
    window of its reflect-padded copy, mirrored for about half of them; bytes stay bytes."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = augment(x, AugmentConfig(crop="pad", pad=4, flip=True))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    mirrored = 0
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        plain = any(torch.equal(win, out[i]) for win in windows)
        flipped = any(torch.equal(win.flip(2), out[i]) for win in windows)
        assert plain or flipped, f"image {i} is neither a window nor a mirrored window"
        mirrored += flipped and not plain
    assert 15 < mirrored < 50


def test_resized_crop_of_bytes_returns_unit_range_floats():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    out = augment(x, AugmentConfig(crop="resized", scale=(1.0, 1.0), ratio=(1.0, 1.0)))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() / 127.5 - 1, atol=1e-5, rtol=0)
