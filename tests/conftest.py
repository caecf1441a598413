"""Shared fixtures: the repo root on sys.path, tiny generated image folders, one pre-trained tiny MAE."""
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


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory):
    """3 classes: 12 training images, 7 validation images (which do not divide evenly over 2 processes)."""
    root = tmp_path_factory.mktemp("cls")
    make_image_folder(root / "data", classes=3, per_class=4, size=32, splits=("train",))
    make_image_folder(root / "val_tmp", classes=3, per_class=3, size=32, splits=("val",), seed=1)
    os.rename(root / "val_tmp" / "val", root / "data" / "val")
    os.remove(root / "data" / "val" / "class2" / "2.png")
    os.remove(root / "data" / "val" / "class1" / "2.png")
    return str(root / "data")


@pytest.fixture(scope="session")
def shards(cls_data, tmp_path_factory):
    """cls_data written as WebDataset shards by make_shards.py, 5 samples a shard (train: 5, 5, 2)."""
    pytest.importorskip("webdataset")
    pytest.importorskip("wids")
    import make_shards
    from helpers import run_entry

    out = tmp_path_factory.mktemp("shards") / "data"
    proc = run_entry(make_shards, "--data_path", cls_data, "--output_dir", out, "--maxcount", "5")
    assert "each class's count equal to the folder's" in proc.stdout
    return str(out)


@pytest.fixture(scope="session")
def pretrained(cls_data, tmp_path_factory):
    """checkpoint-0.pth of one epoch of main_pretrain.py (mae_vit_tiny_patch16, 32 px) on cls_data."""
    import main_pretrain
    from helpers import TINY_PRETRAIN, run_entry

    out = tmp_path_factory.mktemp("pre")
    run_entry(main_pretrain, *TINY_PRETRAIN, "--data_path", cls_data, "--epochs", "1", "--output_dir", out,
              "--log_dir", "")
    return out / "checkpoint-0.pth"


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
    yield
