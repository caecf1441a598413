"""Mixed precision: the --amp choices, the default per device, autocast and the loss scaler.

References:
    DeiT: https://github.com/facebookresearch/deit
"""
import platform
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, Optional, Union

import torch
from torch.distributed.tensor import DTensor

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}

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


def resolve_amp(amp: Optional[str], device: torch.device) -> str:
    """The --amp value in effect: the given one, or the device's default.

    On CUDA bf16 where the GPU supports it natively (no loss scaler needed; measured faster, PRETRAIN.md), else
    fp16 with the scaler (the reference's choice); bf16 on CPUs that run it natively; fp32 ('none') elsewhere.
    """
    if amp is not None:
        return amp
    if device.type == "cuda":
        # native bf16 only: by default torch also counts GPUs that emulate it (V100, T4), where fp16 is faster
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "none"


def autocast(device: torch.device, amp: str):
    """Autocast context for the --amp value (a no-op for 'none')."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class NativeScalerWithGradNormCount:
    """Backward, optional unscale + clip, and optimizer step; a GradScaler only when enabled (fp16).

    Args:
        device_type: device the loss lives on ('cuda', 'cpu').
        enabled: use a torch.amp.GradScaler (fp16); otherwise plain backward/step.
    """

    state_dict_key = "amp_scaler"

    def __init__(self, device_type: str = "cuda", enabled: bool = True):
        if enabled and device_type == "cuda" and not torch.cuda.is_available():
            enabled = False
        self._scaler = torch.amp.GradScaler(device_type) if enabled else None

    @property
    def enabled(self) -> bool:
        return self._scaler is not None

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                 clip_grad: Optional[float] = None, parameters: Optional[Iterable] = None,
                 create_graph: bool = False, update_grad: bool = True,
                 skip: Optional[Callable[[Optional[torch.Tensor]], bool]] = None) -> Optional[torch.Tensor]:
        """Backward; at an update, unscale and clip (or only measure) the gradients of `parameters`, then step.

        `skip(norm)` (ours), asked before the step with the gradients' total norm: True drops this update (the
        optimizer does not step; under fp16 the scale still adapts, as for any update with non-finite gradients).
        Returns the total norm before clipping (None without `parameters`).
        """
        if self._scaler is not None:
            self._scaler.scale(loss).backward(create_graph=create_graph)
        else:
            loss.backward(create_graph=create_graph)
        if not update_grad:
            return None
        norm = None
        if clip_grad is not None or parameters is not None:
            if self._scaler is not None:
                self._scaler.unscale_(optimizer)  # unscale the gradients in place
            if clip_grad is not None:
                if parameters is None:
                    raise ValueError("clip_grad needs the parameters to clip")
                norm = clip_grad_norm_(parameters, clip_grad)
            else:
                norm = get_grad_norm_(parameters)
        if skip is not None and skip(norm):
            if self._scaler is not None:
                self._scaler.update()  # the unscale above found the non-finite gradients: the scale backs off
            return norm
        if self._scaler is not None:
            self._scaler.step(optimizer)
            self._scaler.update()
        else:
            optimizer.step()
        return norm

    def scale(self) -> Optional[torch.Tensor]:
        """The fp16 loss scale as a device tensor (no host sync), or None without a GradScaler."""
        return self._scaler._get_scale_async() if self._scaler is not None else None

    def state_dict(self) -> Dict:
        return self._scaler.state_dict() if self._scaler is not None else {}

    def load_state_dict(self, state_dict: Dict) -> None:
        if self._scaler is not None and state_dict:
            self._scaler.load_state_dict(state_dict)


def get_grad_norm_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
                   norm_type: float = 2.0) -> torch.Tensor:
    """Total gradient norm over parameters (without clipping), in fp32 or wider whatever the gradients' dtype."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = [p for p in parameters if p.grad is not None]
    if len(parameters) == 0:
        return torch.tensor(0.0)
    grads = [_at_least_fp32(p.grad.detach()) for p in parameters]  # the same tensors when fp32 already
    if any(isinstance(g, DTensor) for g in grads):  # sharded gradients: torch sums over the shards
        return _replicated(torch.nn.utils.get_total_norm(grads, norm_type))
    device = grads[0].device
    if norm_type == float("inf"):
        return max(g.abs().max().to(device) for g in grads)
    if all(g.device == device for g in grads):  # one fused kernel per dtype instead of one per tensor
        return torch.norm(torch.stack(torch._foreach_norm(grads, norm_type)), norm_type)
    return torch.norm(torch.stack([torch.norm(g, norm_type).to(device) for g in grads]), norm_type)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (2-norm), with the total norm in fp32 or wider; returns it as a plain tensor.

    torch computes the norm in the gradients' dtype; ours are fp32 (the parameters stay fp32 under autocast,
    and FSDP keeps fp32 shards), which take torch's path unchanged. Narrower gradients (a bf16 model) get
    their norm from fp32 copies, so the clipping decision is not made on a bf16 norm. DTensor-aware: with
    sharded (--fsdp) gradients the total norm spans every shard.
    """
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if all(g.dtype in (torch.float32, torch.float64) for g in grads):
        return _replicated(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    norm = torch.nn.utils.get_total_norm([g.detach().float() for g in grads])
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return _replicated(norm)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _replicated(norm: torch.Tensor) -> torch.Tensor:
    """A total norm as a plain tensor (torch returns a replicated DTensor for sharded gradients)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def make_loss_scaler(amp: str, device: torch.device) -> NativeScalerWithGradNormCount:
    """Loss scaler: a GradScaler for fp16, plain backward/step otherwise."""
    return NativeScalerWithGradNormCount(device.type, enabled=amp == "fp16")
