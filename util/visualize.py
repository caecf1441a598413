"""Reconstruction pictures: original | masked | reconstruction | reconstruction + visible patches."""
from typing import Optional

import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util.masking import block_noise, grid_noise

PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")


@torch.no_grad()
def reconstruct(model: torch.nn.Module, imgs: torch.Tensor, mask_ratio: float = 0.75,
                seed: Optional[int] = 0) -> torch.Tensor:
    """Return the four panels as normalised images, [N, 4, C, H, W].

    Masks come from a private generator seeded with `seed` (the global random streams are untouched), of
    the model's mask type (random, block or grid).
    For models trained with norm_pix_loss, each predicted patch is mapped back to pixel space with
    the mean and variance of the original patch.
    """
    was_training = model.training
    model.eval()
    n, L = imgs.shape[0], model.patch_embed.num_patches
    mask_type = getattr(model, "mask_type", "random")
    if mask_type == "random":
        g = torch.Generator().manual_seed(0 if seed is None else seed)
        noise = torch.rand(n, L, generator=g).to(imgs.device)
    else:  # the masks the model was trained with, from a forked (then restored) random state
        with torch.random.fork_rng(devices=[]):
            state = np.random.get_state()
            torch.manual_seed(0 if seed is None else seed)
            np.random.seed(0 if seed is None else seed)
            grid = model.patch_embed.grid_size
            noise = grid_noise(n, grid, imgs.device) if mask_type == "grid" else \
                block_noise(n, grid, mask_ratio, imgs.device)
            np.random.set_state(state)
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    pred = pred.float()
    if getattr(model, "norm_pix_loss", False):
        target = model.patchify(imgs)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.e-6) ** .5 + mean
    recon = model.unpatchify(pred)
    p_h, p_w = model.patch_embed.patch_size
    # [N, L] -> [N, 1, H, W]: 1 where the patch was removed
    pix_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p_h * p_w * imgs.shape[1]))
    masked = imgs * (1 - pix_mask)
    pasted = imgs * (1 - pix_mask) + recon * pix_mask
    if was_training:
        model.train()
    return torch.stack([imgs, masked, recon, pasted], dim=1)


def to_uint8(panels: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> np.ndarray:
    """[N, 4, C, H, W] normalised panels -> one [N*H, 4*W, 3] uint8 grid (rows = images).

    Removed patches of the 'masked' panel show as grey. The row of a grey original (its three channels
    equal to within one grey level) is shown in grey: the model never saw colour there, and a cast in
    the reconstruction would only show how its errors differ between channels, which the per-channel
    de-normalisation (ImageNet mean and std) and norm_pix_loss's per-patch scale amplify.
    """
    mean_t = torch.tensor(mean).view(1, 1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, 1, -1, 1, 1)
    x = panels.detach().float().cpu()
    masked = x[:, 1]
    x = (x * std_t + mean_t).clamp(0, 1)
    if x.shape[2] == 3:
        original = x[:, 0]
        grey = (original.amax(dim=1) - original.amin(dim=1)).amax(dim=(1, 2)) <= 1 / 255  # [N]
        x[grey] = x[grey].mean(dim=2, keepdim=True).expand_as(x[grey])
    # grey for removed patches (they are exactly 0 in normalised space)
    removed = (masked == 0).all(dim=1, keepdim=True)
    x[:, 1] = torch.where(removed, torch.full_like(x[:, 1], 0.5), x[:, 1])
    n, k, c, h, w = x.shape
    if c == 1:
        x = x.expand(-1, -1, 3, -1, -1)
    grid = x.permute(0, 3, 1, 4, 2).reshape(n * h, k * w, 3)  # rows of images, panels side by side
    return (grid.numpy() * 255).round().astype(np.uint8)
