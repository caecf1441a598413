"""--online_probe (util/online_probe.py): the probe learns from detached features (the MAE trains bitwise as without
it), logs its accuracies, and resumes exactly with the run (at an epoch boundary and mid-epoch)."""
import argparse
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain
import models_mae
from engine_pretrain import train_one_epoch
from helpers import TINY_PRETRAIN, load, read_log, run_entry
from util.datasets import ImageFolder
from util.online_probe import OnlineProbe
from util.precision import NativeScalerWithGradNormCount

COMMON = [*TINY_PRETRAIN, "--batch_size", "2", "--amp", "none", "--log_dir", "", "--online_probe"]


def _mae_epoch(batches, probe=None):
    torch.manual_seed(0)
    mae = models_mae.create_model("mae_vit_tiny_patch16", img_size=32)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    if probe is not None:
        probe.attach(mae)
    args = argparse.Namespace(accum_iter=1, mask_ratio=0.75, lr=1e-3, min_lr=0.0, warmup_epochs=0, epochs=1,
                              amp="none", print_freq=10)
    torch.manual_seed(1)
    stats = train_one_epoch(mae, batches, optimizer, torch.device("cpu"), 0,
                            NativeScalerWithGradNormCount("cpu", enabled=False), args=args, probe=probe)
    return mae, stats


def test_the_probe_learns_without_touching_the_encoder():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 1])) for _ in range(3)]
    plain, _ = _mae_epoch(batches)
    probe = OnlineProbe(192, 3)
    before = probe.head.weight.detach().clone()
    probed, stats = _mae_epoch(batches, probe)
    # the MAE's weights after three steps are bit for bit those of the run without a probe
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), probed.state_dict().values()))
    assert not torch.equal(probe.head.weight, before) and 0 <= stats["probe_acc1"] <= 100
    # its features were detached: the probe's backward left no gradient in the encoder
    mae = models_mae.create_model("mae_vit_tiny_patch16", img_size=32)
    probe = OnlineProbe(192, 3).attach(mae)
    mae(batches[0][0], mask_ratio=0.75)
    probe.train_step(batches[0][1])
    assert all(p.grad is None for p in mae.parameters())


@pytest.mark.e2e
def test_the_probe_resumes_exactly_with_the_run(image_folder, tmp_path, monkeypatch):
    args = [*COMMON, "--epochs", "2", "--data_path", image_folder]
    run_entry(main_pretrain, *args, "--output_dir", tmp_path / "whole")
    rows = read_log(tmp_path / "whole")
    assert all(0 <= r["train_probe_acc1"] <= 100 and 0 <= r["probe_val_acc1"] <= 100 for r in rows)
    real, count = ImageFolder.__getitem__, [0]

    def getitem(self, index):  # a stop signal in the middle of epoch 1 (training images only)
        if self.root.endswith("train"):
            count[0] += 1
            if count[0] == len(self) + len(self) // 2 + 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(self, index)

    monkeypatch.setattr(ImageFolder, "__getitem__", getitem)
    out = tmp_path / "out"
    assert run_entry(main_pretrain, *args, "--output_dir", out, check=False).returncode == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert "Continuing epoch 1 at step" in run_entry(main_pretrain, *args, "--output_dir", out).stdout
    a, b = load(tmp_path / "whole" / "checkpoint-last.pth"), load(out / "checkpoint-last.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    pa, pb = a["online_probe"]["model"], b["online_probe"]["model"]
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert read_log(tmp_path / "whole") == read_log(out)  # the probe's accuracies too


def test_unlabeled_data_is_one_line(tmp_path):
    (tmp_path / "photos").mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    proc = run_entry(main_pretrain, *COMMON, "--epochs", "1", "--data_path", tmp_path / "photos", "--output_dir", "",
                     check=False)
    assert proc.returncode == 2 and "--online_probe needs labelled images" in proc.stderr
