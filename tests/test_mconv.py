"""The masked convolutional autoencoder: hidden pixels provably never reach visible activations,
normalisation statistics come from visible positions, the loss counts hidden pixels only, and a
classifier sees the whole image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aelab.models.mconv as mconv
from aelab.models import build_autoencoder
from aelab.models.mconv import (MaskedBatchNorm2d, MaskedConvAutoencoder, random_patch_mask,
                                upsample_mask)


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def model(**options) -> MaskedConvAutoencoder:
    torch.manual_seed(0)
    return MaskedConvAutoencoder(**{"channels": (4, 8, 16), "blocks": 1, **options})


def _randomise_norms(net: MaskedConvAutoencoder) -> None:
    """Non-trivial affine parameters and running statistics, so nothing cancels by accident
    (the residual branches start with a zero scale)."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data = torch.randn(t.shape, generator=g)
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5


def hidden_pixel_gradient(net: MaskedConvAutoencoder, mask: torch.Tensor) -> torch.Tensor:
    """d(sum of every visible activation at every scale, randomly weighted) / d(input), at the
    pixels the mask hides; also asserts the visible pixels do get a gradient."""
    x = images(n=mask.shape[0]).requires_grad_(True)
    maps = net.features(x, mask)
    g = torch.Generator().manual_seed(2)
    total = sum((f * torch.randn(f.shape, generator=g)).sum() for f in maps)
    (grad,) = torch.autograd.grad(total, x)
    visible = upsample_mask(mask, 32).expand_as(grad).bool()
    assert grad[visible].abs().sum() > 0
    return grad[~visible]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels, stem_stride", [((4, 8, 16), 1), ((4, 8, 8, 16), 1),
                                                   ((4, 8, 16), 2)])
def test_hidden_pixels_cannot_influence_visible_activations(train, channels, stem_stride):
    net = model(channels=channels, stem_stride=stem_stride)
    _randomise_norms(net)
    net.train(train)  # batch statistics over visible positions, or running statistics
    torch.manual_seed(3)
    mask = random_patch_mask(4, net.grid, 0.6, torch.device("cpu"))
    assert hidden_pixel_gradient(net, mask).abs().max() == 0


def test_the_invariance_test_catches_a_leak(monkeypatch):
    """Without re-masking the dense convs see hidden pixels: the same check must fail."""
    net = model()
    _randomise_norms(net)
    monkeypatch.setattr(mconv, "_keep", lambda x, mask: x)
    torch.manual_seed(3)
    mask = random_patch_mask(4, net.grid, 0.6, torch.device("cpu"))
    assert hidden_pixel_gradient(net, mask).abs().max() > 0


def test_hidden_pixels_of_one_image_do_not_move_another_images_statistics():
    """Batch statistics are shared across the batch: changing only hidden pixels changes no
    visible activation of any image."""
    net = model().train()
    _randomise_norms(net)
    torch.manual_seed(4)
    mask = random_patch_mask(4, net.grid, 0.75, torch.device("cpu"))
    x = images()
    hidden = 1 - upsample_mask(mask, 32)
    y = x + hidden * torch.randn_like(x) * 5  # only hidden pixels differ
    for a, b in zip(net.features(x, mask), net.features(y, mask)):
        assert torch.allclose(a, b, atol=1e-5)


def test_masked_batchnorm_uses_visible_positions_only():
    torch.manual_seed(5)
    norm = MaskedBatchNorm2d(3, momentum=0.5).train()
    x = torch.randn(2, 3, 4, 4) * 3 + 1
    mask = (torch.rand(2, 1, 4, 4) > 0.5).float()
    out = norm(x, mask)
    visible = x.permute(0, 2, 3, 1)[mask[:, 0].bool()]  # [P, C]
    reference = torch.nn.BatchNorm1d(3, momentum=0.5).train()
    expected = reference(visible)
    assert torch.allclose(out.permute(0, 2, 3, 1)[mask[:, 0].bool()], expected, atol=1e-5)
    assert (out * (1 - mask)).abs().max() == 0  # hidden positions stay zero
    assert torch.allclose(norm.running_mean, reference.running_mean, atol=1e-6)
    assert torch.allclose(norm.running_var, reference.running_var, atol=1e-5)
    assert int(norm.num_batches_tracked) == 1


def test_masked_batchnorm_without_mask_is_batchnorm():
    torch.manual_seed(6)
    norm, reference = MaskedBatchNorm2d(3).train(), torch.nn.BatchNorm2d(3).train()
    x = torch.randn(4, 3, 5, 5)
    assert torch.allclose(norm(x), reference(x), atol=1e-6)


@pytest.mark.parametrize("ratio", [0.25, 0.6, 0.75, 0.9])
def test_mask_keeps_the_same_number_of_patches_per_image(ratio):
    mask = random_patch_mask(16, 8, ratio, torch.device("cpu"))
    assert mask.shape == (16, 1, 8, 8)
    assert (mask.sum(dim=(1, 2, 3)) == max(1, int(64 * (1 - ratio)))).all()
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 1  # random per image


def test_mask_grid_is_the_encoder_stride():
    assert model(channels=(4, 8, 16)).grid == 8  # stride 4: 8x8 grid of 4x4 patches
    assert model(channels=(4, 8, 16, 16)).grid == 4  # stride 8: 4x4 grid of 8x8 patches
    assert model(channels=(4, 8, 16), stem_stride=2).grid == 4


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_counts_hidden_pixels_only(norm_pix_loss):
    net = model(norm_pix_loss=norm_pix_loss)
    x = images()
    torch.manual_seed(7)
    mask = random_patch_mask(4, net.grid, 0.6, torch.device("cpu"))
    pred = torch.randn(4, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(net.forward_loss(x, pred, mask), pred)
    visible = upsample_mask(mask, 32).expand_as(grad).bool()
    assert grad[visible].abs().max() == 0 and grad[~visible].abs().min() > 0
    # a perfect prediction of the (normalised) target has zero loss
    assert net.forward_loss(x, net._target(x), mask) < 1e-10


def test_norm_pix_target_normalises_each_patch():
    net = model(norm_pix_loss=True)
    target = net._target(images())
    patches = target.unfold(2, 4, 4).unfold(3, 4, 4)  # [N, C, 8, 8, 4, 4]
    per_patch = patches.permute(0, 2, 3, 1, 4, 5).reshape(4, 64, -1)
    assert torch.allclose(per_patch.mean(-1), torch.zeros(4, 64), atol=1e-5)
    assert torch.allclose(per_patch.std(-1), torch.ones(4, 64), atol=1e-3)


def test_encode_sees_the_whole_image_and_is_deterministic():
    net = model().eval()
    x = images().requires_grad_(True)
    feats = net.encode(x)
    assert feats.shape == (4, 16)
    assert torch.equal(feats, net.encode(x))  # no random mask when classifying
    (grad,) = torch.autograd.grad(feats.sum(), x)
    # every 4x4 patch of every image influences its features
    per_patch = grad.abs().sum(1).unfold(1, 4, 4).unfold(2, 4, 4).sum((-1, -2))
    assert (per_patch > 0).all()


def test_reconstruct_predicts_in_pixel_space_with_the_mask_it_used():
    net = model(norm_pix_loss=True).eval()
    x = images()
    torch.manual_seed(9)
    with torch.no_grad():
        recon, hidden = net.reconstruct(x)
        torch.manual_seed(9)  # the same mask again
        mask = random_patch_mask(4, net.grid, net.mask_ratio, torch.device("cpu"))
        pred = net.decode(net.features(x, mask), mask)
    assert torch.equal(hidden, 1 - upsample_mask(mask, 32))
    # de-normalised: re-normalising each patch with the image's own statistics gives the raw
    # prediction back
    from aelab.models.mae import patchify
    patches = patchify(x, net.patch_size)
    mean, std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert torch.allclose((patchify(recon, net.patch_size) - mean) / std,
                          patchify(pred, net.patch_size), atol=1e-4)


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    net = model()
    # smooth images (4x4 random colours, upsampled): hidden pixels are predictable from
    # their visible neighbours, unlike pixel noise
    x = F.interpolate(images(n=8)[:, :, :4, :4], size=32, mode="bilinear")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        torch.manual_seed(8)  # the same mask every step: a fixed task
        loss, _ = net(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_top_level_mask_ratio_unless_the_variant_sets_its_own():
    assert build_autoencoder("mconv", {"channels": [4, 8]}, mask_ratio=0.9).mask_ratio == 0.9
    own = build_autoencoder("mconv", {"channels": [4, 8], "mask_ratio": 0.5}, mask_ratio=0.9)
    assert own.mask_ratio == 0.5


@pytest.mark.parametrize("options, message", [
    ({"channels": [8]}, "at least two"),
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"channels": [4, 8, 8, 8, 8, 8]}, "total stride of 32"),
    ({"blocks": -1}, "blocks"),
    ({"stem_stride": 3}, "stem_stride"),
])
def test_bad_options_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        MaskedConvAutoencoder(**options)


def test_finetuning_gradient_flows_through_unmasked_batchnorm():
    net = model().train()
    out = net.encode(images())
    F.mse_loss(out, torch.zeros_like(out)).backward()
    assert net.stem.weight.grad.abs().sum() > 0
