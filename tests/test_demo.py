"""demo/: the digits writer of the quickstart and the reconstruction visualizer."""
import json
import os
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
import models_mae
from helpers import ROOT, run_entry, run_script
from util.visualize import draw_reconstructions

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
    proc = run_entry(mae_visualize, "--checkpoint", ckpt, "--output_dir", out, "--scale", "2", img)
    assert "photo_mae.png" in proc.stdout
    assert "original | masked 75% | reconstruction | reconstruction + visible" in proc.stdout
    arr = np.asarray(Image.open(out / "photo_mae.png")).astype(int)
    # one titled row of four 64-px cells: the layout draw_reconstructions gives any such panels
    layout = draw_reconstructions(torch.zeros(1, 4, 3, 32, 32), 0.75, scale=2)
    assert arr.shape == layout.pixels.shape and len(layout.cells) == 1
    top, left, bottom, right = layout.cells[0][1]
    # the masked cell is magenta exactly on 3 of the 4 patches (mask ratio 0.75 of a 2x2 grid)
    masked = arr[top:bottom, left:right]
    removed = [bool((masked[r:r + 32, c:c + 32] == (255, 0, 255)).all()) for r in (0, 32) for c in (0, 32)]
    assert sum(removed) == 3 and ((masked == (255, 0, 255)).all(axis=2).sum() == 3 * 32 * 32)
    # a reference-style checkpoint without args: the model is inferred from the weights; cells of 128 px
    bare = tmp_path / "bare.pth"
    torch.save({"model": model.state_dict()}, bare)
    args = mae_visualize.get_args_parser().parse_args(["--checkpoint", str(bare), "--output_dir", str(out), str(img)])
    mae_visualize.main(args)  # in this process: the script's path was checked above
    layout = draw_reconstructions(torch.zeros(1, 4, 3, 32, 32), 0.75)
    assert layout.scale == 4 and np.asarray(Image.open(out / "photo_mae.png")).shape == layout.pixels.shape


def _digit_like_folder(root, per_class=2):
    """10 class folders named 0-9 of grey 32-px images (the quickstart's layout, a few images each)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 1)):
        for d in range(10):
            os.makedirs(root / split / str(d))
            for i in range(n):
                grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
                Image.fromarray(grey, mode="L").convert("RGB").save(root / split / str(d) / f"{i}.png")
    return str(root)


def test_quickstart_stages_run_through_the_entry_points_and_are_summarised(tmp_path, capsys):
    data = _digit_like_folder(tmp_path / "data")
    out = tmp_path / "qs"
    args = quickstart.get_args_parser().parse_args(
        ["--output_dir", str(out), "--pretrain_epochs", "2", "--linprobe_epochs", "1", "--finetune_epochs", "1"])
    stages = quickstart.build_stages(args, data, str(out))
    assert list(stages) == ["pretrain", "linprobe_mae", "linprobe_random", "knn_mae", "knn_random",
                            "finetune_mae", "finetune_scratch"]

    def recipe(name):  # the flags without the initialisation and the output folders
        flags = [str(f) for f in stages[name][1]]
        for flag in ("--finetune", "--output_dir", "--log_dir"):
            if flag in flags:
                i = flags.index(flag)
                del flags[i:i + 2]
        return flags

    # compared runs share their recipe; the digits are never flipped
    assert recipe("finetune_mae") == recipe("finetune_scratch") and "--finetune" not in stages["finetune_scratch"][1]
    assert recipe("linprobe_mae") == recipe("linprobe_random") and recipe("knn_mae") == recipe("knn_random")
    for name in ("pretrain", "linprobe_mae", "finetune_mae"):
        flags = [str(f) for f in stages[name][1]]
        assert flags[flags.index("--hflip") + 1] == "0"
    modules = {"main_pretrain.py": main_pretrain, "main_linprobe.py": main_linprobe, "main_knn.py": main_knn,
               "main_finetune.py": main_finetune}
    small = ["--batch_size", 4, "--num_workers", 0]  # the last value of a flag wins: few images here
    for name, (script, flags, stage_dir, epochs) in stages.items():
        run_entry(modules[script], *flags, *small)
        assert len(quickstart.read_log(stage_dir, "log.txt" if epochs else "knn_log.txt")) == (epochs or 1)

    seconds = {name: 1.0 for name in stages}
    summary = quickstart.finish(str(out), data, seconds, {"train": 20, "val": 10}, 32, time.time() - 5)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    pre = quickstart.read_log(str(out / "pretrain"))
    assert summary["pretrain_loss"] == [round(e["train_loss"], 4) for e in pre] and len(pre) == 2
    assert summary["pretrain_loss_first"] == pre[0]["train_loss"]
    assert summary["finetune_acc1_scratch"] == quickstart.read_log(str(out / "finetune_scratch"))[-1]["test_acc1"]
    assert summary["knn_acc1_mae"] == quickstart.read_log(str(out / "knn_mae"), "knn_log.txt")[-1]["20nn_top1"]
    for key in ("linprobe_acc1_mae", "linprobe_acc1_random", "knn_acc1_random", "finetune_acc1_mae"):
        assert 0 <= summary[key] <= 100
    assert set(summary["meaning"]) == {"pretrain_loss", "linprobe_acc1", "knn_acc1", "finetune_acc1"}
    assert summary["seconds_total"] >= 5
    # the picture: one grey row per digit, four titled panels of 32 px enlarged 4x, removed patches magenta
    picture = np.asarray(Image.open(out / "reconstruction.png")).astype(int)
    layout = draw_reconstructions(torch.zeros(10, 4, 3, 32, 32), 0.75, scale=4)
    assert picture.shape == layout.pixels.shape and len(layout.cells) == 10
    magenta = (picture == (255, 0, 255)).all(axis=2)
    assert magenta.sum() == 10 * 48 * 16 * 16  # 48 of the 64 4-px patches of every digit, enlarged 4x
    grey = picture[~magenta]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    # the loss plot: 480x300 RGB, with its curve in matplotlib's first colour (tab:blue, #1f77b4)
    plot = np.asarray(Image.open(out / "loss.png")).astype(int)
    assert plot.shape == (300, 480, 3) and (np.abs(plot - (31, 119, 180)).max(axis=2) <= 8).sum() > 100
    table = capsys.readouterr().out
    assert "finetune_scratch" in table and "knn_random" in table


def test_quickstart_progress_lines_and_a_failed_stage(tmp_path, capsys):
    assert quickstart.progress_line("pretrain", 0, 10, 0.4) == "[pretrain] epoch 0/10, 0 s elapsed, ETA -"
    assert quickstart.progress_line("pretrain", 4, 10, 20.0) == "[pretrain] epoch 4/10, 20 s elapsed, ETA 30 s"
    stage_dir = tmp_path / "stage"
    fake = tmp_path / "fake_entry.py"  # writes an epoch line to log.txt every 0.2 s, then fails if told to
    fake.write_text("import json, os, sys, time\n"
                    f"os.makedirs({str(stage_dir)!r}, exist_ok=True)\n"
                    "for e in range(3):\n"
                    "    time.sleep(0.2)\n"
                    f"    open(os.path.join({str(stage_dir)!r}, 'log.txt'), 'a').write(json.dumps({{'epoch': e}}) + '\\n')\n"
                    "sys.exit(int(sys.argv[1]))\n")
    with open(tmp_path / "commands.txt", "w") as log_file:
        quickstart.run_stage("fake", str(fake), [0], str(stage_dir), 3, log_file)
        lines = capsys.readouterr().out.splitlines()
        assert lines[-1].startswith("[fake] done in")
        assert lines[-2].startswith("[fake] epoch 3/3, ")  # the last epoch is shown even when it ends the run
        os.remove(stage_dir / "log.txt")
        with pytest.raises(SystemExit, match="stage fake failed \\(exit 3\\); see .*fake.log"):
            quickstart.run_stage("fake", str(fake), [3], str(stage_dir), 3, log_file)
    assert "fake_entry.py 0" in (tmp_path / "commands.txt").read_text()
