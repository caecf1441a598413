"""util/datasets.py: folders, transforms, and RandAugment at its highest magnitude."""
import argparse

import numpy as np
import pytest
from PIL import Image
from timm.data import auto_augment

import util.datasets as datasets
from util.errors import DataError


def test_randaugment_posterize_at_level_10_does_not_crash():
    args = argparse.Namespace(input_size=32, color_jitter=None, aa="rand-m9-mstd0.5-inc1", reprob=0.25,
                              remode="pixel", recount=1)
    datasets.build_transform(True, args)  # installs the posterize that accepts 0 bits
    img = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = np.asarray(op(img))
    assert out.shape == (32, 32, 3) and out.max() == 0  # 0 bits kept: black, as older Pillow gave
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)
    assert np.asarray(op(img)).max() == 192  # 2 bits kept: 200 -> 0b11000000


def test_eval_transform_sizes():
    img = Image.fromarray(np.zeros((50, 80, 3), dtype=np.uint8))
    assert datasets.eval_transform(32)(img).shape == (3, 32, 32)
    # 224/256 crop ratio: the short side is resized to int(32 / 0.875) = 36 before the crop
    assert datasets.eval_transform(32).transforms[0].size == 36
    assert datasets.eval_transform(256).transforms[0].size == 256
    assert datasets.linprobe_transform(False, 224).transforms[0].size == 256
    assert datasets.pretrain_transform(48)(img).shape == (3, 48, 48)


def test_folders_errors_and_classes(image_folder, tmp_path):
    args = argparse.Namespace(data_path=image_folder, input_size=32)
    ds = datasets.build_dataset(False, args)
    assert ds.classes == ["class0", "class1"] and len(ds) == 8
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and y == 1
    with pytest.raises(DataError, match="does not exist"):
        datasets.build_dataset(True, argparse.Namespace(data_path=str(tmp_path / "nope"), input_size=32))
