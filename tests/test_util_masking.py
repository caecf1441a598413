"""util/masking.py and the MAE's ablation options: mask types, the encoder's mask token, loss on all patches."""
import pytest
import torch

import models_mae
from util.masking import block_mask, check_mask_type


def _masks(model, n=8, ratio=0.75, size=64):
    return model(torch.randn(n, 3, size, size), mask_ratio=ratio)[2]  # [N, L]


def _masked_neighbour_share(mask, grid):
    """Mean fraction of each removed patch's 4-neighbours that are removed too."""
    m = mask.view(-1, *grid)
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    count = torch.nn.functional.pad(torch.ones_like(m), (1, 1, 1, 1))
    degree = count[:, :-2, 1:-1] + count[:, 2:, 1:-1] + count[:, 1:-1, :-2] + count[:, 1:-1, 2:]
    return float(((neighbours / degree) * m).sum() / m.sum())


@pytest.mark.parametrize("mask_type", ["random", "block", "grid"])
def test_every_mask_type_removes_exactly_int_l_ratio_and_varies_as_it_should(mask_type):
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch16(img_size=64, mask_type=mask_type)  # a 4x4 grid, L = 16
    first, second = _masks(model), _masks(model)
    assert (first.sum(1) == 12).all() and (second.sum(1) == 12).all()
    if mask_type == "grid":  # the top-left patch of every 2x2 cell stays, always
        kept = torch.tensor([0, 2, 8, 10])
        expected = torch.ones(16)
        expected[kept] = 0
        assert (first == expected).all() and (second == expected).all()
    else:
        assert not (first == first[:1]).all()  # samples differ
        assert not torch.equal(first, second)  # steps differ


def test_block_masks_are_spatially_clustered():
    torch.manual_seed(0)
    grid = (14, 14)
    block = _masks(models_mae.mae_vit_tiny_patch16(img_size=224, mask_type="block"), n=16, ratio=0.4, size=224)
    random = _masks(models_mae.mae_vit_tiny_patch16(img_size=224), n=16, ratio=0.4, size=224)
    assert (block.sum(1) == 196 - int(196 * 0.6)).all()
    # random: about 40% of a removed patch's neighbours are removed too; blocks: most of them
    assert _masked_neighbour_share(random, grid) < 0.5 < 0.7 < _masked_neighbour_share(block, grid)


def test_block_mask_count_is_exact_for_every_target():
    torch.manual_seed(1)
    for count in (1, 5, 50, 147, 195):
        assert int(block_mask((14, 14), count).sum()) == count


def test_mask_ratios_a_type_cannot_honour_are_errors():
    with pytest.raises(ValueError, match="mask ratio is 0.75"):
        check_mask_type("grid", 0.5, (14, 14))
    with pytest.raises(ValueError, match="even patch grid"):
        check_mask_type("grid", 0.75, (7, 7))
    with pytest.raises(ValueError, match="must be one of"):
        check_mask_type("checkerboard", 0.75, (14, 14))
    with pytest.raises(ValueError, match="even patch grid"):
        models_mae.mae_vit_tiny_patch16(img_size=48, mask_type="grid")  # a 3x3 grid


def test_encoder_mask_token_sees_every_patch_and_only_adds_its_own_key():
    torch.manual_seed(0)
    plain = models_mae.mae_vit_tiny_patch16(img_size=64)
    torch.manual_seed(0)
    with_token = models_mae.mae_vit_tiny_patch16(img_size=64, encoder_mask_token=True)
    assert set(with_token.state_dict()) - set(plain.state_dict()) == {"encoder_mask_token"}
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in with_token.state_dict().items()
               if k != "encoder_mask_token")  # the same initial weights otherwise
    x, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    latent, mask, ids_restore = with_token.forward_encoder(x, 0.75, noise=noise)
    assert latent.shape == (2, 1 + 16, 192) and torch.equal(ids_restore, torch.arange(16).expand(2, -1))
    assert torch.equal(mask, plain.forward_encoder(x, 0.75, noise=noise)[1])
    # removed patches carry the token: change a removed patch's pixels, the latent stays the same
    removed = int(mask[0].nonzero()[0])
    y = x.clone()
    r, c = divmod(removed, 4)
    y[0, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] += 5.0
    with_token.eval()
    torch.testing.assert_close(with_token.forward_encoder(y, 0.75, noise=noise)[0],
                               with_token.forward_encoder(x, 0.75, noise=noise)[0])
    loss, pred, _ = with_token(x, noise=noise)
    assert pred.shape == (2, 16, 16 * 16 * 3) and torch.isfinite(loss)


def test_loss_on_visible_is_the_mean_over_every_patch():
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch16(img_size=64, loss_on_visible=True, norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    loss, pred, mask = model(imgs, noise=noise)
    target = model.patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    by_hand = sum(((pred[n, i] - target[n, i]) ** 2).mean() for n in range(2) for i in range(16)) / 32
    torch.testing.assert_close(loss, by_hand)
    model.loss_on_visible = False  # the reference: removed patches only
    removed = model(imgs, noise=noise)[0]
    by_hand = sum(((pred[n, i] - target[n, i]) ** 2).mean() for n in range(2) for i in range(16) if mask[n, i]) / 24
    torch.testing.assert_close(removed, by_hand)


def test_decoder_size_changes_only_the_decoder():
    torch.manual_seed(0)
    default = models_mae.mae_vit_tiny_patch16(img_size=64)
    torch.manual_seed(0)
    small = models_mae.mae_vit_tiny_patch16(img_size=64, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    assert len(small.decoder_blocks) == 1 and small.decoder_embed.out_features == 64
    assert small.decoder_blocks[0].attn.num_heads == 2
    encoder = {k: v.shape for k, v in default.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    assert encoder == {k: v.shape for k, v in small.state_dict().items() if not k.startswith(("decoder", "mask_token"))}


def test_reconstructions_use_the_models_mask_type_and_leave_the_random_streams():
    import numpy as np

    from util.visualize import reconstruct

    model = models_mae.mae_vit_tiny_patch16(img_size=64, mask_type="grid")
    imgs = torch.randn(2, 3, 64, 64)
    torch.manual_seed(3)
    np.random.seed(3)
    expected = (torch.rand(2), np.random.rand(2))
    torch.manual_seed(3)
    np.random.seed(3)
    removed = (reconstruct(model, imgs)[:, 1] == 0).all(dim=1)  # [N, H, W]: the masked panel's grey pixels
    assert torch.equal(torch.rand(2), expected[0]) and (np.random.rand(2) == expected[1]).all()
    assert not removed[:, :16, :16].any() and removed[:, :16, 16:32].all() and removed[:, 16:32, :].all()
    model.mask_type = "block"
    first, second = (reconstruct(model, imgs, seed=1)[:, 1] for _ in range(2))
    assert torch.equal(first, second)  # the seed fixes the block masks too


def test_grey_originals_are_drawn_grey_and_colour_ones_in_colour():
    import numpy as np
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from util.visualize import panel_pixels, reconstruct

    torch.manual_seed(0)
    model = models_mae.mae_vit_micro_patch4(norm_pix_loss=True)  # untrained: its channels disagree
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    grey = torch.rand(1, 1, 32, 32).expand(1, 3, 32, 32)
    colour = torch.rand(1, 3, 32, 32)
    panels = reconstruct(model, (torch.cat([grey, colour]) - mean) / std)
    pixels, _ = panel_pixels(panels)  # [2, 4, 32, 32, 3]
    grid = pixels.transpose(0, 2, 1, 3, 4).reshape(2 * 32, 4 * 32, 3).astype(int)  # rows = images
    recon = (panels[:, 2] * std + mean).clamp(0, 1)  # the reconstruction panel in pixels, [2, 3, 32, 32]
    assert (recon[0].amax(0) - recon[0].amin(0)).max() > 0.05  # the model's own output has a colour cast
    # the grey row: every panel has R = G = B, and the reconstruction is the channel mean
    assert (grid[:32, ..., 0] == grid[:32, ..., 1]).all() and (grid[:32, ..., 1] == grid[:32, ..., 2]).all()
    expected = (recon[0].mean(0) * 255).round().int().numpy()
    assert np.abs(grid[:32, 64:96, 0] - expected).max() <= 1
    # the colour row keeps its colours
    expected = (recon[1].permute(1, 2, 0) * 255).round().int().numpy()
    assert np.abs(grid[32:, 64:96] - expected).max() <= 1
