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
            raise ValueError(f"grid masking needs an even patch grid, got {grid[0]}x{grid[1]}")


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
    196) and aspect ratio log-uniform in [0.3, 1/0.3] are added until the count is reached; the
    overshoot of the last one is given back at random places (or, after 100 tries, the shortfall masked
    at random), so the count is exact.
    """
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    min_area = max(1, round(0.08 * h * w))
    log_aspect = (math.log(BLOCK_ASPECT[0]), math.log(BLOCK_ASPECT[1]))
    for _ in range(100):
        remaining = num_masked - int(mask.sum())
        if remaining <= 0:
            break
        area = min_area + torch.rand(()).item() * max(remaining - min_area, 0)
        aspect = math.exp(log_aspect[0] + torch.rand(()).item() * (log_aspect[1] - log_aspect[0]))
        bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 1 <= bh <= h and 1 <= bw <= w:
            top = int(torch.randint(0, h - bh + 1, ()))
            left = int(torch.randint(0, w - bw + 1, ()))
            mask[top:top + bh, left:left + bw] = True
    flat = mask.flatten()
    extra = int(flat.sum()) - num_masked
    if extra > 0:  # give back some of the last block's patches
        on = flat.nonzero().flatten()
        flat[on[torch.randperm(len(on))[:extra]]] = False
    elif extra < 0:
        off = (~flat).nonzero().flatten()
        flat[off[torch.randperm(len(off))[:-extra]]] = True
    return flat.view(h, w)


def block_noise(n: int, grid: Tuple[int, int], mask_ratio: float, device: torch.device) -> torch.Tensor:
    """[n, L] noise whose removed patches form block_mask rectangles, a different mask per sample."""
    L = grid[0] * grid[1]
    num_masked = L - int(L * (1 - mask_ratio))
    removed = torch.stack([block_mask(grid, num_masked).flatten() for _ in range(n)]).float()
    return (removed + 0.5 * torch.rand(n, L)).to(device)  # visible patches in random order, as random masking
