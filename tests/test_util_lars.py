"""Tests for util.lars.LARS (MoCo v3 variant) against step-by-step hand computations."""
import math

import pytest
import torch

from util.lars import LARS


def _norm(xs):
    return math.sqrt(sum(x * x for x in xs))


def _hand_step(w, g, mu, lr, wd, momentum, tc, matrix):
    """One LARS step on flat python lists; returns (new w, new mu)."""
    if matrix:
        u = [gi + wd * wi for gi, wi in zip(g, w)]
        pn, un = _norm(w), _norm(u)
        q = tc * pn / un if pn > 0 and un > 0 else 1.0
        u = [ui * q for ui in u]
    else:
        u = list(g)
    mu = [momentum * m + ui for m, ui in zip(mu, u)]
    w = [wi - lr * m for wi, m in zip(w, mu)]
    return w, mu


def _flat(t):
    return t.detach().reshape(-1).double().tolist()


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_two_steps_against_hand_computation(wd):
    lr, momentum, tc = 0.5, 0.9, 0.001
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.5, -0.5, 2.0], dtype=torch.float64))
    opt = LARS([w, b], lr=lr, weight_decay=wd, momentum=momentum, trust_coefficient=tc)
    hw, hb = _flat(w), _flat(b)
    hmw, hmb = [0.0] * 6, [0.0] * 3
    grads = [
        (torch.tensor([[0.1, 0.2, -0.3], [0.4, -0.5, 0.6]], dtype=torch.float64),
         torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)),
        (torch.tensor([[-0.2, 0.1, 0.0], [0.3, 0.3, -0.1]], dtype=torch.float64),
         torch.tensor([0.5, 0.5, -1.0], dtype=torch.float64)),
    ]
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        hw, hmw = _hand_step(hw, _flat(gw), hmw, lr, wd, momentum, tc, matrix=True)
        hb, hmb = _hand_step(hb, _flat(gb), hmb, lr, wd, momentum, tc, matrix=False)
        assert _flat(w) == pytest.approx(hw, rel=1e-12, abs=1e-15)
        assert _flat(b) == pytest.approx(hb, rel=1e-12, abs=1e-15)
        assert _flat(opt.state[w]["mu"]) == pytest.approx(hmw, rel=1e-12, abs=1e-15)
        assert _flat(opt.state[b]["mu"]) == pytest.approx(hmb, rel=1e-12, abs=1e-15)
    # the trust ratio really scaled the matrix update (an unscaled one would move it by ~0.1)
    assert max(abs(x - y) for x, y in zip(_flat(w), [1.0, -2.0, 0.5, 0.25, 3.0, -1.0])) < 0.01


def test_first_step_trust_ratio_explicit():
    # w = [[3, 4]] (norm 5), g = [[0, 1]], wd = 1: update = [[3, 5]], norm sqrt(34)
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    w.grad = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    opt = LARS([w], lr=2.0, weight_decay=1.0, momentum=0.9, trust_coefficient=0.1)
    opt.step()
    q = 0.1 * 5.0 / math.sqrt(34.0)
    assert _flat(opt.state[w]["mu"]) == pytest.approx([3 * q, 5 * q], rel=1e-12)
    assert _flat(w) == pytest.approx([3 - 2 * 3 * q, 4 - 2 * 5 * q], rel=1e-12)


def test_one_dimensional_params_get_raw_gradient():
    b = torch.nn.Parameter(torch.tensor([10.0, -10.0]))
    b.grad = torch.tensor([1.0, 2.0])
    opt = LARS([b], lr=0.1, weight_decay=0.5, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    torch.testing.assert_close(opt.state[b]["mu"], torch.tensor([1.0, 2.0]))  # no decay, no scaling
    torch.testing.assert_close(b.data, torch.tensor([9.9, -10.2]))
    b.grad = torch.tensor([0.0, 0.0])
    opt.step()
    torch.testing.assert_close(opt.state[b]["mu"], torch.tensor([0.9, 1.8]))
    torch.testing.assert_close(b.data, torch.tensor([9.81, -10.38]))


def test_zero_norm_param_gets_factor_one():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    opt = LARS([w], lr=0.1, weight_decay=0.3, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    torch.testing.assert_close(opt.state[w]["mu"], torch.tensor([[1.0, -1.0], [2.0, 0.5]]))
    torch.testing.assert_close(w.data, torch.tensor([[-0.1, 0.1], [-0.2, -0.05]]))


def test_zero_update_norm_gets_factor_one_and_no_nan():
    w = torch.nn.Parameter(torch.ones(2, 2))
    w.grad = torch.zeros(2, 2)
    opt = LARS([w], lr=0.1, weight_decay=0.0, momentum=0.9)
    opt.step()
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.data, torch.ones(2, 2))
    torch.testing.assert_close(opt.state[w]["mu"], torch.zeros(2, 2))


def test_params_without_grad_are_skipped_and_defaults():
    w = torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([w])
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["momentum"], g["trust_coefficient"]) == (0, 0, 0.9, 0.001)
    opt.step()
    assert "mu" not in opt.state[w]
    torch.testing.assert_close(w.data, torch.ones(2, 2))
