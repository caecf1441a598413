"""Tests for models_mae: registry, forward/backward, patchify, masking, loss, initialisation."""
import math

import pytest
import torch
import torch.nn as nn

import models_mae
from util.pos_embed import get_2d_sincos_pos_embed
from util.registry import UnknownModelError

REFERENCE_NAMES = {
    # name: (patch, width, depth, heads, decoder width, decoder depth, decoder heads)
    "mae_vit_base_patch16_dec512d8b": (16, 768, 12, 12, 512, 8, 16),
    "mae_vit_large_patch16_dec512d8b": (16, 1024, 24, 16, 512, 8, 16),
    "mae_vit_huge_patch14_dec512d8b": (14, 1280, 32, 16, 512, 8, 16),
    "mae_vit_base_patch16": (16, 768, 12, 12, 512, 8, 16),
    "mae_vit_large_patch16": (16, 1024, 24, 16, 512, 8, 16),
    "mae_vit_huge_patch14": (14, 1280, 32, 16, 512, 8, 16),
}


def _tiny(**kwargs):
    """A very small MAE: 8x8 images, 4x4 patches, 2x2 grid."""
    cfg = dict(img_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2,
               decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.)
    cfg.update(kwargs)
    return models_mae.MaskedAutoencoderViT(**cfg)


def _naive_patchify(imgs, p):
    """Loop version of patchify: row-major patches; inside a patch row, column, channel."""
    n_img, c_in, height, width = imgs.shape
    h, w = height // p, width // p
    out = torch.empty(n_img, h * w, p * p * c_in, dtype=imgs.dtype)
    for n in range(n_img):
        for gi in range(h):
            for gj in range(w):
                vec = [imgs[n, ch, gi * p + r, gj * p + c]
                       for r in range(p) for c in range(p) for ch in range(c_in)]
                out[n, gi * w + gj] = torch.stack(vec)
    return out


def _small_kwargs(name):
    """Keep big models cheap (few blocks) while keeping their width."""
    patch = 14 if "patch14" in name else 4 if "patch4" in name else 16
    kw = dict(img_size=2 * patch)  # a 2x2 grid
    if any(s in name for s in ("base", "large", "huge", "giant")):
        kw.update(depth=2, decoder_depth=1)
    return kw


# ----------------------------------------------------------------------------
# registry


@pytest.mark.parametrize("name", sorted({fn.__name__ for fn in models_mae.MODELS.values()}))  # aliases: below
def test_forward_backward_every_registered_model(name):
    kw = _small_kwargs(name)
    model = models_mae.MODELS[name](**kw)
    p = model.patch_embed.patch_size[0]
    imgs = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    L = (kw["img_size"] // p) ** 2
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (2, L, p * p * 3)
    assert mask.shape == (2, L)
    assert mask.sum(dim=1).tolist() == [L - int(L * 0.25)] * 2
    assert torch.isfinite(pred).all()
    loss.backward()
    trainable = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    assert len(trainable) > 0
    for n, q in trainable:
        assert q.grad is not None, f"no gradient for {n}"
        assert torch.isfinite(q.grad).all(), f"non-finite gradient for {n}"
    assert model.pos_embed.grad is None and model.decoder_pos_embed.grad is None
    assert any(q.grad.abs().sum() > 0 for _, q in trainable)


@pytest.mark.parametrize("name", sorted(REFERENCE_NAMES))
def test_reference_names_and_architecture(name):
    patch, width, depth, heads, dwidth, ddepth, dheads = REFERENCE_NAMES[name]
    fn = models_mae.__dict__[name]
    assert callable(fn)
    with torch.device("meta"):  # full size, but no memory or init cost
        m = fn()
    assert isinstance(m, models_mae.MaskedAutoencoderViT)
    assert m.patch_embed.proj.weight.shape == (width, 3, patch, patch)
    assert len(m.blocks) == depth and m.blocks[0].attn.num_heads == heads
    assert m.blocks[0].mlp.fc1.out_features == 4 * width
    assert m.blocks[0].attn.qkv.bias is not None
    assert m.decoder_embed.out_features == dwidth
    assert len(m.decoder_blocks) == ddepth and m.decoder_blocks[0].attn.num_heads == dheads
    assert m.decoder_pred.out_features == patch * patch * 3
    assert m.pos_embed.shape == (1, (224 // patch) ** 2 + 1, width)
    norms = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    assert norms and all(mod.eps == 1e-6 for mod in norms)


def test_giant_is_vit_g14_with_the_usual_decoder():
    assert models_mae.mae_vit_giant_patch14 is models_mae.mae_vit_giant_patch14_dec512d8b
    with torch.device("meta"):
        m = models_mae.mae_vit_giant_patch14()
    assert m.patch_embed.proj.weight.shape == (1408, 3, 14, 14) and m.pos_embed.shape == (1, 257, 1408)
    assert len(m.blocks) == 40 and m.blocks[0].attn.num_heads == 16 and m.blocks[0].mlp.fc1.out_features == 6144
    assert m.decoder_embed.out_features == 512 and len(m.decoder_blocks) == 8
    assert m.decoder_blocks[0].attn.num_heads == 16 and m.decoder_blocks[0].mlp.fc1.out_features == 2048
    # counted by hand: a block of width D and MLP H holds 4D^2 + 4D (attention) + 2DH + H + D (MLP) + 4D (norms)
    def block(d, h):
        return 4 * d * d + 4 * d + 2 * d * h + h + d + 4 * d
    encoder = 1408 * 3 * 14 * 14 + 1408 + 1408 + 257 * 1408 + 40 * block(1408, 6144) + 2 * 1408
    decoder = 1408 * 512 + 512 + 512 + 257 * 512 + 8 * block(512, 2048) + 2 * 512 + 512 * 14 * 14 * 3 + 14 * 14 * 3
    assert sum(p.numel() for p in m.parameters()) == encoder + decoder == 1_037_577_676


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    def grads(checkpointing):
        torch.manual_seed(0)
        m = models_mae.mae_vit_tiny_patch16(img_size=32, depth=2, decoder_depth=2)
        m.set_grad_checkpointing(checkpointing)
        blocks = [*m.blocks, *m.decoder_blocks]
        calls = [0] * len(blocks)
        for i, blk in enumerate(blocks):
            blk.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        torch.manual_seed(1)
        loss = m(torch.randn(3, 3, 32, 32))[0]  # masks drawn from the seeded stream
        loss.backward()
        return loss, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}, calls

    loss_a, a, calls_a = grads(False)
    loss_b, b, calls_b = grads(True)
    assert torch.equal(loss_a, loss_b) and a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # checkpointing is not a no-op: every encoder and decoder block is entered again in the
    # backward (counted by a pre-hook: the recomputation stops early, before forward hooks)
    assert calls_a == [1] * 4 and calls_b == [2] * 4


def test_aliases_are_the_full_constructors():
    assert models_mae.mae_vit_base_patch16 is models_mae.mae_vit_base_patch16_dec512d8b
    assert models_mae.mae_vit_large_patch16 is models_mae.mae_vit_large_patch16_dec512d8b
    assert models_mae.mae_vit_huge_patch14 is models_mae.mae_vit_huge_patch14_dec512d8b
    for name in models_mae.MODELS:
        assert models_mae.__dict__[name] is models_mae.MODELS[name]


def test_create_model_passes_kwargs_and_rejects_unknown_names():
    m = models_mae.create_model("mae_vit_tiny_patch16", img_size=32, depth=1, decoder_depth=1,
                                norm_pix_loss=True)
    assert m.norm_pix_loss is True and len(m.blocks) == 1
    assert m.patch_embed.num_patches == 4
    with pytest.raises(UnknownModelError) as exc:
        models_mae.create_model("mae_vit_gigantic_patch3")
    msg = str(exc.value)
    assert "mae_vit_gigantic_patch3" in msg
    for name in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"):
        assert name in msg
    assert isinstance(exc.value, ValueError)


# ----------------------------------------------------------------------------
# structure and state-dict names


def _block_keys(prefix, i):
    sub = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
           "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
           "mlp.fc2.weight", "mlp.fc2.bias"]
    return [f"{prefix}.{i}.{s}" for s in sub]


def test_construction_order_and_state_dict_keys():
    m = models_mae.mae_vit_tiny_patch16(img_size=32, depth=2, decoder_depth=1)
    assert list(m._modules) == ["patch_embed", "blocks", "norm", "decoder_embed",
                                "decoder_blocks", "decoder_norm", "decoder_pred"]
    assert list(m._parameters) == ["cls_token", "pos_embed", "mask_token", "decoder_pos_embed"]
    expected = (["cls_token", "pos_embed", "mask_token", "decoder_pos_embed",
                 "patch_embed.proj.weight", "patch_embed.proj.bias"]
                + _block_keys("blocks", 0) + _block_keys("blocks", 1)
                + ["norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias"]
                + _block_keys("decoder_blocks", 0)
                + ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"])
    sd = m.state_dict()
    assert list(sd) == expected
    D, Dd, L = 192, 128, 4
    assert sd["cls_token"].shape == (1, 1, D)
    assert sd["pos_embed"].shape == (1, L + 1, D)
    assert sd["mask_token"].shape == (1, 1, Dd)
    assert sd["decoder_pos_embed"].shape == (1, L + 1, Dd)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    assert sd["decoder_embed.weight"].shape == (Dd, D)
    assert sd["decoder_pred.weight"].shape == (16 * 16 * 3, Dd)
    assert sd["decoder_pred.bias"].shape == (16 * 16 * 3,)
    assert m.pos_embed.requires_grad is False
    assert m.decoder_pos_embed.requires_grad is False
    assert m.cls_token.requires_grad and m.mask_token.requires_grad


# ----------------------------------------------------------------------------
# patchify


def test_patchify_hand_built_example():
    m = _tiny()
    # pixel value encodes (channel, y, x) exactly
    ch, y, x = torch.meshgrid(torch.arange(3), torch.arange(8), torch.arange(8), indexing="ij")
    imgs = (ch * 1000 + y * 100 + x).float().unsqueeze(0)
    out = m.patchify(imgs)
    assert out.shape == (1, 4, 4 * 4 * 3)
    # patch 1 is grid row 0, column 1: pixels y 0..3, x 4..7
    assert out[0, 1, :6].tolist() == [4, 1004, 2004, 5, 1005, 2005]  # channel fastest
    assert out[0, 1, 3 * 4].item() == 104  # next patch row starts after p*C values
    # patch 2 is grid row 1, column 0 (row-major patches)
    assert out[0, 2, 0].item() == 400
    assert out[0, 3, -1].item() == 2000 + 700 + 7  # last value: channel 2, y 7, x 7
    torch.testing.assert_close(out, _naive_patchify(imgs, 4), rtol=0, atol=0)


def test_patchify_matches_naive_and_unpatchify_inverts():
    m = _tiny()
    imgs = torch.randn(3, 3, 8, 8)
    x = m.patchify(imgs)
    torch.testing.assert_close(x, _naive_patchify(imgs, 4), rtol=0, atol=0)
    torch.testing.assert_close(m.unpatchify(x), imgs, rtol=0, atol=0)
    y = torch.randn(2, 4, 48)
    torch.testing.assert_close(m.patchify(m.unpatchify(y)), y, rtol=0, atol=0)


def test_patchify_patch14_round_trip():
    m = models_mae.mae_vit_huge_patch14(img_size=28, depth=1, decoder_depth=1,
                                       embed_dim=32, num_heads=2, decoder_embed_dim=16,
                                       decoder_num_heads=2)
    imgs = torch.randn(1, 3, 28, 28)
    x = m.patchify(imgs)
    assert x.shape == (1, 4, 14 * 14 * 3)
    torch.testing.assert_close(x, _naive_patchify(imgs, 14), rtol=0, atol=0)
    torch.testing.assert_close(m.unpatchify(x), imgs, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# random masking


@pytest.mark.parametrize("L,ratio", [(16, 0.75), (7, 0.5), (10, 0.6), (196, 0.75), (5, 0.0)])
def test_random_masking_with_noise(L, ratio):
    m = _tiny()
    N, D = 3, 5
    x = torch.randn(N, L, D)
    noise = torch.rand(N, L)
    len_keep = int(L * (1 - ratio))
    x_masked, mask, ids_restore = m.random_masking(x, ratio, noise=noise)
    assert x_masked.shape == (N, len_keep, D)
    assert mask.shape == (N, L) and ids_restore.shape == (N, L)
    for n in range(N):
        order = sorted(range(L), key=lambda i: noise[n, i].item())  # ascending noise
        keep = order[:len_keep]
        # kept tokens are those with the smallest noise, in sorted order
        torch.testing.assert_close(x_masked[n], x[n, keep], rtol=0, atol=0)
        expected_mask = [0.0 if i in keep else 1.0 for i in range(L)]
        assert mask[n].tolist() == expected_mask
        assert mask[n].sum().item() == L - len_keep
        # ids_restore inverts the shuffle
        assert [order[j] for j in ids_restore[n].tolist()] == list(range(L))


def test_random_masking_fixed_noise_is_deterministic_and_draws_nothing():
    m = _tiny()
    x = torch.randn(2, 16, 4)
    noise = torch.rand(2, 16)
    state = torch.get_rng_state()
    a = m.random_masking(x, 0.75, noise=noise)
    b = m.random_masking(x, 0.75, noise=noise)
    assert torch.equal(torch.get_rng_state(), state)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    with pytest.raises(ValueError):
        m.random_masking(x, 0.75, noise=torch.rand(2, 15))


def test_forward_draws_exactly_one_uniform_noise_tensor():
    m = _tiny().eval()
    imgs = torch.randn(2, 3, 8, 8)
    torch.manual_seed(7)
    _, _, mask = m(imgs, mask_ratio=0.5)
    state_after = torch.get_rng_state()
    torch.manual_seed(7)
    noise = torch.rand(2, 4)
    assert torch.equal(torch.get_rng_state(), state_after)
    _, _, mask_noise = m(imgs, mask_ratio=0.5, noise=noise)
    assert torch.equal(mask, mask_noise)
    for n in range(2):
        keep = set(sorted(range(4), key=lambda i: noise[n, i].item())[:2])
        assert mask[n].tolist() == [0.0 if i in keep else 1.0 for i in range(4)]


def _naive_forward(m, imgs, mask_ratio, noise):
    """The reference forward (encoder, decoder, loss on removed patches), step by step with explicit per-sample loops, reusing the model's layers."""
    N = imgs.shape[0]
    p = m.patch_embed.patch_size[0]
    D = m.cls_token.shape[-1]
    w = m.patch_embed.proj.weight.reshape(D, -1)  # conv as a Linear over (C, p, p) patches
    patches = imgs.unfold(2, p, p).unfold(3, p, p)  # [N, C, h, w, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(N, -1, w.shape[1])
    x = patches @ w.T + m.patch_embed.proj.bias + m.pos_embed[:, 1:]
    L = x.shape[1]
    len_keep = int(L * (1 - mask_ratio))
    keep = [sorted(range(L), key=lambda i: noise[n, i].item())[:len_keep] for n in range(N)]
    x = torch.stack([x[n, keep[n]] for n in range(N)])
    x = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(N, -1, -1), x], dim=1)
    for blk in m.blocks:
        x = blk(x)
    x = m.decoder_embed(m.norm(x))
    full = m.mask_token.expand(N, 1 + L, -1).clone()
    for n in range(N):
        full[n, 0] = x[n, 0]
        for slot, i in enumerate(keep[n]):
            full[n, 1 + i] = x[n, 1 + slot]
    x = full + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        x = blk(x)
    pred = m.decoder_pred(m.decoder_norm(x))[:, 1:]
    mask = torch.ones(N, L)
    for n in range(N):
        mask[n, keep[n]] = 0
    return pred, mask


def test_forward_matches_step_by_step_reference():
    torch.manual_seed(3)
    m = _tiny(img_size=16, depth=2, decoder_depth=2).eval()  # 4x4 grid
    with torch.no_grad():  # non-trivial tokens and position tables
        m.mask_token.normal_()
        m.cls_token.normal_()
        m.pos_embed.normal_()
        m.decoder_pos_embed.normal_()
        imgs = torch.randn(2, 3, 16, 16)
        noise = torch.rand(2, 16)
        loss, pred, mask = m(imgs, mask_ratio=0.75, noise=noise)
        exp_pred, exp_mask = _naive_forward(m, imgs, 0.75, noise)
    torch.testing.assert_close(pred, exp_pred, rtol=1e-4, atol=1e-5)
    assert torch.equal(mask, exp_mask)
    per_patch = ((exp_pred - _naive_patchify(imgs, 4)) ** 2).mean(-1)
    torch.testing.assert_close(loss, (per_patch * exp_mask).sum() / exp_mask.sum(), rtol=1e-5, atol=1e-6)
    latent, mask_e, ids_restore = m.forward_encoder(imgs, 0.75, noise=noise)
    assert latent.shape == (2, 1 + 4, 16) and torch.equal(mask_e, mask)
    assert m.forward_decoder(latent, ids_restore).shape == (2, 16, 48)


@pytest.mark.parametrize("kwargs", [{}, {"encoder_mask_token": True}, {"loss_on_visible": True}],
                         ids=["reference", "encoder_mask_token", "loss_on_visible"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16_autocast"])
def test_forward_outputs_are_tensors_of_their_own_not_views(kwargs, batch, dtype):
    # FSDP2 warns when a sharded model returns a view (an in-place op on it would skip its backward hook). The
    # prediction used to be decoder_pred(...)[:, 1:], a slice; and nn.Linear on a 3-D input may itself return a
    # view of a 2-D product (here: one image in fp32, any batch under CPU bf16 autocast)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss, pred, mask = _tiny(**kwargs)(torch.randn(batch, 3, 8, 8), mask_ratio=0.5)
    assert pred.shape == (batch, 4, 48) and pred.is_contiguous() and pred.dtype == (dtype or torch.float32)
    assert loss._base is None and pred._base is None and mask._base is None


# ----------------------------------------------------------------------------
# loss


def test_loss_counts_only_masked_patches():
    m = _tiny().eval()
    imgs = torch.randn(1, 3, 8, 8)
    noise = torch.tensor([[0.1, 0.9, 0.2, 0.8]])  # keep patches 0 and 2, remove 1 and 3
    with torch.no_grad():
        loss, pred, mask = m(imgs, mask_ratio=0.5, noise=noise)
        assert mask.tolist() == [[0.0, 1.0, 0.0, 1.0]]

        # with the prediction fixed, the target of a visible patch does not count ...
        visible = imgs.clone()
        visible[:, :, 4:8, 0:4] += 5.0  # patch 2 (grid row 1, column 0) is visible
        torch.testing.assert_close(m.forward_loss(visible, pred, mask), loss, rtol=0, atol=0)
        # ... and the target of a removed patch does
        removed = imgs.clone()
        removed[:, :, 0:4, 4:8] += 5.0  # patch 1 (grid row 0, column 1) is removed
        assert not torch.allclose(m.forward_loss(removed, pred, mask), loss)

        # through the whole model: the encoder never sees a removed patch ...
        loss_r, pred_r, _ = m(removed, mask_ratio=0.5, noise=noise)
        torch.testing.assert_close(pred_r, pred)
        assert loss_r.item() != pytest.approx(loss.item())
        # ... but it sees a visible one
        _, pred_v, _ = m(visible, mask_ratio=0.5, noise=noise)
        assert not torch.allclose(pred_v, pred)


def _hand_loss(imgs, pred, mask, p, norm_pix):
    target = _naive_patchify(imgs.double(), p)
    pred = pred.double()
    n_img, L, K = target.shape
    num, den = 0.0, 0.0
    for n in range(n_img):
        for i in range(L):
            t = target[n, i].tolist()
            if norm_pix:
                mean = sum(t) / K
                var = sum((v - mean) ** 2 for v in t) / (K - 1)  # unbiased
                t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
            err = sum((pred[n, i, k].item() - t[k]) ** 2 for k in range(K)) / K
            num += err * mask[n, i].item()
            den += mask[n, i].item()
    return num / den


@pytest.mark.parametrize("norm_pix", [False, True])
def test_forward_loss_against_hand_computation(norm_pix):
    m = _tiny(norm_pix_loss=norm_pix)
    imgs = torch.rand(2, 3, 8, 8) * 3 + 1
    pred = torch.randn(2, 4, 48)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    got = m.forward_loss(imgs, pred, mask)
    assert got.item() == pytest.approx(_hand_loss(imgs, pred, mask, 4, norm_pix), rel=1e-5)
    other = _hand_loss(imgs, pred, mask, 4, not norm_pix)
    assert got.item() != pytest.approx(other, rel=1e-3)


# ----------------------------------------------------------------------------
# initialisation


def test_initialisation_tables_norms_and_biases():
    m = models_mae.mae_vit_tiny_patch16(img_size=32, depth=2, decoder_depth=1)
    for param, dim in ((m.pos_embed, 192), (m.decoder_pos_embed, 128)):
        expected = torch.from_numpy(get_2d_sincos_pos_embed(dim, 2, cls_token=True)).unsqueeze(0)
        torch.testing.assert_close(param.data, expected.float(), rtol=0, atol=0)
        assert torch.count_nonzero(param.data[0, 0]) == 0
    n_ln, n_lin = 0, 0
    for mod in m.modules():
        if isinstance(mod, nn.LayerNorm):
            n_ln += 1
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0) and mod.eps == 1e-6
        if isinstance(mod, nn.Linear):
            n_lin += 1
            assert torch.all(mod.bias == 0)
            bound = math.sqrt(6.0 / (mod.in_features + mod.out_features))  # Xavier-uniform
            assert mod.weight.abs().max() <= bound
    assert n_ln == 2 * 2 + 1 + 2 * 1 + 1
    assert n_lin == 4 * 2 + 1 + 4 * 1 + 1
    w = m.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 192))
    assert w.abs().max() <= bound
    assert w.abs().max() > 1.5 / math.sqrt(3 * 16 * 16)  # not the Conv2d default bound
    assert 0.01 < m.cls_token.std().item() < 0.03
    assert 0.01 < m.mask_token.std().item() < 0.03


def test_same_seed_init_replays_reference_rng_consumption():
    seed = 1234
    depth, ddepth, D, Dd, p = 2, 2, 192, 128, 16
    torch.manual_seed(seed)
    model = models_mae.mae_vit_tiny_patch16(img_size=32, depth=depth, decoder_depth=ddepth)
    after_model = torch.rand(3)

    # replay: constructions in reference order, then the reference initialisation
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, D, p, p)
    enc = [[nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)]
           for _ in range(depth)]
    dec_embed = nn.Linear(D, Dd)
    dec = [[nn.Linear(Dd, 3 * Dd), nn.Linear(Dd, Dd), nn.Linear(Dd, 4 * Dd), nn.Linear(4 * Dd, Dd)]
           for _ in range(ddepth)]
    pred = nn.Linear(Dd, p * p * 3)
    with torch.no_grad():
        nn.init.xavier_uniform_(conv.weight.data.view(D, -1))
        cls = torch.zeros(1, 1, D)
        nn.init.normal_(cls, std=.02)
        mask_token = torch.zeros(1, 1, Dd)
        nn.init.normal_(mask_token, std=.02)
        linears = [lin for blk in enc for lin in blk] + [dec_embed] + \
                  [lin for blk in dec for lin in blk] + [pred]
        for lin in linears:
            nn.init.xavier_uniform_(lin.weight)
    after_replay = torch.rand(3)

    def eq(a, b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    eq(model.patch_embed.proj.weight.data, conv.weight.data)
    eq(model.patch_embed.proj.bias.data, conv.bias.data)
    eq(model.cls_token.data, cls)
    eq(model.mask_token.data, mask_token)
    model_linears = []
    for blk in model.blocks:
        model_linears += [blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2]
    model_linears.append(model.decoder_embed)
    for blk in model.decoder_blocks:
        model_linears += [blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2]
    model_linears.append(model.decoder_pred)
    assert len(model_linears) == len(linears)
    assert model_linears == [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
    for mine, ref in zip(model_linears, linears):
        eq(mine.weight.data, ref.weight.data)
    # both sides consumed exactly the same random numbers
    assert torch.equal(after_replay, after_model)
