"""Fixed 2-D sine-cosine position tables and position-table resizing.

References:
    Transformer: https://arxiv.org/abs/1706.03762
    MAE: https://arxiv.org/abs/2111.06377
"""
from typing import Dict, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from util.logger import log


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: Union[int, Tuple[int, int]],
                            cls_token: bool = False) -> np.ndarray:
    """Return the [H*W (+1), embed_dim] 2-D sin-cos table (zero row first with cls_token), float64 as the
    reference computes it (the models cast it to float32 once).

    `grid_size` is an int for a square grid or (H, W).
    """
    size_h, size_w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_h = np.arange(size_h, dtype=np.float32)
    grid_w = np.arange(size_w, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # the width coordinate comes first
    grid = np.stack(grid, axis=0).reshape([2, 1, size_h, size_w])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """Encode a [2, 1, H, W] grid: first half of the channels from grid[0], second half from grid[1]."""
    if embed_dim % 4 != 0:  # two halves, each of sines and cosines
        raise ValueError(f"a 2-D sin-cos position table needs a width divisible by 4, got {embed_dim}")
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # [H*W, D/2]
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # [H*W, D/2]
    return np.concatenate([emb_h, emb_w], axis=1)  # [H*W, D]


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Encode positions `pos` (any shape, M values) as [M, embed_dim] = [sin(pos*w), cos(pos*w)], in float64."""
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even for a 1-D sin-cos table, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)  # float64, as the reference: the same table bit for bit
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega  # [D/2]
    pos = pos.reshape(-1)  # [M]
    out = np.einsum("m,d->md", pos, omega)  # [M, D/2], outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, D]


def interpolate_pos_embed(model: torch.nn.Module, checkpoint_model: Dict[str, torch.Tensor]) -> None:
    """Resize checkpoint_model['pos_embed'] in place (bicubic) to the model's patch grid."""
    if "pos_embed" not in checkpoint_model:
        return
    pos_embed_checkpoint = checkpoint_model["pos_embed"]
    embedding_size = pos_embed_checkpoint.shape[-1]
    num_patches = model.patch_embed.num_patches
    num_extra_tokens = model.pos_embed.shape[-2] - num_patches
    orig_size = int(round((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5))
    new_size = int(round(num_patches ** 0.5))
    if orig_size == new_size:
        return
    log(f"Position interpolate from {orig_size}x{orig_size} to {new_size}x{new_size}")
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(
        pos_tokens.float(), size=(new_size, new_size), mode="bicubic", align_corners=False
    ).to(pos_embed_checkpoint.dtype)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    checkpoint_model["pos_embed"] = torch.cat((extra_tokens, pos_tokens), dim=1)
