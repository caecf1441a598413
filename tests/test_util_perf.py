"""util/perf.py and the fast paths it picks: same numbers as the reference path, "auto" resolved once."""
import pytest
import torch

import models_mae
import util.perf as perf
from util.precision import autocast

STEPS = 30


def _loss_curve(attn, patch_embed, opt_impl, amp):
    torch.manual_seed(0)
    model = models_mae.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                                            norm_pix_loss=True, attn=attn, patch_embed=patch_embed)
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


@pytest.mark.parametrize("device, amp, expected", [
    ("cuda", "fp16", ("sdpa", "linear")), ("cuda", "bf16", ("sdpa", "linear")),
    ("cpu", "bf16", ("math", "linear")), ("cpu", "none", ("sdpa", "linear"))])
def test_auto_resolves_to_the_measured_defaults(device, amp, expected):
    assert perf.resolve_layers(device, amp) == expected
    assert perf.resolve_layers(device, amp, "math", "conv") == ("math", "conv")  # explicit choices stay


def test_unknown_choices_and_missing_lr_are_errors():
    with pytest.raises(ValueError):
        perf.resolve_layers("cpu", "none", attn="flash")
    with pytest.raises(ValueError):
        perf.resolve_layers("cpu", "none", patch_embed="fft")
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="learning rate"):
        perf.adamw(params, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="AdamW implementation"):
        perf.adamw(params, 0.1, torch.device("cpu"), impl="turbo")
    assert perf.adamw(params, 0.1, torch.device("cpu")).defaults["fused"] is True
    assert perf.adamw(params, 0.1, torch.device("cpu"), impl="forloop").defaults["foreach"] is False
