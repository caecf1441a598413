"""The fast paths (fused attention, patch embedding as a matmul, fused AdamW, bf16) keep the numbers."""
import pytest
import torch

import models_mae
import models_vit
import util.perf as perf
from util.runner import autocast

STEPS = 30


def _loss_curve(attn, patch_embed, opt_impl, amp):
    torch.manual_seed(0)
    model = models_mae.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                                            norm_pix_loss=True)
    perf.set_attention(model, attn)
    perf.set_patch_embed(model, patch_embed)
    opt = perf.adamw(model.parameters(), 1e-3, torch.device("cpu"), betas=(0.9, 0.95), impl=opt_impl)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(8, 3, 32, 32, generator=g)
    losses = []
    for step in range(STEPS):
        noise = torch.rand(8, 16, generator=g)
        with autocast(torch.device("cpu"), amp):
            loss, _, _ = model(imgs, noise=noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_fast_fp32_path_matches_reference_path():
    reference = _loss_curve("math", "conv", "forloop", "none")
    fast = _loss_curve("sdpa", "linear", "fused", "none")
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    assert reference[-1] < reference[0] * 0.9  # it did learn


def test_fast_bf16_path_follows_fp32_curve():
    reference = _loss_curve("math", "conv", "forloop", "none")
    fast = _loss_curve("math", "linear", "fused", "bf16")
    assert (fast - reference).abs().max() < 0.05 * reference.abs().max()
    assert fast[-1] < fast[0] * 0.9


@pytest.mark.parametrize("impl", ["conv", "linear"])
def test_patch_embed_paths_agree_and_keep_keys(impl):
    torch.manual_seed(0)
    vit = models_vit.vit_tiny_patch16(img_size=32, num_classes=3)
    keys = list(vit.state_dict())
    x = torch.randn(2, 3, 32, 32)
    expected = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # the convolution itself
    perf.set_patch_embed(vit, impl)
    torch.testing.assert_close(vit.patch_embed(x), expected, rtol=1e-5, atol=1e-5)
    assert list(vit.state_dict()) == keys


def test_attention_switch_reaches_every_block():
    model = models_mae.mae_vit_tiny_patch16(img_size=32)
    perf.set_attention(model, "math")
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(flags) == 12 + 4 and not any(flags)
    perf.set_attention(model, "sdpa")
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    with pytest.raises(ValueError):
        perf.set_attention(model, "flash")


# /proc/cpuinfo as Linux prints it, trimmed to the interesting part
def _cpuinfo(flags, processors=2, model="Some CPU"):
    block = f"processor\t: {{}}\nmodel name\t: {model}\nflags\t\t: {flags}\nvmx flags\t: ept vpid\n\n"
    return "".join(block.format(i) for i in range(processors))


_SAPPHIRE_RAPIDS = _cpuinfo("fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8")
_GENOA = _cpuinfo("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni")
_SKYLAKE = _cpuinfo("fpu sse2 avx2 avx512f avx512bw avx512_vnni", model="Xeon (bf16 emulated)")
_MILAN = _cpuinfo("fpu sse2 avx2 fma bmi2 sha_ni")
_GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, native", [(_SAPPHIRE_RAPIDS, True), (_GENOA, True), (_SKYLAKE, False),
                                             (_MILAN, False), (_GRAVITON3, False), ("", False)])
def test_native_bf16_read_from_cpu_flags(cpuinfo, native):
    # AVX-512 without its BF16 extension only emulates bf16, which is slower than fp32: no bf16 default;
    # Arm's BF16 is not trusted until measured; text outside the flags line does not count
    assert perf.native_bf16_from_cpuinfo(cpuinfo) is native


def test_native_bf16_needs_linux_and_a_readable_cpuinfo(monkeypatch):
    import builtins

    monkeypatch.setattr(perf.platform, "system", lambda: "Darwin")
    assert perf.cpu_has_native_bf16() is False
    monkeypatch.setattr(perf.platform, "system", lambda: "Linux")

    def unreadable(*args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr(builtins, "open", unreadable)
    assert perf.cpu_has_native_bf16() is False


def test_cpu_default_precision_follows_native_bf16(monkeypatch):
    from util.runner import resolve_amp
    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp(None, torch.device("cpu")) == "bf16"
    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: False)
    assert resolve_amp(None, torch.device("cpu")) == "none"
    assert resolve_amp("bf16", torch.device("cpu")) == "bf16"
