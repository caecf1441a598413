"""Which patches an MAE removes: the paper's random, block-wise and grid-wise sampling (Table 1f).

Every sampler returns `noise` for MaskedAutoencoderViT.random_masking: the patches with the smallest noise
stay visible, so all mask types share the model's gather / restore path and remove exactly
int(L * mask_ratio) patches per sample (the encoder needs the same number of visible tokens per sample).

References:
    MAE: https://arxiv.org/abs/2111.06377 (Table 1f, Fig. 6)
    BEiT: https://arxiv.org/abs/2106.08254 (block-wise masking, Algorithm 1)
"""
import math
from typing import Tuple

import numpy as np
import torch

MASK_TYPES = ("random", "block", "grid")
BLOCK_ASPECT = (0.3, 1 / 0.3)  # block aspect ratio range, as BEiT


def check_mask_type(mask_type: str, mask_ratio: float, grid: Tuple[int, int]) -> None:
    """Raise ValueError when a mask type cannot remove `mask_ratio` of a grid_h x grid_w patch grid."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask type must be one of {', '.join(MASK_TYPES)}, got {mask_type}")
    if mask_type == "grid":
        if mask_ratio != 0.75:
            raise ValueError(f"grid masking keeps one patch of every 2x2 cell: its mask ratio is 0.75, got {mask_ratio}")
        if grid[0] % 2 or grid[1] % 2:
            raise ValueError(f"grid masking needs an even patch grid, got {grid[0]}x{grid[1]}: use an image size that "
                             f"is an even multiple of the patch size, or another mask type")


def grid_noise(n: int, grid: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """[n, L] noise that keeps the top-left patch of every 2x2 cell (the same for every sample and step)."""
    h, w = grid
    rows = torch.arange(h, device=device).view(h, 1)
    cols = torch.arange(w, device=device).view(1, w)
    removed = ((rows % 2) + (cols % 2) > 0).float().flatten()  # [L], 0 on the kept top-left patches
    order = torch.arange(h * w, device=device) / (h * w)  # kept patches stay in raster order
    return (removed + order).expand(n, -1)


def block_mask(grid: Tuple[int, int], num_masked: int) -> torch.Tensor:
    """One [h, w] boolean mask of exactly num_masked patches made of random rectangles.

    Rectangles of area uniform in [min_area, patches still to mask] (min_area: 8% of the grid, BEiT's 16 of
    196, or what remains if less) and aspect ratio log-uniform in [0.3, 1/0.3] are added until the count
    is reached. The last rectangle's overshoot is given back among its own new patches; if 100 tries fall
    short (a rare case), random patches make up the count. Drawn with numpy's global generator (scalar
    draws are far cheaper there; its state is saved in checkpoints like torch's).
    """
    h, w = grid
    mask = np.zeros((h, w), dtype=bool)
    min_area = max(1, round(0.08 * h * w))
    log_aspect = (math.log(BLOCK_ASPECT[0]), math.log(BLOCK_ASPECT[1]))
    for _ in range(100):
        remaining = num_masked - int(mask.sum())
        if remaining <= 0:
            break
        low = min(min_area, remaining)
        area = np.random.uniform(low, remaining) if remaining > low else low
        aspect = math.exp(np.random.uniform(*log_aspect))
        bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 1 <= bh <= h and 1 <= bw <= w:
            top, left = np.random.randint(0, h - bh + 1), np.random.randint(0, w - bw + 1)
            block = np.zeros_like(mask)
            block[top:top + bh, left:left + bw] = True
            new = block & ~mask
            extra = int(mask.sum() + new.sum()) - num_masked
            if extra > 0:  # keep only part of this rectangle's new patches
                drop = np.flatnonzero(new)[np.random.permutation(int(new.sum()))[:extra]]
                new.flat[drop] = False
            mask |= new
    short = num_masked - int(mask.sum())
    if short > 0:
        off = np.flatnonzero(~mask)
        mask.flat[off[np.random.permutation(len(off))[:short]]] = True
    return torch.from_numpy(mask)


def block_noise(n: int, grid: Tuple[int, int], mask_ratio: float, device: torch.device) -> torch.Tensor:
    """[n, L] noise whose removed patches form block_mask rectangles, a different mask per sample."""
    L = grid[0] * grid[1]
    num_masked = L - int(L * (1 - mask_ratio))
    removed = torch.stack([block_mask(grid, num_masked).flatten() for _ in range(n)]).float()
    return (removed + 0.5 * torch.rand(n, L)).to(device)  # visible patches in random order, as random masking
