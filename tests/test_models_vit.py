"""Tests for models_vit: registry, forward/backward, global pooling, loading MAE weights."""
import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import models_mae
import models_vit
import util.layers
from util.registry import UnknownModelError

ARCH = {  # name: (patch, width, depth, heads)
    "vit_base_patch16": (16, 768, 12, 12),
    "vit_large_patch16": (16, 1024, 24, 16),
    "vit_huge_patch14": (14, 1280, 32, 16),
    "vit_giant_patch14": (14, 1408, 40, 16),
}


def _small_kwargs(name):
    """Keep every model cheap (two blocks) while keeping its width."""
    patch = 14 if "patch14" in name else 4 if "patch4" in name else 16
    return dict(img_size=2 * patch, num_classes=5, depth=2)  # full width, few blocks


@pytest.mark.parametrize("global_pool", [True, False])
@pytest.mark.parametrize("name", sorted(models_vit.MODELS))
def test_forward_backward_every_registered_model(name, global_pool):
    kw = _small_kwargs(name)
    model = models_vit.MODELS[name](global_pool=global_pool, drop_path_rate=0.1, **kw)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    out = model(x)
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None, f"no gradient for {n}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {n}"
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


@pytest.mark.parametrize("name", sorted(ARCH))
def test_reference_architectures(name):
    patch, width, depth, heads = ARCH[name]
    with torch.device("meta"):
        m = models_vit.__dict__[name](num_classes=7)
    assert m.patch_embed.proj.weight.shape == (width, 3, patch, patch)
    assert len(m.blocks) == depth and m.blocks[0].attn.num_heads == heads
    assert m.blocks[0].attn.qkv.bias is not None
    assert m.blocks[0].mlp.fc1.out_features == (6144 if "giant" in name else 4 * width)
    assert m.head.in_features == width and m.head.out_features == 7
    assert m.pos_embed.shape == (1, (224 // patch) ** 2 + 1, width)
    norms = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    assert norms and all(mod.eps == 1e-6 for mod in norms)


def test_grad_checkpointing_gives_the_same_gradients_with_drop_path(monkeypatch):
    reentrant = []

    def spy(*args, **kwargs):
        reentrant.append(kwargs.get("use_reentrant"))
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(util.layers, "checkpoint", spy)
    monkeypatch.setenv("TIMM_REENTRANT_CKPT", "1")  # timm's own path would follow it; ours does not use it

    def grads(checkpointing):
        torch.manual_seed(0)
        m = models_vit.vit_tiny_patch16(img_size=32, depth=3, num_classes=4, drop_path_rate=0.5)
        m.set_grad_checkpointing(checkpointing)
        calls = [0] * len(m.blocks)
        for i, blk in enumerate(m.blocks):
            blk.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        torch.manual_seed(1)  # drop path draws from this stream; the recomputation replays it
        m(torch.randn(4, 3, 32, 32)).pow(2).sum().backward()
        return {n: p.grad for n, p in m.named_parameters()}, calls

    (a, calls_a), (b, calls_b) = grads(False), grads(True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # checkpointing is not a no-op: each block is entered again in the backward (a pre-hook:
    # the recomputation stops early, before forward hooks), through non-reentrant checkpoints
    assert calls_a == [1, 1, 1] and calls_b == [2, 2, 2]
    assert reentrant == [False] * 3


def test_global_pool_mean_of_patch_tokens_then_fc_norm():
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch16(img_size=32, depth=2, num_classes=4, global_pool=True).eval()
    sd = model.state_dict()
    assert "norm.weight" not in sd and "norm.bias" not in sd
    assert "fc_norm.weight" in sd and "fc_norm.bias" in sd
    assert isinstance(model.fc_norm, nn.LayerNorm) and model.fc_norm.eps == 1e-6
    # make fc_norm non-trivial so that skipping it would be noticed
    with torch.no_grad():
        model.fc_norm.weight.uniform_(0.5, 1.5)
        model.fc_norm.bias.uniform_(-0.5, 0.5)
        model.head.weight.normal_()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)  # [N, 1+L, D]
        assert feats.shape == (3, 5, 192)
        pooled = feats[:, 1:].mean(dim=1)
        mu = pooled.mean(-1, keepdim=True)
        var = pooled.var(-1, unbiased=False, keepdim=True)
        normed = (pooled - mu) / torch.sqrt(var + 1e-6) * model.fc_norm.weight + model.fc_norm.bias
        expected = normed @ model.head.weight.T + model.head.bias
        out = model(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        # the cls token or the mean over all tokens would give other values
        with_cls = model.head(model.fc_norm(feats.mean(dim=1)))
        assert not torch.allclose(out, with_cls, atol=1e-4)


def test_cls_token_pooling_when_global_pool_is_false():
    model = models_vit.vit_tiny_patch16(img_size=32, depth=2, num_classes=4, global_pool=False).eval()
    sd = model.state_dict()
    assert "norm.weight" in sd and "norm.bias" in sd
    assert not any(k.startswith("fc_norm") for k in sd)
    with torch.no_grad():
        model.head.weight.normal_()
        x = torch.randn(2, 3, 32, 32)
        feats = model.forward_features(x)
        torch.testing.assert_close(model(x), feats[:, 0] @ model.head.weight.T + model.head.bias,
                                   rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(x), model.head(feats[:, 1:].mean(1)), atol=1e-4)


@pytest.mark.parametrize("global_pool", [True, False])
def test_loading_mae_weights_leaves_exactly_the_head_missing(global_pool):
    mae = models_mae.mae_vit_tiny_patch16(img_size=32, depth=2, decoder_depth=1)
    vit = models_vit.vit_tiny_patch16(img_size=32, depth=2, num_classes=10, global_pool=global_pool)
    msg = vit.load_state_dict(mae.state_dict(), strict=False)
    expected_missing = {"head.weight", "head.bias"}
    if global_pool:
        expected_missing |= {"fc_norm.weight", "fc_norm.bias"}
    assert set(msg.missing_keys) == expected_missing
    allowed_extra = {"norm.weight", "norm.bias"} if global_pool else set()
    for k in msg.unexpected_keys:
        assert k.startswith("decoder_") or k == "mask_token" or k in allowed_extra, k
    assert "mask_token" in msg.unexpected_keys and "decoder_pred.weight" in msg.unexpected_keys
    # the encoder weights really arrived
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.mlp.fc2.weight"):
        torch.testing.assert_close(vit.state_dict()[k], mae.state_dict()[k], rtol=0, atol=0)
    if not global_pool:
        torch.testing.assert_close(vit.norm.weight, mae.norm.weight, rtol=0, atol=0)


def test_head_and_no_weight_decay_exist():
    m = models_vit.vit_small_patch16(img_size=32, depth=1, num_classes=3)
    assert m.head.in_features == 384
    nwd = m.no_weight_decay()
    assert {"cls_token", "pos_embed"} <= set(nwd)
    names = dict(m.named_parameters())
    assert all(n in names for n in ("cls_token", "pos_embed"))


def test_create_model_and_unknown_name():
    m = models_vit.create_model("vit_tiny_patch16", img_size=32, depth=1, num_classes=2)
    assert isinstance(m, models_vit.VisionTransformer) and m.head.out_features == 2
    with pytest.raises(UnknownModelError) as exc:
        models_vit.create_model("vit_enormous_patch2")
    assert "vit_base_patch16" in str(exc.value) and "vit_huge_patch14" in str(exc.value)
