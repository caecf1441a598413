"""Which fast path to use where: attention kernel, patch embedding and the AdamW implementation.

None of them changes the maths; each default was kept only where a benchmark (benchmark.py, numbers in
PRETRAIN.md) showed it faster. "auto" is resolved here and nowhere else.
"""
from typing import Iterable, Tuple

import torch

from util.layers import ATTN_IMPLS, PATCH_EMBED_IMPLS

ADAMW_IMPLS = ("fused", "foreach", "forloop", "default")

# patchify + matmul was measured faster than the convolution on every device tried (PRETRAIN.md)
DEFAULT_PATCH_EMBED = "linear"


def default_attention(device_type: str, amp: str) -> str:
    """The faster attention path for a device and precision (measured with benchmark.py)."""
    if device_type == "cuda":
        return "sdpa"
    return "math" if amp == "bf16" else "sdpa"


def resolve_layers(device_type: str, amp: str, attn: str = "auto", patch_embed: str = "auto") -> Tuple[str, str]:
    """(attention, patch embedding) in effect: the given choices, or the measured defaults for 'auto'."""
    attn = default_attention(device_type, amp) if attn == "auto" else attn
    patch_embed = DEFAULT_PATCH_EMBED if patch_embed == "auto" else patch_embed
    if attn not in ATTN_IMPLS or patch_embed not in PATCH_EMBED_IMPLS:
        raise ValueError(f"unknown attention {attn!r} or patch embedding {patch_embed!r}")
    return attn, patch_embed


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch offers a fused AdamW kernel for this device."""
    return device.type in ("cuda", "cpu")


def adamw_impl(impl: str, device: torch.device) -> str:
    """The AdamW implementation that `impl` stands for on this device ('auto': fused where supported)."""
    if impl != "auto":
        return impl
    return "fused" if fused_adamw_supported(device) else "default"


def adamw(params: Iterable, lr: float, device: torch.device, betas=(0.9, 0.999),
          impl: str = "auto") -> torch.optim.AdamW:
    """AdamW: fused kernel where supported ('auto'), or 'foreach' / 'forloop' / 'default'.

    `lr` is required: the schedule overwrites it every step, but an optimizer built before the lr is
    known would otherwise start from a silent default.
    """
    if lr is None:
        raise ValueError("adamw needs a learning rate (resolve --lr / --blr first)")
    impl = adamw_impl(impl, device)
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"AdamW implementation must be 'auto' or one of {ADAMW_IMPLS}, got {impl!r}")
    kwargs = {"fused": True} if impl == "fused" else {"foreach": True} if impl == "foreach" else \
        {"foreach": False} if impl == "forloop" else {}
    return torch.optim.AdamW(params, lr=lr, betas=betas, **kwargs)
