"""util/layers.py: the patch embedding as one matmul equals timm's convolution; both layer choices are
made at construction and keep the reference's keys."""
import pytest
import torch
from timm.layers import PatchEmbed

import models_mae
import models_vit
from util.layers import LinearPatchEmbed, patch_embed_layer, use_attention


@pytest.mark.parametrize("kwargs", [dict(), dict(flatten=False), dict(flatten=False, output_fmt="NHWC"),
                                    dict(flatten=False, output_fmt="NLC"), dict(flatten=False, output_fmt="NCL"),
                                    dict(strict_img_size=False, dynamic_img_pad=True)],
                         ids=["flatten", "nchw", "nhwc", "nlc", "ncl", "dynamic-pad"])
def test_linear_patch_embed_equals_the_convolution(kwargs):
    torch.manual_seed(0)
    conv = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16, **kwargs)
    linear = LinearPatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16, **kwargs)
    linear.load_state_dict(conv.state_dict())
    size = 30 if kwargs.get("dynamic_img_pad") else 32  # padded up to 32 by both
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(linear(x), conv(x), rtol=1e-5, atol=1e-5)


def test_linear_patch_embed_checks_the_input_size():
    embed = LinearPatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    with pytest.raises(ValueError, match="does not match"):
        embed(torch.randn(1, 3, 40, 40))


@pytest.mark.parametrize("impl", ["conv", "linear"])
def test_models_take_the_patch_embedding_at_construction(impl):
    torch.manual_seed(0)
    reference = models_vit.vit_tiny_patch16(img_size=32, num_classes=3)
    torch.manual_seed(0)
    vit = models_vit.vit_tiny_patch16(img_size=32, num_classes=3, patch_embed=impl)
    assert type(vit.patch_embed) is patch_embed_layer(impl)
    assert list(vit.state_dict()) == list(reference.state_dict())  # same keys, same initial weights
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit.patch_embed(x), reference.patch_embed.proj(x).flatten(2).transpose(1, 2),
                               rtol=1e-5, atol=1e-5)
    mae = models_mae.mae_vit_tiny_patch16(img_size=32, patch_embed=impl)
    assert type(mae.patch_embed) is patch_embed_layer(impl)


def test_attention_choice_reaches_every_block_of_both_models():
    mae = models_mae.mae_vit_tiny_patch16(img_size=32, attn="math")
    flags = [m.fused_attn for m in mae.modules() if hasattr(m, "fused_attn")]
    assert len(flags) == 12 + 4 and not any(flags)
    vit = models_vit.vit_tiny_patch16(img_size=32, attn="math")
    assert not any(b.attn.fused_attn for b in vit.blocks)
    assert all(b.attn.fused_attn for b in models_vit.vit_tiny_patch16(img_size=32, attn="sdpa").blocks)
    with pytest.raises(ValueError):
        use_attention(vit.blocks, "flash")
    with pytest.raises(ValueError):
        patch_embed_layer("fft")
