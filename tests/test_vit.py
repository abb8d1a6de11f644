"""aelab.models.vit against timm's own modules: the same initial weights from a seed, the same
outputs and gradients, bit for bit (the MAE's blocks were timm's; results must not move)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from aelab.models import mae as mae_module
from aelab.models.mae import MAEViT
from aelab.models.vit import Block, PatchEmbed

timm_layers = pytest.importorskip("timm.layers")
timm_vit = pytest.importorskip("timm.models.vision_transformer")

NORM = partial(nn.LayerNorm, eps=1e-6)  # the MAE's


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), key


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("dim,heads,tokens", [(64, 4, 17), (48, 3, 65), (192, 3, 257)])
@pytest.mark.parametrize("fused", [True, False])
def test_block_matches_timm(dim, heads, tokens, fused):
    torch.manual_seed(3)
    ours = Block(dim, heads, 4.0, qkv_bias=True, norm_layer=NORM)
    torch.manual_seed(3)
    theirs = timm_vit.Block(dim, heads, 4.0, qkv_bias=True, norm_layer=NORM)
    _same_state(ours, theirs)
    ours.attn.fused_attn = theirs.attn.fused_attn = fused
    # non-trivial LayerNorm affine, so a swapped norm1/norm2 or a missing bias would show
    with torch.no_grad():
        for a, b in zip(ours.parameters(), theirs.parameters()):
            noise = torch.randn_like(a) * 0.1
            a.add_(noise)
            b.add_(noise)
    x = torch.randn(4, tokens, dim)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert torch.equal(ya, yb)
    grad_out = torch.randn_like(ya)
    ya.backward(grad_out)
    yb.backward(grad_out)
    assert torch.equal(xa.grad, xb.grad)
    ga, gb = _grads(ours), _grads(theirs)
    assert list(ga) == list(gb)
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name


def test_explicit_attention_is_the_fused_maths():
    torch.manual_seed(0)
    block = Block(64, 4, norm_layer=NORM)
    x = torch.randn(2, 17, 64)
    fused = block(x)
    block.attn.fused_attn = False
    torch.testing.assert_close(block(x), fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_block_at_some_tokens_is_the_whole_block_there(fused):
    """Block(x, rows) is Block(x) gathered at `rows` (each sample its own tokens, in any
    order), and so are the gradients it sends to the input and the parameters."""
    torch.manual_seed(4)
    block = Block(48, 3, norm_layer=NORM)
    block.attn.fused_attn = fused
    with torch.no_grad():
        for param in block.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    x = torch.randn(3, 17, 48)
    rows = torch.stack([torch.randperm(17)[:5] for _ in range(3)])  # [B, R]
    grad_out = torch.randn(3, 5, 48)

    xa = x.clone().requires_grad_()
    whole = torch.gather(block(xa), 1, rows.unsqueeze(-1).expand(-1, -1, 48))
    whole.backward(grad_out)
    ga, xa_grad = _grads(block), xa.grad
    block.zero_grad()
    xb = x.clone().requires_grad_()
    part = block(xb, rows)
    part.backward(grad_out)
    assert part.shape == (3, 5, 48)
    torch.testing.assert_close(part, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xb.grad, xa_grad, rtol=1e-5, atol=1e-6)
    for name, grad in _grads(block).items():
        torch.testing.assert_close(grad, ga[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,patch,dim", [(32, 2, 192), (32, 8, 64), (28, 4, 32)])
def test_patch_embed_matches_timm(size, patch, dim):
    torch.manual_seed(5)
    ours = PatchEmbed(size, patch, in_chans=3, embed_dim=dim)
    torch.manual_seed(5)
    theirs = timm_layers.PatchEmbed(size, patch, in_chans=3, embed_dim=dim)
    _same_state(ours, theirs)
    assert ours.num_patches == theirs.num_patches
    assert tuple(ours.grid_size) == tuple(theirs.grid_size)
    x = torch.randn(2, 3, size, size)
    assert torch.equal(ours(x), theirs(x))


def test_patch_embed_rejects_another_image_size():
    with pytest.raises(ValueError, match="32x32"):
        PatchEmbed(32, 4, embed_dim=16)(torch.zeros(1, 3, 28, 28))


def test_mae_is_the_same_model_as_with_timm_blocks(monkeypatch):
    """The whole MAE built with our modules and with timm's (same seed): same weights, same
    pretraining loss and gradients, same features; and each model loads the other's state."""
    kwargs = dict(patch_size=8, dim=64, depth=2, heads=4, decoder_dim=32, decoder_depth=1,
                  decoder_heads=2, norm_pix_loss=True, pool="mean")
    torch.manual_seed(11)
    ours = MAEViT(**kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(mae_module, "Block", timm_vit.Block)
        patch.setattr(mae_module, "PatchEmbed", timm_layers.PatchEmbed)
        torch.manual_seed(11)
        theirs = MAEViT(**kwargs)
    assert isinstance(theirs.blocks[0], timm_vit.Block)
    assert isinstance(ours.blocks[0], Block)
    _same_state(ours, theirs)

    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)  # the masking draws
    loss_a, rec_a = ours(x)
    torch.manual_seed(1)
    loss_b, rec_b = theirs(x)
    assert torch.equal(loss_a, loss_b) and torch.equal(rec_a, rec_b)
    loss_a.backward()
    loss_b.backward()
    ga, gb = _grads(ours), _grads(theirs)
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name
    with torch.no_grad():
        assert torch.equal(ours.encode(x), theirs.encode(x))
    ours.load_state_dict(theirs.state_dict())  # strict: same keys both ways
    theirs.load_state_dict(ours.state_dict())
