"""Tests for aelab.models: the shared autoencoder contract, MAE masking invariants, the classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aelab.models import (
    ARCHITECTURES,
    Classifier,
    ConvAutoencoder,
    FCAutoencoder,
    MAEViT,
    build_autoencoder,
)
from aelab.models.mae import patchify, random_masking, unpatchify

# Small configs so the whole file runs in seconds on a CPU.
SMALL = {
    "fc": {"hidden": (64, 32)},
    "conv": {"channels": (4, 8, 8, 16)},
    "mae": {"dim": 32, "depth": 2, "heads": 2, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    "mconv": {"channels": (4, 8, 16)},
}


def small_mae(**overrides) -> MAEViT:
    return MAEViT(**{**SMALL["mae"], **overrides})


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Deterministic images in [-1, 1]: [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters `encode` depends on (first encoder layer of each family)."""
    if isinstance(model, MAEViT):
        return [model.patch_embed.proj.weight, model.cls_token]
    if hasattr(model, "stem"):  # mconv
        return [model.stem.weight]
    return [model.encoder[0].weight]


# -- the shared contract, over the whole registry ----------------------------------------------
def test_registry_covers_the_small_configs():
    assert set(SMALL) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_loss_and_gradient_reach_encoder(arch):
    model = build_autoencoder(arch, SMALL[arch])
    x = images()
    loss, recon = model(x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert recon.shape == x.shape
    loss.backward()
    for p in encoder_parameters(model):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_encode_shape_and_finite(arch):
    model = build_autoencoder(arch, SMALL[arch]).eval()
    feats = model.encode(images(n=3))
    assert feats.shape == (3, model.feature_dim)
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_reconstruct_shapes_and_mask(arch):
    model = build_autoencoder(arch, SMALL[arch]).eval()
    x = images()
    with torch.no_grad():
        recon, mask = model.reconstruct(x)
    assert recon.shape == x.shape
    if arch in ("mae", "mconv"):
        assert mask.shape == (4, 1, 32, 32)
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        # every sample hides the same number of pixels: r of the image, rounded to whole patches
        patches = (32 // model.patch_size) ** 2
        hidden_patches = patches - int(patches * (1 - model.mask_ratio))
        assert (mask.sum(dim=(1, 2, 3)) == hidden_patches * model.patch_size**2).all()
    else:
        assert mask is None


@pytest.mark.parametrize("arch", ["fc", "conv"])
def test_fc_conv_reconstructions_cover_signed_range(arch):
    model = build_autoencoder(arch, SMALL[arch])
    # Push the output layer to saturate in both directions: Tanh must reach negative values too
    # (the seed's ReLU-before-Tanh could not).
    _, recon = model(images() * 50)
    assert recon.min() >= -1 and recon.max() <= 1
    last = [m for m in model.decoder if isinstance(m, (nn.Linear, nn.ConvTranspose2d))][-1]
    with torch.no_grad():
        last.bias.fill_(-5.0)
    assert model(images())[1].max() < 0


def test_fc_decoder_has_no_relu_before_tanh():
    model = FCAutoencoder()
    layers = list(model.decoder)
    assert isinstance(layers[-1], nn.Tanh) and isinstance(layers[-2], nn.Linear)
    assert not any(type(m) is nn.ReLU for m in model.modules())


@pytest.mark.parametrize(
    "loss, expected", [("l1", nn.functional.l1_loss), ("l2", nn.functional.mse_loss)]
)
def test_fc_loss_choice(loss, expected):
    model = FCAutoencoder(hidden=(16,), loss=loss)
    x = images(n=2)
    value, recon = model(x)
    torch.testing.assert_close(value, expected(recon, x))


def test_feature_dims_of_named_variants():
    assert FCAutoencoder().feature_dim == 384
    assert ConvAutoencoder(channels=(6, 12, 24, 48)).feature_dim == 192
    assert ConvAutoencoder(channels=(8, 16, 32, 64)).feature_dim == 256
    assert ConvAutoencoder(channels=(8, 16, 32, 64), image_size=64).feature_dim == 64 * 4 * 4
    assert ConvAutoencoder().encode(images(n=2)).shape == (2, 256)


def test_conv_rejects_image_size_not_divisible_by_16():
    with pytest.raises(ValueError, match="image_size"):
        ConvAutoencoder(image_size=40)


def test_bad_loss_name_rejected():
    with pytest.raises(ValueError, match="loss"):
        FCAutoencoder(loss="huber")
    with pytest.raises(ValueError, match="loss"):
        ConvAutoencoder(loss="l3")


# -- MAE invariants ----------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9, 0.99])
def test_random_masking_counts(ratio):
    n, length, d = 3, 64, 5
    x = torch.randn(n, length, d)
    kept, mask, ids_restore = random_masking(x, ratio)
    len_keep = max(1, int(length * (1 - ratio)))
    assert kept.shape == (n, len_keep, d)
    assert mask.shape == (n, length)
    assert (mask.sum(dim=1) == length - len_keep).all()
    # ids_restore is a permutation of 0..L-1 per sample
    assert (ids_restore.sort(dim=1).values == torch.arange(length)).all()


def test_random_masking_keeps_exactly_the_unmasked_tokens():
    n, length, d = 4, 16, 3
    x = torch.randn(n, length, d)
    x[..., 0] = torch.arange(length, dtype=torch.float32)  # channel 0 tags each token's position
    kept, mask, ids_restore = random_masking(x, 0.75)
    for i in range(n):
        positions = kept[i, :, 0].long()
        visible = torch.nonzero(mask[i] == 0).flatten()
        assert torch.equal(positions.sort().values, visible)
        assert torch.equal(kept[i], x[i, positions])  # whole token vectors, not just the tags
    # ids_restore puts kept tokens back at their original positions (what the decoder relies on)
    padded = torch.cat([kept, torch.full((n, length - kept.shape[1], d), float("nan"))], dim=1)
    restored = torch.gather(padded, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    visible = mask == 0
    assert torch.equal(restored[visible], x[visible])
    assert restored[~visible].isnan().all()


def test_pixel_mask_matches_patch_mask():
    model = small_mae(patch_size=4).eval()
    x = images(n=2)
    torch.manual_seed(7)
    with torch.no_grad():
        _, pixel_mask = model.reconstruct(x)
    torch.manual_seed(7)
    _, mask, _ = model.forward_encoder(x, model.mask_ratio)  # same noise -> same mask
    expected = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 4 * 4 * 3), 4)[:, :1]  # [N, 1, H, W]
    assert torch.equal(pixel_mask, expected)


def test_random_masking_differs_per_sample_and_keeps_at_least_one():
    kept, mask, _ = random_masking(torch.randn(8, 4, 2), 0.99)
    assert kept.shape[1] == 1
    assert len({tuple(m.tolist()) for m in random_masking(torch.randn(8, 64, 2), 0.5)[1]}) > 1


@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_patchify_roundtrip_and_layout(patch_size):
    x = images(n=2)
    patches = patchify(x, patch_size)
    g = 32 // patch_size
    assert patches.shape == (2, g * g, patch_size * patch_size * 3)
    assert torch.equal(unpatchify(patches, patch_size), x)
    # patch k (row-major) holds exactly pixels of block (k // g, k % g), channel last
    k = g + 1 if g > 1 else 0
    r, c = divmod(k, g)
    block = x[:, :, r * patch_size : (r + 1) * patch_size, c * patch_size : (c + 1) * patch_size]
    assert torch.equal(patches[:, k], block.permute(0, 2, 3, 1).reshape(2, -1))


def test_model_patchify_methods_are_inverse():
    model = small_mae(patch_size=4)
    x = images(n=2)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_ignores_visible_patches(norm_pix_loss):
    model = small_mae(norm_pix_loss=norm_pix_loss)
    x = images(n=2)
    latent, mask, ids_restore = model.forward_encoder(x, model.mask_ratio)
    pred = model.forward_decoder(latent, ids_restore).detach()
    base = model.forward_loss(x, pred, mask)
    visible = (mask == 0).unsqueeze(-1)  # [N, L, 1]
    changed = torch.where(visible, pred + 100.0, pred)
    torch.testing.assert_close(model.forward_loss(x, changed, mask), base)
    # ...while changing a masked patch does change it
    masked_changed = torch.where(~visible, pred + 1.0, pred)
    assert model.forward_loss(x, masked_changed, mask) > base


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_training_loss_is_forwards_without_the_visible_patches(norm_pix_loss):
    """The engine's loss (decoder's last block, norm and prediction on the masked patches only)
    is forward()'s loss with the same masks, with the same gradients, for fewer FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    model = small_mae(norm_pix_loss=norm_pix_loss, decoder_depth=2)
    x = images(n=3)
    runs = {}
    for name, fn in (("forward", lambda: model(x)[0]), ("training", lambda: model.training_loss(x)[0])):
        model.zero_grad()
        torch.manual_seed(7)  # the same masking draws
        with FlopCounterMode(display=False) as counter:
            loss = fn()
            loss.backward()
        runs[name] = (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()},
                       counter.get_total_flops())
    (loss_f, grads_f, flops_f), (loss_t, grads_t, flops_t) = runs["forward"], runs["training"]
    torch.testing.assert_close(loss_t, loss_f)
    for name, grad in grads_f.items():
        torch.testing.assert_close(grads_t[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert flops_t < 0.97 * flops_f


def test_loss_is_mean_over_masked_patches():
    model = small_mae()
    x = images(n=2)
    mask = torch.zeros(2, 256)
    mask[:, :10] = 1
    pred = model.patchify(x).clone()
    pred[:, :10] += 2.0  # masked patches off by 2 everywhere -> per-patch MSE 4
    pred[:, 10:] += 5.0  # visible patches don't count
    torch.testing.assert_close(model.forward_loss(x, pred, mask), torch.tensor(4.0))


def test_encode_is_deterministic_and_uses_all_patches():
    model = small_mae(pool="mean").eval()
    x = images(n=2)
    with torch.no_grad():
        a, b = model.encode(x), model.encode(x)
        assert torch.equal(a, b)
        # Changing any single patch (here the last one) changes the features: nothing is masked out.
        x2 = x.clone()
        x2[:, :, -2:, -2:] += 1.0
        assert not torch.allclose(model.encode(x2), a)
    tokens_seen = []
    handle = model.blocks[0].register_forward_hook(lambda m, i, o: tokens_seen.append(o.shape[1]))
    with torch.no_grad():
        model.encode(x)
    handle.remove()
    assert tokens_seen == [1 + 256]


def test_encode_pooling_modes():
    torch.manual_seed(1)
    cls_model = small_mae(pool="cls").eval()
    torch.manual_seed(1)
    mean_model = small_mae(pool="mean").eval()
    x = images(n=2)
    with torch.no_grad():
        tokens = cls_model.norm(cls_model.blocks(cls_model._with_cls(cls_model._tokens(x))))
        torch.testing.assert_close(cls_model.encode(x), tokens[:, 0])
        torch.testing.assert_close(mean_model.encode(x), tokens[:, 1:].mean(1))


def test_positional_embeddings_are_fixed_sincos():
    model = small_mae()
    names = {name for name, _ in model.named_parameters()}
    assert "pos_embed" not in names and "decoder_pos_embed" not in names
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert model.pos_embed.shape == (1, 257, 32)
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(32))  # CLS slot
    # distinct positions get distinct embeddings
    assert torch.unique(model.pos_embed[0, 1:], dim=0).shape[0] == 256
    # they survive a training step unchanged
    before = model.pos_embed.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(images(n=2))[0].backward()
    opt.step()
    assert torch.equal(model.pos_embed, before)


def test_mae_init():
    model = small_mae()
    assert 0.005 < model.cls_token.std() < 0.05 and 0.005 < model.mask_token.std() < 0.05
    lin = model.decoder_embed
    bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
    assert lin.weight.abs().max() <= bound and torch.equal(lin.bias, torch.zeros_like(lin.bias))
    assert torch.equal(model.norm.weight, torch.ones(32)) and torch.equal(model.norm.bias, torch.zeros(32))


def test_mae_mask_ratio_is_used_by_forward():
    model = small_mae(mask_ratio=0.5)
    _, pixel_mask = model.reconstruct(images(n=2))
    assert (pixel_mask.mean(dim=(1, 2, 3)) == 0.5).all()


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_bad_mask_ratio_rejected(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        small_mae(mask_ratio=ratio)


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"image_size": 30, "patch_size": 4}, "patch_size"),
        ({"dim": 30, "heads": 4}, "heads"),
        ({"pool": "max"}, "pool"),
    ],
)
def test_bad_mae_options_rejected(overrides, name):
    with pytest.raises(ValueError, match=name):
        small_mae(**overrides)


# -- classifier ---------------------------------------------------------------------------------
def one_step(clf: Classifier) -> None:
    opt = torch.optim.Adam(clf.trainable_parameters(), lr=1e-2)
    clf.train()
    loss = nn.functional.cross_entropy(clf(images(n=4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_frozen_backbone_is_untouched(arch, head):
    backbone = build_autoencoder(arch, SMALL[arch])
    clf = Classifier(backbone, num_classes=5, head=head, freeze=True)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    head_before = [p.clone() for p in clf.head.parameters()]
    one_step(clf)
    assert backbone.training is False
    assert clf.training is True and clf.head.training is True
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(head_before, clf.head.parameters()))
    trainable = {id(p) for p in clf.trainable_parameters()}
    assert trainable == {id(p) for p in clf.head.parameters()}
    assert isinstance(clf.feature_norm, nn.BatchNorm1d) and not clf.feature_norm.affine


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_finetune_updates_backbone(arch):
    backbone = build_autoencoder(arch, SMALL[arch])
    clf = Classifier(backbone, num_classes=5, head="linear", freeze=False)
    before = [p.clone() for p in encoder_parameters(backbone)]
    one_step(clf)
    assert backbone.training is True
    assert all(not torch.equal(a, b) for a, b in zip(before, encoder_parameters(backbone)))
    assert isinstance(clf.feature_norm, nn.Identity)
    decoder = {id(p) for p in backbone.decoder_parameters()}
    assert {id(p) for p in clf.trainable_parameters()} == {
        id(p) for p in clf.parameters() if id(p) not in decoder}  # everything but the decoder


def test_frozen_features_carry_no_graph():
    clf = Classifier(build_autoencoder("fc", SMALL["fc"]), num_classes=3, freeze=True)
    assert not clf.features(images(n=2)).requires_grad


def test_mlp_head_layout_and_output_shape():
    backbone = build_autoencoder("conv", SMALL["conv"])  # feature_dim 16 * 2 * 2 = 64
    clf = Classifier(backbone, num_classes=100, head="mlp", hidden=150, dropout=0.3)
    kinds = [type(m) for m in clf.head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (clf.head[0].in_features, clf.head[0].out_features) == (64, 150)
    assert clf.head[2].p == 0.3
    assert (clf.head[3].in_features, clf.head[3].out_features) == (150, 100)
    assert clf(images(n=3)).shape == (3, 100)
    linear = Classifier(build_autoencoder("conv", SMALL["conv"]), num_classes=10, head="linear")
    assert isinstance(linear.head, nn.Linear) and linear(images(n=2)).shape == (2, 10)


def test_classifier_rejects_bad_head():
    with pytest.raises(ValueError, match="head"):
        Classifier(FCAutoencoder(hidden=(8,)), num_classes=3, head="transformer")


# -- registry -----------------------------------------------------------------------------------
def test_build_unknown_arch():
    with pytest.raises(ValueError, match=r"unknown architecture 'vae'; expected one of fc, conv, mae, mconv"):
        build_autoencoder("vae", {})


def test_build_unknown_option_names_option_and_arch():
    with pytest.raises(ValueError, match=r"'hiddden'.*'fc'"):
        build_autoencoder("fc", {"hiddden": (8,)})
    with pytest.raises(ValueError, match=r"'patch'.*'mae'"):
        build_autoencoder("mae", {"patch": 4})


def test_build_passes_options_and_mask_ratio():
    model = build_autoencoder("mae", SMALL["mae"], mask_ratio=0.6)
    assert isinstance(model, MAEViT) and model.mask_ratio == 0.6 and model.feature_dim == 32
    assert build_autoencoder("mae", {**SMALL["mae"], "mask_ratio": 0.5}).mask_ratio == 0.5
    conv = build_autoencoder("conv", {"channels": [6, 12, 24, 48], "loss": "l1"}, mask_ratio=0.9)
    assert conv.feature_dim == 192 and conv.loss_name == "l1"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_trained_classifier_has_no_parameter_without_a_gradient(arch):
    """Every trainable parameter of a fine-tuned classifier gets a gradient (DDP fails
    otherwise): the decoder, which `encode` never reaches, is frozen."""
    clf = Classifier(build_autoencoder(arch, SMALL[arch]), num_classes=3)
    loss, _ = clf.training_loss(images(), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable and {n for n, p in clf.named_parameters() if p.grad is not None} == trainable
    decoder = {id(p) for p in clf.backbone.decoder_parameters()}
    assert decoder and all(not p.requires_grad for p in clf.backbone.decoder_parameters())
    assert all(id(p) in decoder for n, p in clf.backbone.named_parameters() if not p.requires_grad)
