"""Tests for util.misc: the loss scaler, RNG state, single-process distributed helpers (meters are in
test_util_metrics.py)."""
import argparse
import math
import random

import numpy as np
import pytest
import torch

from util import misc

# ----------------------------------------------------------------------------
# NativeScalerWithGradNormCount


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randn(4, 3)
    return model, opt, x


def _hand_grad_norm(params):
    return math.sqrt(sum(float(g) ** 2 for p in params for g in p.grad.reshape(-1)))


def test_scaler_disabled_steps_only_on_update_grad():
    model, opt, x = _setup()
    scaler = misc.NativeScalerWithGradNormCount("cpu", enabled=False)
    assert not scaler.enabled and scaler.state_dict() == {}
    assert misc.NativeScalerWithGradNormCount.state_dict_key == "amp_scaler"
    w0 = model.weight.detach().clone()
    out = scaler(model(x).pow(2).sum(), opt, parameters=model.parameters(), update_grad=False)
    assert out is None
    torch.testing.assert_close(model.weight, w0, rtol=0, atol=0)  # no step
    g1 = model.weight.grad.clone()
    assert g1.abs().sum() > 0
    norm = scaler(model(x).pow(2).sum(), opt, parameters=model.parameters(), update_grad=True)
    torch.testing.assert_close(model.weight.grad, 2 * g1)  # accumulated over both calls
    torch.testing.assert_close(model.weight.detach(), w0 - 2 * g1)  # one SGD step, lr 1
    assert norm.item() == pytest.approx(_hand_grad_norm(model.parameters()), rel=1e-5)


def test_scaler_returns_none_without_parameters():
    model, opt, x = _setup()
    scaler = misc.NativeScalerWithGradNormCount("cpu", enabled=False)
    w0 = model.weight.detach().clone()
    assert scaler(model(x).sum(), opt) is None
    assert not torch.equal(model.weight.detach(), w0)


def test_scaler_clip_grad_clips():
    model, opt, x = _setup()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    # the unclipped gradient, computed independently on a copy
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    (ref(x).pow(2).sum() * 10).backward()
    raw_norm = _hand_grad_norm(ref.parameters())
    assert raw_norm > 0.5

    scaler = misc.NativeScalerWithGradNormCount("cpu", enabled=False)
    norm = scaler(model(x).pow(2).sum() * 10, opt, clip_grad=0.5, parameters=model.parameters())
    # the returned norm is the one before clipping; the stored gradients are scaled to norm 0.5
    assert norm.item() == pytest.approx(raw_norm, rel=1e-5)
    factor = 0.5 / raw_norm
    torch.testing.assert_close(model.weight.grad, ref.weight.grad * factor, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.bias.grad, ref.bias.grad * factor, rtol=1e-4, atol=1e-6)
    # and the SGD step (lr 1) used the clipped gradients
    torch.testing.assert_close(model.weight.detach(), w0 - ref.weight.grad * factor, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), b0 - ref.bias.grad * factor, rtol=1e-4, atol=1e-6)


def test_get_grad_norm_against_hand_computation():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    c = torch.nn.Parameter(torch.zeros(1))  # no grad: ignored
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([[0.0, 4.0], [0.0, 12.0]])
    assert misc.get_grad_norm_([a, b, c]).item() == pytest.approx(13.0)
    assert misc.get_grad_norm_([a, b], norm_type=float("inf")).item() == pytest.approx(12.0)
    assert misc.get_grad_norm_([c]).item() == 0.0


# ----------------------------------------------------------------------------
# RNG state


def _draw():
    return (torch.rand(4).tolist(), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1))


def test_rng_state_round_trip_through_safe_torch_load(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn(1)  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and one in python's
    state = misc.get_rng_state()
    path = tmp_path / "rng.pth"
    torch.save({"rng": state}, path)
    expected = _draw()
    assert _draw() != expected  # the streams moved on
    misc.set_rng_state(state)
    assert _draw() == expected
    loaded = torch.load(path, weights_only=True)["rng"]
    _draw()
    misc.set_rng_state(loaded)
    assert _draw() == expected


# ----------------------------------------------------------------------------
# distributed helpers, single process


def test_single_process_helpers():
    assert misc.get_world_size() == 1 and misc.get_rank() == 0 and misc.is_main_process()
    assert misc.all_reduce_mean(3.5) == 3.5
    t = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(misc.all_reduce_mean(t), t, rtol=0, atol=0)
    assert misc.backend_for("cuda") == "nccl" and misc.backend_for("cpu") == "gloo"


def test_init_distributed_mode_without_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    args = argparse.Namespace(dist_on_itp=False, dist_url="env://", device="cpu")
    misc.init_distributed_mode(args)
    assert args.distributed is False
    assert args.rank == 0 and args.world_size == 1
    assert hasattr(args, "gpu")
    assert not torch.distributed.is_initialized()


def test_init_distributed_mode_single_slurm_task(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    args = argparse.Namespace(dist_on_itp=False, dist_url="env://", device="cpu")
    misc.init_distributed_mode(args)
    assert args.distributed is False and args.world_size == 1


def test_save_on_master_writes_atomically(tmp_path):
    path = tmp_path / "x.pth"
    misc.save_on_master({"a": torch.ones(2)}, path)
    assert list(tmp_path.iterdir()) == [path]
    torch.testing.assert_close(torch.load(path, weights_only=True)["a"], torch.ones(2))


def test_setup_for_distributed_silences_print_on_other_ranks(capsys, monkeypatch):
    import builtins

    monkeypatch.setattr(builtins, "print", builtins.print)  # put the builtin back afterwards
    misc.setup_for_distributed(False)
    print("hidden")
    print("shown", force=True)
    misc.setup_for_distributed(True)
    print("master")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("] shown") and lines[1].endswith("] master")
    assert lines[0].startswith("[")  # the reference's time stamp
