"""util/precision.py: which CPUs get bf16 by default, the --amp default per device, and gradient norms in fp32."""
import math

import pytest
import torch

import util.precision as precision


# /proc/cpuinfo as Linux prints it, trimmed to the interesting part
def _cpuinfo(flags, processors=2, model="Some CPU"):
    block = f"processor\t: {{}}\nmodel name\t: {model}\nflags\t\t: {flags}\nvmx flags\t: ept vpid\n\n"
    return "".join(block.format(i) for i in range(processors))


_SAPPHIRE_RAPIDS = _cpuinfo("fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8")
_GENOA = _cpuinfo("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni")
_SKYLAKE = _cpuinfo("fpu sse2 avx2 avx512f avx512bw avx512_vnni", model="Xeon (bf16 emulated)")
_MILAN = _cpuinfo("fpu sse2 avx2 fma bmi2 sha_ni")
_GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, native", [(_SAPPHIRE_RAPIDS, True), (_GENOA, True), (_SKYLAKE, False),
                                             (_MILAN, False), (_GRAVITON3, False), ("", False)])
def test_native_bf16_read_from_cpu_flags(cpuinfo, native):
    # AVX-512 without its BF16 extension only emulates bf16, which is slower than fp32: no bf16 default;
    # Arm's BF16 is not trusted until measured; text outside the flags line does not count
    assert precision.native_bf16_from_cpuinfo(cpuinfo) is native


def test_native_bf16_needs_linux_and_a_readable_cpuinfo(monkeypatch):
    import builtins

    monkeypatch.setattr(precision.platform, "system", lambda: "Darwin")
    assert precision.cpu_has_native_bf16() is False
    monkeypatch.setattr(precision.platform, "system", lambda: "Linux")

    def unreadable(*args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr(builtins, "open", unreadable)
    assert precision.cpu_has_native_bf16() is False


def test_cpu_default_precision_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_amp(None, torch.device("cpu")) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_amp(None, torch.device("cpu")) == "none"
    assert precision.resolve_amp("bf16", torch.device("cpu")) == "bf16"


def test_cuda_default_precision_is_bf16_where_supported(monkeypatch):
    # bf16 needs no loss scaler and measured faster on an H100 (PRETRAIN.md); fp16 with the scaler elsewhere,
    # also on GPUs that only emulate bf16 (V100, T4), which torch counts as supported by default
    def gpu(native):
        def is_bf16_supported(including_emulation=True):
            assert including_emulation is False
            return native
        return is_bf16_supported

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", gpu(True))
    assert precision.resolve_amp(None, torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", gpu(False))
    assert precision.resolve_amp(None, torch.device("cuda")) == "fp16"
    assert precision.resolve_amp("fp16", torch.device("cuda")) == "fp16"  # the reference's behaviour, on request


def test_grad_norm_of_bf16_gradients_is_fp32():
    p = torch.nn.Parameter(torch.zeros(257, dtype=torch.bfloat16))
    p.grad = torch.ones(257, dtype=torch.bfloat16)
    p.grad[0] = 16.0
    norm = precision.get_grad_norm_([p])
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(math.sqrt(512), rel=1e-6)


def test_clipping_of_bf16_gradients_decides_on_an_fp32_norm():
    model = torch.nn.Linear(300, 1, bias=False).to(torch.bfloat16)
    model.weight.grad = torch.ones_like(model.weight)
    model.weight.grad[0, 0] = 3.0
    scaler = precision.NativeScalerWithGradNormCount("cpu", enabled=False)
    norm = scaler((model.weight.float() * 0).sum(), torch.optim.SGD(model.parameters(), lr=0.0),
                  clip_grad=1.0, parameters=list(model.parameters()))
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(math.sqrt(308), rel=1e-6)
    assert model.weight.grad.double().norm().item() == pytest.approx(1.0, rel=1e-2)
