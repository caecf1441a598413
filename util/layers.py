"""Layer variants the models are built with: patch embedding as one matmul, and the attention kernel.

Both are picked when a model is constructed (`patch_embed=` and `attn=` arguments of the models) and
change neither parameter names, shapes nor the maths; which one is faster where is decided in
util/perf.py from measurements.
"""
from typing import Iterable, Type

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch.utils.checkpoint import checkpoint

ATTN_IMPLS = ("sdpa", "math")
PATCH_EMBED_IMPLS = ("conv", "linear")


class LinearPatchEmbed(PatchEmbed):
    """timm PatchEmbed computed as patchify + one matmul with the conv weight (same `proj` keys).

    Equivalent to the stride-p convolution, including timm's `dynamic_img_pad`, `flatten` and
    `output_fmt` options; its backward avoids the slow conv weight-gradient kernels on CPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, H, W = x.shape
        p_h, p_w = self.patch_size
        if self.img_size is not None and self.strict_img_size and (H, W) != tuple(self.img_size):
            raise ValueError(f"input size {(H, W)} does not match the model's {tuple(self.img_size)}")
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (p_w - W % p_w) % p_w, 0, (p_h - H % p_h) % p_h))
            H, W = x.shape[-2:]
        elif H % p_h or W % p_w:
            raise ValueError(f"input size {(H, W)} is not divisible by the patch size {(p_h, p_w)}")
        h, w = H // p_h, W // p_w
        x = x.reshape(n, c, h, p_h, w, p_w).permute(0, 2, 4, 1, 3, 5).reshape(n, h, w, c * p_h * p_w)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)  # [D, C*p*p]
        x = F.linear(x, weight, self.proj.bias)  # [N, h, w, D]
        if self.flatten:
            x = x.reshape(n, h * w, -1)  # [N, L, D]
        elif self.output_fmt == "NCHW":
            x = x.permute(0, 3, 1, 2)
        elif self.output_fmt == "NLC":
            x = x.reshape(n, h * w, -1)
        elif self.output_fmt == "NCL":
            x = x.reshape(n, h * w, -1).transpose(1, 2)
        # NHWC: already in that layout
        return self.norm(x)


def patch_embed_layer(impl: str) -> Type[PatchEmbed]:
    """The patch-embedding class for 'conv' (timm's convolution) or 'linear' (patchify + matmul)."""
    if impl not in PATCH_EMBED_IMPLS:
        raise ValueError(f"patch embedding must be one of {PATCH_EMBED_IMPLS}, got {impl!r}")
    return LinearPatchEmbed if impl == "linear" else PatchEmbed


def use_attention(blocks: Iterable[torch.nn.Module], impl: str) -> None:
    """Make the timm attention of these blocks use fused scaled_dot_product_attention ('sdpa') or the
    explicit matmul-softmax-matmul ('math'); called by the model constructors."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTN_IMPLS}, got {impl!r}")
    for block in blocks:
        block.attn.fused_attn = impl == "sdpa"


def run_blocks(blocks: Iterable[torch.nn.Module], x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """x through the blocks in order; with grad_checkpointing (and autograd on) each block is checkpointed,
    non-reentrant: it keeps only its input for the backward and runs again there."""
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False) if grad_checkpointing and torch.is_grad_enabled() else blk(x)
    return x
