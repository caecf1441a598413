"""Speed choices: patch embedding as one matmul, the attention kernel, the optimizer implementation.

None of them changes parameter names, shapes or the maths; each default was kept only where a
benchmark (benchmark.py, numbers in PRETRAIN.md) showed it faster.
"""
import platform
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed

ATTN_IMPLS = ("sdpa", "math")

# x86 feature flags (as Linux names them in /proc/cpuinfo) that mean bf16 matmuls run natively:
# AVX512-BF16 and AMX. Arm's BF16 extension is left out until a benchmark shows bf16 faster there.
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def native_bf16_from_cpuinfo(cpuinfo: str) -> bool:
    """Whether the flags listed in a /proc/cpuinfo text include a native bf16 instruction set."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # the first processor's; all list the same
            return bool(_NATIVE_BF16_FLAGS & set(value.split()))
    return False


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (x86 AVX512-BF16 / AMX, on Linux) through oneDNN.

    Read from /proc/cpuinfo: torch's own probes differ between releases and count CPUs that only
    emulate bf16 (AVX-512 without BF16), where bf16 is slower than fp32.
    """
    if platform.system() != "Linux" or not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return native_bf16_from_cpuinfo(f.read())
    except OSError:
        return False


class LinearPatchEmbed(PatchEmbed):
    """timm PatchEmbed computed as patchify + one matmul with the conv weight (same `proj` keys).

    Equivalent to the stride-p convolution; its backward avoids the slow conv weight-gradient
    kernels on CPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != tuple(self.img_size):
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {tuple(self.img_size)}")
        n, c, H, W = x.shape
        p_h, p_w = self.patch_size
        h, w = H // p_h, W // p_w
        x = x.reshape(n, c, h, p_h, w, p_w).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, c * p_h * p_w)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)  # [D, C*p*p]
        x = F.linear(x, weight, self.proj.bias)  # [N, L, D]
        if not self.flatten:
            x = x.transpose(1, 2).reshape(n, -1, h, w)
        return self.norm(x)


def set_attention(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    """Use fused scaled_dot_product_attention ('sdpa') or explicit matmul-softmax-matmul ('math')."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTN_IMPLS}, got {impl}")
    for m in model.modules():
        if hasattr(m, "fused_attn") and hasattr(m, "qkv"):
            m.fused_attn = impl == "sdpa"
    return model


def default_attention(device_type: str, amp: str) -> str:
    """The faster attention path for a device and precision (measured with benchmark.py)."""
    if device_type == "cuda":
        return "sdpa"
    return "math" if amp == "bf16" else "sdpa"


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch offers a fused AdamW kernel for this device."""
    return device.type in ("cuda", "cpu")


def adamw_impl(impl: str, device: torch.device) -> str:
    """The AdamW implementation that `impl` stands for on this device ('auto': fused where supported)."""
    if impl != "auto":
        return impl
    return "fused" if fused_adamw_supported(device) else "default"


def adamw(params: Iterable, lr: Optional[float], device: torch.device, betas=(0.9, 0.999),
          impl: str = "auto") -> torch.optim.AdamW:
    """AdamW: fused kernel where supported ('auto'), or 'foreach' / 'forloop' / 'default'."""
    kwargs = {}
    impl = adamw_impl(impl, device)
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    elif impl == "forloop":
        kwargs["foreach"] = False
    return torch.optim.AdamW(params, lr=lr if lr is not None else 1e-3, betas=betas, **kwargs)


def set_patch_embed(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    """Compute patch embeddings with the convolution ('conv') or patchify + matmul ('linear')."""
    if impl not in ("conv", "linear"):
        raise ValueError(f"patch embedding must be 'conv' or 'linear', got {impl}")
    for m in model.modules():
        if isinstance(m, PatchEmbed):
            m.__class__ = LinearPatchEmbed if impl == "linear" else PatchEmbed
    return model


def default_patch_embed(device_type: str) -> str:
    """The faster patch-embedding path for a device (measured with benchmark.py)."""
    return "linear"


def configure(model: torch.nn.Module, device_type: str, amp: str, attn: str = "auto",
              patch_embed: str = "auto") -> torch.nn.Module:
    """Apply the fast defaults (or the given choices) to a ViT / MAE model in place."""
    set_attention(model, default_attention(device_type, amp) if attn == "auto" else attn)
    set_patch_embed(model, default_patch_embed(device_type) if patch_embed == "auto" else patch_embed)
    return model
