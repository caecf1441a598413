"""Shared fixtures: the repo root on sys.path, tiny generated image folders."""
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def make_image_folder(root, classes=2, per_class=4, size=32, splits=("train", "val"), seed=0):
    """Write random RGB PNGs as root/<split>/<class>/<i>.png; return root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(os.path.join(d, f"{i}.png"))
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
    yield
