"""util/datasets.py: opening images (16-bit ones too), folders, errors, and the training / validation loaders."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.folder import default_loader

import util.datasets as datasets
from util.errors import DataError, UserError

RAMP16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once


def scaled(values):
    """16-bit values as 8 bits the way DALI's decoders scale them, computed independently: round(v / 257)
    (v / 257 is never a tie: 2v = 257 (2k + 1) has no integer solution)."""
    return np.round(np.asarray(values, dtype=np.float64) / 257).astype(np.uint8)


def test_folders_errors_and_classes(image_folder, tmp_path):
    args = argparse.Namespace(data_path=image_folder, input_size=32)
    ds = datasets.build_dataset(False, args)
    assert ds.classes == ["class0", "class1"] and len(ds) == 8
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and y == 1
    with pytest.raises(DataError, match="does not exist"):
        datasets.build_dataset(True, argparse.Namespace(data_path=str(tmp_path / "nope"), input_size=32))


def test_train_loader_shards_shuffles_per_epoch_and_drops_the_last_batch(image_folder):
    ds = datasets.build_dataset(True, argparse.Namespace(data_path=image_folder), transform=lambda img: 0)
    loader = datasets.train_loader(ds, batch_size=3, num_workers=0, pin_mem=False, seed=0)
    assert len(loader) == 2 and loader.drop_last  # 8 images, batches of 3
    loader.sampler.set_epoch(0)
    first = list(loader.sampler)
    loader.sampler.set_epoch(1)
    assert sorted(first) == list(range(8)) and list(loader.sampler) != first
    with pytest.raises(UserError, match="fewer than one batch"):
        datasets.train_loader(ds, batch_size=9, num_workers=0, pin_mem=False, seed=0)


def test_eval_loader_keeps_every_image_in_order(image_folder):
    ds = datasets.build_dataset(False, argparse.Namespace(data_path=image_folder, input_size=32))
    loader = datasets.eval_loader(ds, batch_size=3, num_workers=0, pin_mem=False, dist_eval=True)
    targets = torch.cat([y for _, y in loader])
    assert targets.tolist() == [y for _, y in ds.samples]


def test_shard_sampler_counts_every_index_once():
    ds = list(range(7))
    shards = [list(datasets.ShardSampler(ds, 3, r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(datasets.ShardSampler(ds, 3, r)) for r in range(3)] == [3, 2, 2]


# ----------------------------------------------------------------------------
# opening an image

def test_16bit_grey_png_and_tiff_scale_to_8_bits_replicated_to_rgb(tmp_path):
    Image.fromarray(RAMP16).save(tmp_path / "grey.png")
    Image.fromarray(RAMP16).save(tmp_path / "grey.tif")
    Image.fromarray(RAMP16).save(tmp_path / "grey_lzw.tif", compression="tiff_lzw")
    for name in ("grey.png", "grey.tif", "grey_lzw.tif"):
        assert Image.open(tmp_path / name).mode == "I;16"
        img = datasets.load_image(str(tmp_path / name))
        assert img.mode == "RGB" and img.size == (256, 256)
        np.testing.assert_array_equal(np.asarray(img), np.repeat(scaled(RAMP16)[..., None], 3, -1), err_msg=name)
    # mid-grey is 128, not torchvision's default loader's 255 (convert("RGB") clips at 255)
    d = tmp_path / "data" / "class0"
    d.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(d / "mid.png")
    assert np.asarray(default_loader(str(d / "mid.png"))).max() == 255
    dataset = datasets.ImageFolder(str(tmp_path / "data"))
    assert dataset.loader is datasets.load_image
    assert np.unique(np.asarray(dataset.load(0)[0])).tolist() == [128]


def test_8bit_images_open_as_torchvision_opens_them(tmp_path):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (12, 10, 4), dtype=np.uint8))
    images = {"rgb.png": rgba.convert("RGB"), "grey.png": rgba.convert("L"), "rgba.png": rgba,
              "palette.png": rgba.convert("RGB").convert("P"), "rgb.jpg": rgba.convert("RGB"),
              "grey.tif": rgba.convert("L")}
    for name, img in images.items():
        img.save(tmp_path / name)
        got = datasets.load_image(str(tmp_path / name))
        assert got.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(got), np.asarray(default_loader(str(tmp_path / name))), err_msg=name)


def test_images_without_an_8bit_scale_or_truncated_are_unreadable_files(tmp_path, capsys):
    d = tmp_path / "data" / "class0"
    d.mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(d / "a_good.png")
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(d / "b_int32.tif")  # mode I, past 16 bits
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(d / "c_float.tif")  # mode F
    Image.fromarray(RAMP16).save(d / "full.png")
    data = (d / "full.png").read_bytes()
    (d / "d_cut16.png").write_bytes(data[:len(data) // 2])  # a truncated 16-bit grey PNG
    os.remove(d / "full.png")
    with pytest.raises(ValueError, match="outside the 16-bit range"):
        datasets.load_image(str(d / "b_int32.tif"))
    with pytest.raises(ValueError, match="floating-point"):
        datasets.load_image(str(d / "c_float.tif"))
    with pytest.raises(OSError, match="truncated"):
        datasets.load_image(str(d / "d_cut16.png"))
    # ImageFolder's handling of unreadable files: the next readable sample, one warning each
    dataset = datasets.ImageFolder(str(tmp_path / "data"))
    assert [np.asarray(dataset.load(i)[0])[0, 0].tolist() for i in range(4)] == [[10, 20, 30]] * 4
    err = capsys.readouterr().err
    assert dataset.skipped == 3 and all(n in err for n in ("b_int32.tif", "c_float.tif", "d_cut16.png"))
    with pytest.raises(DataError, match="cannot read image .*b_int32.tif"):
        datasets.ImageFolder(str(tmp_path / "data"), strict=True).load(1)
