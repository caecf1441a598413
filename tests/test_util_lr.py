"""Tests for util.lr_sched (warm-up + cosine) and util.lr_decay (layer-wise lr decay groups)."""
import math
import re
from argparse import Namespace

import pytest
import torch

import models_vit
from util import lr_decay, lr_sched

# ----------------------------------------------------------------------------
# lr_sched


def _sched_args():
    return Namespace(lr=0.4, min_lr=0.01, warmup_epochs=4, epochs=20)


def _optimizer():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    return torch.optim.SGD([{"params": [a], "lr_scale": 0.5},
                            {"params": [b]},
                            {"params": [c], "lr_scale": 0.75 ** 3}], lr=123.0)


@pytest.mark.parametrize("epoch,expected", [
    (0.0, 0.0),                      # start of warm-up
    (1.0, 0.1),                      # a quarter of the way: 0.4 * 1/4
    (2.5, 0.25),                     # mid warm-up, fractional epoch: 0.4 * 2.5/4
    (4.0, 0.4),                      # end of warm-up: the peak
    (12.0, (0.4 + 0.01) / 2),        # half-way through the cosine: the mean of lr and min_lr
    (8.0, 0.01 + 0.39 * 0.5 * (1 + math.cos(math.pi / 4))),  # a quarter of the cosine
    (20.0, 0.01),                    # the end: min_lr
])
def test_adjust_learning_rate_values(epoch, expected):
    opt = _optimizer()
    lr = lr_sched.adjust_learning_rate(opt, epoch, _sched_args())
    assert lr == pytest.approx(expected, abs=1e-12)
    groups = opt.param_groups
    assert groups[0]["lr"] == pytest.approx(expected * 0.5, abs=1e-12)
    assert groups[1]["lr"] == pytest.approx(expected, abs=1e-12)
    assert groups[2]["lr"] == pytest.approx(expected * 0.75 ** 3, abs=1e-12)


def test_schedule_is_continuous_and_monotone():
    args = _sched_args()
    opt = _optimizer()
    values = [lr_sched.adjust_learning_rate(opt, e / 10, args) for e in range(0, 201)]
    peak = values.index(max(values))
    assert peak == 40  # epoch 4.0
    assert all(x < y for x, y in zip(values[:peak], values[1:peak + 1]))
    assert all(x > y for x, y in zip(values[peak:-1], values[peak + 1:]))
    assert max(abs(x - y) for x, y in zip(values, values[1:])) < 0.011


def test_no_warmup():
    args = Namespace(lr=1.0, min_lr=0.0, warmup_epochs=0, epochs=10)
    opt = _optimizer()
    assert lr_sched.adjust_learning_rate(opt, 0.0, args) == pytest.approx(1.0)
    assert lr_sched.adjust_learning_rate(opt, 5.0, args) == pytest.approx(0.5)


# ----------------------------------------------------------------------------
# lr_decay


@pytest.fixture(scope="module")
def vit_b():
    return models_vit.vit_base_patch16(img_size=32, num_classes=10, global_pool=True)


@pytest.mark.parametrize("name,expected", [
    ("cls_token", 0), ("pos_embed", 0), ("patch_embed.proj.weight", 0), ("patch_embed.proj.bias", 0),
    ("blocks.0.norm1.weight", 1), ("blocks.0.attn.qkv.weight", 1), ("blocks.5.mlp.fc1.bias", 6),
    ("blocks.11.mlp.fc2.weight", 12), ("fc_norm.weight", 13), ("norm.bias", 13),
    ("head.weight", 13), ("head.bias", 13),
])
def test_get_layer_id_for_vit(name, expected):
    assert lr_decay.get_layer_id_for_vit(name, 13) == expected


def _expected_layer(name):
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else 13


def test_param_groups_lrd_vit_base(vit_b):
    nwd = vit_b.no_weight_decay()
    groups = lr_decay.param_groups_lrd(vit_b, weight_decay=0.05, no_weight_decay_list=nwd,
                                       layer_decay=0.75)
    assert len(groups) == 2 * 14  # layers 0..13, each with a decay and a no-decay group
    where = {}
    for gi, g in enumerate(groups):
        assert set(g) >= {"lr_scale", "weight_decay", "params"}
        for p in g["params"]:
            assert id(p) not in where
            where[id(p)] = gi
    named = list(vit_b.named_parameters())
    assert len(where) == len(named)
    seen_order = []
    for name, p in named:
        g = groups[where[id(p)]]
        layer = _expected_layer(name)
        assert g["lr_scale"] == pytest.approx(0.75 ** (13 - layer)), name
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
        key = (layer, no_decay)
        if key not in seen_order:
            seen_order.append(key)
    # groups appear in first-seen order
    actual = [(_layer_of_group(g, named), g["weight_decay"] == 0.0) for g in groups]
    assert actual == seen_order
    # spot checks
    by_name = dict(named)
    head_group = groups[where[id(by_name["head.weight"])]]
    assert head_group["lr_scale"] == 1.0 and head_group["weight_decay"] == 0.05
    assert groups[where[id(by_name["head.bias"])]]["weight_decay"] == 0.0
    assert groups[where[id(by_name["fc_norm.weight"])]]["lr_scale"] == 1.0
    emb = groups[where[id(by_name["cls_token"])]]
    assert emb["lr_scale"] == pytest.approx(0.75 ** 13) and emb["weight_decay"] == 0.0
    assert where[id(by_name["pos_embed"])] == where[id(by_name["cls_token"])]
    assert groups[where[id(by_name["patch_embed.proj.weight"])]]["lr_scale"] == pytest.approx(0.75 ** 13)
    assert groups[where[id(by_name["blocks.11.attn.qkv.weight"])]]["lr_scale"] == pytest.approx(0.75)
    assert groups[where[id(by_name["blocks.0.norm1.bias"])]]["weight_decay"] == 0.0


def _layer_of_group(group, named):
    ids = {id(p): n for n, p in named}
    layers = {_expected_layer(ids[id(p)]) for p in group["params"]}
    assert len(layers) == 1
    return layers.pop()


def test_param_groups_lrd_without_list_decays_tokens(vit_b):
    groups = lr_decay.param_groups_lrd(vit_b, weight_decay=0.1, no_weight_decay_list=[],
                                       layer_decay=0.5)
    cls = vit_b.cls_token
    g = next(g for g in groups if any(p is cls for p in g["params"]))
    assert g["weight_decay"] == 0.1 and g["lr_scale"] == pytest.approx(0.5 ** 13)
    assert any(p is vit_b.pos_embed for p in g["params"])


def test_param_groups_lrd_skips_frozen_parameters():
    model = models_vit.vit_tiny_patch16(img_size=32, depth=3, num_classes=2)
    for n, p in model.named_parameters():
        if n.startswith("blocks.0.") or n.startswith("patch_embed."):
            p.requires_grad = False
    groups = lr_decay.param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    in_groups = {id(p) for g in groups for p in g["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in in_groups) == p.requires_grad, n
    # layer 0 keeps only cls/pos (no-decay); layer 1 vanishes: 1 + 2*2 (blocks 1, 2) + 2 (top)
    assert len(groups) == 1 + 4 + 2
    assert groups[0]["lr_scale"] == pytest.approx(0.75 ** 4)
    assert [p.shape for p in groups[0]["params"]] == [model.cls_token.shape, model.pos_embed.shape]
