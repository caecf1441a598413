"""Bad input gets one clear line and a non-zero exit; checkpoints never run code; crashes lose nothing.

The command-line path runs in this process (same parser and cli.launch as the scripts) except where
the process itself is under test: exit codes and stderr of each script, SIGKILL, a failing DDP rank.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import main_finetune
import main_linprobe
import main_pretrain
import util.cli as cli
from conftest import make_image_folder
from util.errors import CheckpointWriteError
from helpers import ROOT, TINY_PRETRAIN, free_port, one_error_line, read_log, run_entry, run_script

TINY_CLS = ["--model", "vit_tiny_patch16", "--input_size", "32", "--batch_size", "2", "--warmup_epochs", "1",
            "--num_workers", "0", "--device", "cpu", "--output_dir", "", "--log_dir", ""]
NO_SAVE = ["--output_dir", "", "--log_dir", ""]


def run_in_process(module, argv):
    """(exit code, stderr) of the entry point's command-line path, in this process."""
    proc = run_entry(module, *argv, check=False)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    """A truncated checkpoint, a text file and a checkpoint of another architecture."""
    import models_mae
    tmp_path = tmp_path_factory.mktemp("bad_checkpoints")
    good = tmp_path / "good.pth"
    torch.save({"model": models_mae.mae_vit_tiny_patch16(img_size=32).state_dict(), "epoch": 0}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    other = tmp_path / "small.pth"
    torch.save({"model": models_mae.mae_vit_small_patch16(img_size=32).state_dict(), "epoch": 0}, other)
    return dict(good=good, truncated=truncated, text=text, other=other)


# ----------------------------------------------------------------------------
# clear errors, through the real command line (one subprocess: every script's __main__ is the same
# cli.launch line, which the in-process runs below go through too)

@pytest.mark.e2e
def test_script_exit_code_and_one_line_error(tmp_path):
    proc = run_script("main_pretrain.py", *TINY_PRETRAIN, *NO_SAVE, "--data_path", tmp_path / "nope", "--epochs", "1",
                      check=False)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert f"--data_path {tmp_path / 'nope'} does not exist" in line and "train/ and val/" in line


@pytest.mark.parametrize("module", [main_finetune, main_linprobe])
def test_classification_missing_data_path_is_one_line(module, tmp_path):
    code, err = run_in_process(module, ["--model", "vit_tiny_patch16", "--input_size", "32", "--num_workers", "0",
                                        *NO_SAVE, "--data_path", tmp_path / "nope", "--epochs", "1"])
    assert code == 2
    line = one_error_line(err)
    assert f"--data_path {tmp_path / 'nope'} does not exist" in line and "train/ and val/" in line


# ----------------------------------------------------------------------------
# clear errors, in process (same code path as the command line, faster)

@pytest.mark.parametrize("case", [
    "no_train", "empty_split", "unknown_model", "input_size", "mask_ratio_high", "mask_ratio_negative",
    "batch_size", "accum_iter", "epochs", "resume_missing", "resume_text", "resume_truncated", "resume_other_arch",
    "resume_url", "device", "num_workers", "grid_mask_odd_grid", "decoder_width", "input_size_zero",
    "accum_iter_beyond_the_epoch",
])
def test_pretrain_errors(case, image_folder, tmp_path, bad_checkpoints):
    empty = tmp_path / "empty"
    (empty / "train" / "class0").mkdir(parents=True)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    base = [*TINY_PRETRAIN, *NO_SAVE, "--epochs", "1", "--data_path", image_folder]
    argv, expected = {
        # a folder with images but no train/ pre-trains on them unlabeled (tests/test_util_sources.py); one without
        # any is an error naming both layouts
        "no_train": ([*TINY_PRETRAIN, *NO_SAVE, "--data_path", nothing], "must hold train/ (and val/) class folders"),
        "empty_split": ([*TINY_PRETRAIN, *NO_SAVE, "--data_path", empty], "no images in"),
        "unknown_model": ([*base, "--model", "mae_vit_gigantic"], "mae_vit_base_patch16, mae_vit_base_patch16_dec512d8b"),
        "input_size": ([*base, "--input_size", "40"], "--input_size 40 is not divisible by the patch size 16"),
        "mask_ratio_high": ([*base, "--mask_ratio", "1.0"], "--mask_ratio must be in [0, 1), got 1.0"),
        "mask_ratio_negative": ([*base, "--mask_ratio", "-0.1"], "--mask_ratio must be in [0, 1)"),
        "batch_size": ([*base, "--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        "accum_iter": ([*base, "--accum_iter", "0"], "--accum_iter must be at least 1"),
        "epochs": ([*base, "--epochs", "0"], "--epochs must be at least 1"),
        "resume_missing": ([*base, "--resume", tmp_path / "gone.pth"], f"checkpoint file not found: {tmp_path / 'gone.pth'}"),
        "resume_text": ([*base, "--resume", bad_checkpoints["text"]], f"cannot read checkpoint {bad_checkpoints['text']}"),
        "resume_truncated": ([*base, "--resume", bad_checkpoints["truncated"]], "not a complete PyTorch checkpoint"),
        "resume_other_arch": ([*base, "--resume", bad_checkpoints["other"]],
                              "shape mismatch (checkpoint vs model): cls_token: (1, 1, 384) vs (1, 1, 192)"),
        "resume_url": ([*base, "--resume", f"https://127.0.0.1:{free_port()}/mae_pretrain.pth"],
                       "cannot fetch checkpoint https://127.0.0.1"),
        "device": ([*base, "--device", "tpu0"], "--device tpu0 is not a device"),
        "num_workers": ([*base, "--num_workers", "-1"], "--num_workers must be 0 or more, got -1"),
        "grid_mask_odd_grid": ([*base, "--input_size", "48", "--mask_type", "grid"],
                               "cannot build --model mae_vit_tiny_patch16 with these flags: grid masking needs an even "
                               "patch grid, got 3x3: use an image size that is an even multiple of the patch size"),
        "decoder_width": ([*base, "--decoder_embed_dim", "66", "--decoder_num_heads", "2"],
                          "position table needs a width divisible by 4, got 66"),
        "input_size_zero": ([*base, "--input_size", "0"], "--input_size must be at least 1 pixel, got 0"),
        # 8 images in batches of 4: 2 per epoch, so an update every 3 would never come
        "accum_iter_beyond_the_epoch": ([*base, "--accum_iter", "3"],
                                        "--accum_iter 3 is more than the 2 batch(es) of an epoch (8 images, "
                                        "--batch_size 4 x 1 process(es)): no optimizer step would run"),
    }[case]
    code, err = run_in_process(main_pretrain, argv)
    assert code == 2
    assert expected in one_error_line(err)


@pytest.mark.parametrize("module", [main_finetune, main_linprobe])
def test_classification_errors(module, tmp_path):
    only_train = make_image_folder(tmp_path / "only_train", classes=3, per_class=2, splits=("train",))
    code, err = run_in_process(module, [*TINY_CLS, "--data_path", only_train, "--nb_classes", "3"])
    assert code == 2 and "must contain a val/ folder" in one_error_line(err)
    both = make_image_folder(tmp_path / "both", classes=3, per_class=2)
    code, err = run_in_process(module, [*TINY_CLS, "--data_path", both, "--nb_classes", "2"])
    assert code == 2
    assert "--nb_classes 2 is smaller than the 3 class folders" in one_error_line(err)
    code, err = run_in_process(module, [*TINY_CLS, "--data_path", both, "--nb_classes", "3",
                                        "--finetune", tmp_path / "none.pth"])
    assert code == 2 and f"checkpoint file not found: {tmp_path / 'none.pth'}" in one_error_line(err)
    code, err = run_in_process(module, [*TINY_CLS, "--data_path", both, "--nb_classes", "3", "--eval",
                                        "--output_dir", ""])
    assert code == 2 and "--eval needs the weights to evaluate: --resume CKPT" in one_error_line(err)


@pytest.mark.parametrize("module", [main_finetune, main_linprobe])
@pytest.mark.parametrize("val_classes", [["class0", "class2"], ["class0", "class1", "class3"]],
                         ids=["one-missing", "one-renamed"])
def test_val_with_other_class_folders_than_train_is_refused(module, val_classes, tmp_path):
    # labels are indices into each split's sorted class folders: a difference would shift every label after it
    root = make_image_folder(tmp_path / "d", classes=3, per_class=2, splits=("train",))
    for name in val_classes:
        make_image_folder(tmp_path / "v", classes=1, per_class=2, splits=("val",))
        os.rename(tmp_path / "v" / "val" / "class0", tmp_path / f"{name}")
        os.makedirs(os.path.join(root, "val"), exist_ok=True)
        os.rename(tmp_path / name, os.path.join(root, "val", name))
    odd = sorted({"class0", "class1", "class2"} ^ set(val_classes))
    for extra in ([], ["--eval", "--finetune", tmp_path / "unused.pth"]):
        code, err = run_in_process(module, [*TINY_CLS, "--data_path", root, "--nb_classes", "4", "--epochs", "1",
                                            "--output_dir", "", *extra])
        assert code == 2
        assert f"train/ and val/ hold different class folders ({', '.join(odd)})" in one_error_line(err)


def test_unknown_randaugment_section_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=2)
    code, err = run_in_process(main_finetune, [*TINY_CLS, "--data_path", root, "--nb_classes", "2", "--aa",
                                               "rand-bogus", "--output_dir", ""])
    assert code == 2 and "--aa rand-bogus: section 'bogus' is not a setting timm reads" in one_error_line(err)


# ----------------------------------------------------------------------------
# corrupt images

@pytest.fixture
def corrupt_folder(tmp_path):
    root = make_image_folder(tmp_path / "corrupt", classes=2, per_class=4)
    bad = os.path.join(root, "train", "class1", "2.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not really a png")
    return root, bad


@pytest.mark.e2e
def test_corrupt_image_is_skipped_with_a_warning(corrupt_folder, tmp_path):
    root, bad = corrupt_folder
    out = tmp_path / "out"
    proc = run_script("main_pretrain.py", *TINY_PRETRAIN, "--batch_size", "2", "--num_workers", "2",
                      "--data_path", root, "--epochs", "2", "--output_dir", out, "--log_dir", out)
    assert proc.stderr.count(f"skipping unreadable image {bad}") == 1  # once per file, across workers
    assert "epoch 0: 1 unreadable training image(s) skipped" in proc.stderr
    assert [r["epoch"] for r in read_log(out)] == [0, 1]


def test_strict_data_stops_at_the_bad_file(corrupt_folder):
    root, bad = corrupt_folder
    # the error is raised in a loader worker and re-raised here: still one line naming the file
    proc = run_entry(main_pretrain, *TINY_PRETRAIN, *NO_SAVE, "--batch_size", "2", "--num_workers", "1",
                     "--data_path", root, "--epochs", "1", "--strict_data", check=False)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert line.startswith(f"error: cannot read image {bad}")


@pytest.mark.e2e
def test_failing_rank_fails_the_whole_ddp_job(corrupt_folder):
    root, bad = corrupt_folder
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(ROOT, "main_pretrain.py"), *TINY_PRETRAIN, *NO_SAVE,
           "--batch_size", "2", "--data_path", root, "--epochs", "1", "--strict_data", "--dist_timeout", "1"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert f"cannot read image {bad}" in proc.stderr
    assert time.time() - start < 200


# ----------------------------------------------------------------------------
# checkpoints never execute code

class _Payload:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("flag,module", [("--resume", main_pretrain), ("--finetune", main_finetune)])
def test_pickled_payload_is_refused(flag, module, image_folder, tmp_path):
    marker = tmp_path / "created_by_payload"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "epoch": 0, "args": _Payload(marker)}, evil)
    if module is main_pretrain:
        argv = [*TINY_PRETRAIN, *NO_SAVE, "--data_path", image_folder, "--epochs", "1", flag, evil]
    else:
        argv = [*TINY_CLS, "--data_path", image_folder, "--nb_classes", "2", "--epochs", "1", flag, evil]
    code, err = run_in_process(module, argv)
    assert code == 2
    line = one_error_line(err)
    assert f"refusing to load {evil}" in line and "could run code" in line
    assert not marker.exists()


# ----------------------------------------------------------------------------
# nothing lost

def test_nonfinite_loss_exits_1_and_keeps_checkpoints(image_folder, tmp_path):
    out = tmp_path / "out"
    common = [*TINY_PRETRAIN, "--data_path", image_folder, "--output_dir", out, "--log_dir", "", "--amp", "none"]
    run_entry(main_pretrain, *common, "--epochs", "1")
    before = (out / "checkpoint-last.pth").read_bytes()
    # another --lr is another run: continued on purpose with --resume (auto-resume refuses it)
    proc = run_entry(main_pretrain, *common, "--epochs", "3", "--lr", "1e30", "--resume", out / "checkpoint-last.pth",
                     check=False)
    assert proc.returncode == 1 and "--lr 1.5625e-05 there, 1e+30 here" in proc.stderr
    line = one_error_line(proc.stderr)
    assert "loss is nan at epoch 1, step" in line and "lr" in line
    assert (out / "checkpoint-last.pth").read_bytes() == before
    assert [r["epoch"] for r in read_log(out)] == [0]


@pytest.mark.e2e
def test_sigkill_mid_epoch_then_rerun_loses_and_repeats_nothing(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=8, size=32)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "main_pretrain.py"), *TINY_PRETRAIN, "--batch_size", "2",
           "--print_freq", "1", "--data_path", data, "--epochs", "4", "--output_dir", str(out), "--log_dir", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in proc.stdout:  # kill in the middle of epoch 2
            if line.startswith("Epoch: [2]  [3/8]"):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 1

    done = run_entry(main_pretrain, *cmd[2:])
    assert "Auto-resuming" in done.stdout and "Epoch: [2]" in done.stdout and "Epoch: [1]" not in done.stdout
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2, 3]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 3
    assert sorted(p for p in os.listdir(out) if p.endswith(".pth")) == [
        "checkpoint-0.pth", "checkpoint-3.pth", "checkpoint-last.pth"]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_crash_while_saving_keeps_previous_checkpoint(image_folder, tmp_path, monkeypatch):
    import util.checkpoint as ckpt_lib
    out = tmp_path / "out"
    args = main_pretrain.get_args_parser().parse_args(
        [*TINY_PRETRAIN, "--data_path", image_folder, "--epochs", "1", "--output_dir", str(out), "--log_dir", ""])
    assert cli.launch(main_pretrain.main, args) == 0
    good = torch.load(out / "checkpoint-last.pth", weights_only=True)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_lib.torch, "save", broken_save)
    args = main_pretrain.get_args_parser().parse_args(
        [*TINY_PRETRAIN, "--data_path", image_folder, "--epochs", "2", "--output_dir", str(out), "--log_dir", ""])
    with pytest.raises(CheckpointWriteError, match="disk full") as e:
        main_pretrain.main(args)
    assert f"cannot write checkpoint {out / 'checkpoint-last.pth'}" in str(e.value)
    monkeypatch.undo()
    again = ckpt_lib.load_checkpoint(str(out / "checkpoint-last.pth"))
    assert again["epoch"] == good["epoch"] == 0
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
