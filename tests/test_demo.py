"""demo/: the digits writer of the quickstart and the reconstruction visualizer."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import models_mae
from helpers import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "demo"))
import mae_visualize  # noqa: E402
import quickstart  # noqa: E402


def test_write_digits_counts_split_and_labels(tmp_path):
    from sklearn.datasets import load_digits

    counts = quickstart.write_digits(str(tmp_path), input_size=8)
    assert counts == {"train": 1437, "val": 360}
    digits = load_digits()
    seen = {}
    for split in ("train", "val"):
        assert sorted(os.listdir(tmp_path / split)) == [str(d) for d in range(10)]
        for d in range(10):
            files = os.listdir(tmp_path / split / str(d))
            for f in files:
                i = int(f[:-4])
                assert digits.target[i] == d  # the folder is the label
                assert i not in seen  # no image in both splits
                seen[i] = split
            # stratified: every class is about 20% validation
            if split == "val":
                n_class = int((digits.target == d).sum())
                assert abs(len(files) - 0.2 * n_class) <= 1
    assert len(seen) == 1797
    # pixels: 0..16 scaled to 0..255, grey in all three channels (no resize at 8 px)
    i = 17
    img = np.asarray(Image.open(tmp_path / seen[i] / str(digits.target[i]) / f"{i:04d}.png"))
    assert img.shape == (8, 8, 3)
    np.testing.assert_array_equal(img[..., 0], (digits.images[i] * 255 / 16).round().astype(np.uint8))
    np.testing.assert_array_equal(img[..., 0], img[..., 2])
    # a second call keeps the files and returns the same split
    assert quickstart.write_digits(str(tmp_path), input_size=8) == counts


@pytest.mark.e2e
def test_mae_visualize_writes_a_four_panel_png(tmp_path):
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch16(img_size=32, norm_pix_loss=True)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "epoch": 0,
                "args": {"model": "mae_vit_tiny_patch16", "input_size": 32, "norm_pix_loss": True}}, ckpt)
    img = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "vis"
    proc = run_script("demo/mae_visualize.py", "--checkpoint", ckpt, "--output_dir", out, "--scale", "2", img)
    assert "photo_mae.png" in proc.stdout
    picture = Image.open(out / "photo_mae.png")
    assert picture.size == (4 * 32 * 2, 32 * 2)
    arr = np.asarray(picture).astype(int)
    # the masked panel is grey exactly on 3 of the 4 patches (mask ratio 0.75 of a 2x2 grid)
    masked = arr[:, 64:128]
    grey_patches = sum(bool((masked[r:r + 32, c:c + 32] == 128).all()) for r in (0, 32) for c in (0, 32))
    assert grey_patches == 3
    # a reference-style checkpoint without args: the model is inferred from the weights
    bare = tmp_path / "bare.pth"
    torch.save({"model": model.state_dict()}, bare)
    args = mae_visualize.get_args_parser().parse_args(["--checkpoint", str(bare), "--output_dir", str(out), str(img)])
    mae_visualize.main(args)  # in this process: the script's path was checked above
    assert Image.open(out / "photo_mae.png").size == (128, 32)
