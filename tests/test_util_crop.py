"""Tests for util.crop.RandomResizedCrop: one draw of four numbers, boxes inside the image."""
import math

import pytest
import torch
from PIL import Image
from torchvision import transforms

from util.crop import RandomResizedCrop

SHAPES = [(224, 224), (7, 300), (300, 7), (33, 17), (5, 5), (480, 640), (101, 57)]  # (height, width)
SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)


def _replay(height, width, scale, ratio):
    """The four reference draws, written out independently."""
    area = height * width
    target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_lo, log_hi = torch.log(torch.tensor(ratio)).tolist()
    aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi).item())
    w = min(int(round(math.sqrt(target_area * aspect))), width)
    h = min(int(round(math.sqrt(target_area / aspect))), height)
    i = torch.randint(0, height - h + 1, size=(1,)).item()
    j = torch.randint(0, width - w + 1, size=(1,)).item()
    return i, j, h, w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale,ratio", [(SCALE, RATIO), ((0.2, 1.0), (0.1, 10.0))])
def test_boxes_inside_image(shape, scale, ratio):
    height, width = shape
    img = torch.zeros(3, height, width)
    for seed in range(150):
        torch.manual_seed(seed)
        i, j, h, w = RandomResizedCrop.get_params(img, scale, ratio)
        assert all(isinstance(v, int) for v in (i, j, h, w))
        assert 1 <= h <= height and 1 <= w <= width, (seed, i, j, h, w)
        assert 0 <= i and i + h <= height, (seed, i, j, h, w)
        assert 0 <= j and j + w <= width, (seed, i, j, h, w)


@pytest.mark.parametrize("shape", SHAPES)
def test_exactly_four_draws_and_same_box_as_replay(shape):
    height, width = shape
    pil = Image.new("RGB", (width, height))  # PIL size is (width, height)
    for seed in range(20):
        torch.manual_seed(seed)
        got = RandomResizedCrop.get_params(pil, SCALE, RATIO)
        state_after = torch.get_rng_state()
        torch.manual_seed(seed)
        expected = _replay(height, width, SCALE, RATIO)
        assert got == expected
        assert torch.equal(torch.get_rng_state(), state_after)


def test_no_retry_loop_where_torchvision_would_retry():
    # a very thin image: torchvision's loop would reject most boxes and retry (or fall back)
    img = torch.zeros(3, 4, 400)
    torch.manual_seed(3)
    ours = RandomResizedCrop.get_params(img, SCALE, RATIO)
    state_ours = torch.get_rng_state()
    torch.manual_seed(3)
    assert _replay(4, 400, SCALE, RATIO) == ours
    assert torch.equal(torch.get_rng_state(), state_ours)
    assert ours[2] == 4  # height clipped to the image rather than redrawn
    torch.manual_seed(3)
    transforms.RandomResizedCrop.get_params(img, list(SCALE), list(RATIO))
    assert not torch.equal(torch.get_rng_state(), state_ours)  # the parent class draws more


def test_transform_output_size_and_subclass():
    t = RandomResizedCrop(16, interpolation=transforms.InterpolationMode.BICUBIC)
    assert isinstance(t, transforms.RandomResizedCrop)
    out = t(Image.new("RGB", (40, 25)))
    assert out.size == (16, 16)
    out = t(torch.rand(3, 25, 40))
    assert out.shape == (3, 16, 16)
