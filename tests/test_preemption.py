"""A stop signal costs one optimizer step, not an epoch; --save_every_minutes bounds what a hard kill loses;
changed data and a full disk are handled. Final weights are compared bitwise with uninterrupted runs."""
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

import main_finetune
import main_pretrain
import util.datasets as datasets
import util.preemption as preemption
import util.runner as runner
from conftest import make_image_folder
from helpers import ROOT, TINY_CLS, TINY_PRETRAIN, free_port, load, read_log, run_entry

# 48 images, batch 2: 24 steps per epoch (12 per process with two)
COMMON = [*TINY_PRETRAIN, "--batch_size", "2", "--amp", "none", "--log_dir", ""]


@pytest.fixture(scope="module")
def data48(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("pre") / "data", classes=2, per_class=24, size=32)


def _read_hook(monkeypatch, at_sample, action):
    """Call action() when the loader reads its at_sample-th image (counting from 1) in this process."""
    real = datasets.ImageFolder.__getitem__
    count = [0]

    def getitem(self, index):
        count[0] += 1
        if count[0] == at_sample:
            action()
        return real(self, index)

    monkeypatch.setattr(datasets.ImageFolder, "__getitem__", getitem)


def _send(signum):
    return lambda: os.kill(os.getpid(), signum)


def _assert_same_run(a, b):
    wa, wb = load(a / "checkpoint-last.pth"), load(b / "checkpoint-last.pth")
    assert wa["epoch"] == wb["epoch"]
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    assert read_log(a) == read_log(b)  # each epoch once, with the same epoch averages


@pytest.fixture(scope="module")
def uninterrupted(data48, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    run_entry(main_pretrain, *COMMON, "--epochs", "3", "--data_path", data48, "--output_dir", out)
    return out


@pytest.mark.e2e
def test_signal_mid_epoch_costs_one_step_and_rerun_is_bitwise_uninterrupted(data48, uninterrupted, tmp_path,
                                                                            monkeypatch):
    signum = signal.SIGTERM
    out = tmp_path / "out"
    args = [*COMMON, "--epochs", "3", "--data_path", data48, "--output_dir", out]
    _read_hook(monkeypatch, 24 * 2 + 5 * 2 + 1, _send(signum))  # while loading the batch of epoch 1, step 5
    proc = run_entry(main_pretrain, *args, check=False)
    assert proc.returncode == 128 + signum
    line = proc.stderr.strip().splitlines()[-1]
    assert f"stopped by {signal.Signals(signum).name} at epoch 1, step 6" in line and "same command" in line
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 0  # the last finished epoch, as other tools read it
    position = ckpt["position"]
    assert (position["epoch"], position["step"], position["batch_size"], position["accum_iter"]) == (1, 6, 2, 1)
    assert sorted(position["order"][0].tolist()) == list(range(48))  # the epoch's whole sample order
    assert [r["epoch"] for r in read_log(out)] == [0]

    monkeypatch.undo()
    proc = run_entry(main_pretrain, *args)
    assert "Continuing epoch 1 at step 6" in proc.stdout and "Epoch: [1]  [ 6/24]" in proc.stdout
    assert "Epoch: [1]  [ 4/24]" not in proc.stdout and "Epoch: [0]" not in proc.stdout
    _assert_same_run(uninterrupted, out)


@pytest.mark.e2e
def test_finetuning_resumes_mid_epoch_bitwise_too(cls_data, pretrained, tmp_path, monkeypatch):
    # RandAugment, random erasing and mixup draw from python, numpy and torch: all three states come back
    args = [*TINY_CLS, "--batch_size", "2", "--amp", "none", "--epochs", "2", "--data_path", cls_data,
            "--nb_classes", "3", "--finetune", pretrained, "--mixup", "0.8", "--log_dir", ""]
    whole, out = tmp_path / "whole", tmp_path / "out"
    run_entry(main_finetune, *args, "--output_dir", whole)
    _read_hook(monkeypatch, 12 + 7 + 2 * 2 + 1, _send(signal.SIGTERM))  # epoch 0: 12 train + 7 val images
    assert run_entry(main_finetune, *args, "--output_dir", out, check=False).returncode == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert "Continuing epoch 1 at step 3" in run_entry(main_finetune, *args, "--output_dir", out).stdout
    _assert_same_run(whole, out)


@pytest.mark.e2e
def test_accum_iter_stops_on_an_optimizer_step_boundary(data48, tmp_path, monkeypatch):
    args = [*COMMON, "--epochs", "2", "--accum_iter", "2", "--data_path", data48]
    whole, out = tmp_path / "whole", tmp_path / "out"
    run_entry(main_pretrain, *args, "--output_dir", whole)
    _read_hook(monkeypatch, 24 * 2 + 4 * 2 + 1, _send(signal.SIGTERM))  # micro-step 4: no optimizer step yet
    proc = run_entry(main_pretrain, *args, "--output_dir", out, check=False)
    assert proc.returncode == 128 + signal.SIGTERM
    assert load(out / "checkpoint-last.pth")["position"]["step"] == 6  # finished micro-step 5, then stopped
    monkeypatch.undo()
    run_entry(main_pretrain, *args, "--output_dir", out)
    _assert_same_run(whole, out)


@pytest.mark.e2e
def test_save_every_minutes_writes_positions_at_the_cadence(data48, tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])

    def tick():  # every image read takes 5 s of (fake) training time: 10 s per step
        clock[0] += 5.0

    real = datasets.ImageFolder.__getitem__
    monkeypatch.setattr(datasets.ImageFolder, "__getitem__", lambda self, i: (tick(), real(self, i))[1])
    saves = []
    real_save = runner.save_position

    def spy(args, epoch, step, *rest):
        saves.append((epoch, step))
        real_save(args, epoch, step, *rest)
        if len(saves) == 3:  # a hard kill right after the third save
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_position", spy)
    out = tmp_path / "out"
    args = [*COMMON, "--epochs", "1", "--data_path", data48, "--output_dir", out, "--save_every_minutes", "0.5"]
    assert run_entry(main_pretrain, *args, check=False).returncode == 130
    assert saves == [(0, 3), (0, 6), (0, 9)]  # every 30 s = every 3 steps
    proc = run_entry(main_pretrain, *args)  # loses only what came after the last save
    assert "Continuing epoch 0 at step 9" in proc.stdout
    assert saves[3:] == [(0, 12), (0, 15), (0, 18), (0, 21), (0, 24)]
    assert [r["epoch"] for r in read_log(out)] == [0]


@pytest.mark.e2e
@pytest.mark.parametrize("change", ["data", "batch_size"])
def test_changed_data_or_batch_restarts_the_stopped_epoch(change, tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=24, size=32)
    out = tmp_path / "out"
    args = [*COMMON, "--epochs", "2", "--data_path", data, "--output_dir", out]
    _read_hook(monkeypatch, 24 * 2 + 3 * 2 + 1, _send(signal.SIGTERM))
    assert run_entry(main_pretrain, *args, check=False).returncode == 128 + signal.SIGTERM
    monkeypatch.undo()
    if change == "data":  # images added: a stale order would index the wrong files
        make_image_folder(tmp_path / "more", classes=1, per_class=2, size=32, splits=("train",), seed=5)
        for name in os.listdir(tmp_path / "more" / "train" / "class0"):
            os.rename(tmp_path / "more" / "train" / "class0" / name,
                      tmp_path / "data" / "train" / "class0" / f"new{name}")
        expected, first_line = "the training set (images added, removed or renamed)", "Epoch: [1]  [ 0/25]"
    else:  # another split of the same effective batch: the saved step would point elsewhere in the order
        args += ["--batch_size", "1", "--accum_iter", "2"]
        expected, first_line = "--batch_size (2 -> 1) and --accum_iter (1 -> 2)", "Epoch: [1]  [ 0/48]"
    proc = run_entry(main_pretrain, *args)
    assert f"{expected} changed since: restarting epoch 1 from its beginning" in proc.stderr
    assert first_line in proc.stdout
    assert [r["epoch"] for r in read_log(out)] == [0, 1]


@pytest.mark.e2e
def test_full_disk_is_one_line_and_keeps_the_previous_checkpoints(data48, tmp_path):
    out = tmp_path / "out"
    args = [*COMMON, "--data_path", data48, "--output_dir", out]
    run_entry(main_pretrain, *args, "--epochs", "1")
    before = (out / "checkpoint-last.pth").read_bytes()

    # any file this process writes stops growing at 1 MB (Python ignores SIGXFSZ: a write past it raises EFBIG)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, hard))
    try:
        proc = run_entry(main_pretrain, *args, "--epochs", "2", check=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert f"cannot write checkpoint {out / 'checkpoint-last.pth'}" in errors[0] and "File too large" in errors[0]
    assert (out / "checkpoint-last.pth").read_bytes() == before
    assert load(out / "checkpoint-0.pth")["epoch"] == 0
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


@pytest.mark.e2e
def test_signal_to_torchrun_stops_both_ranks_on_one_step_and_resumes_bitwise(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=12, size=32)  # 6 steps of 2 x 2 images
    base = [*COMMON, "--epochs", "1", "--data_path", data]
    whole, out = tmp_path / "whole", tmp_path / "out"

    def torchrun(output_dir, stop_at=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), os.path.join(ROOT, "main_pretrain.py"),
               *map(str, base), "--print_freq", "1", "--output_dir", str(output_dir)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if stop_at and line.startswith(stop_at):
                proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
                stop_at = None
        proc.wait(timeout=240)
        return proc.returncode, "".join(lines), proc.stderr.read()

    code, stdout, err = torchrun(whole)
    assert code == 0, err[-3000:]
    assert "effective batch size: 4" in stdout and len(load(whole / "checkpoint-last.pth")["rng"]) == 2
    code, stdout, _ = torchrun(out, stop_at="Epoch: [0]  [1/6]")
    assert code != 0 and stdout.count("received SIGTERM") == 2
    position = load(out / "checkpoint-last.pth")["position"]
    assert position["epoch"] == 0 and 2 <= position["step"] < 6 and position["world_size"] == 2
    code, stdout, err = torchrun(out)
    assert code == 0, err[-3000:]
    assert f"Continuing epoch 0 at step {position['step']}" in stdout
    _assert_same_run(whole, out)


# ----------------------------------------------------------------------------
# the guard itself

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_guard_notes_a_signal_and_puts_the_handlers_back(signum):
    before = signal.getsignal(signum)
    with preemption.StopGuard() as guard:
        assert guard.poll() == (0, False)
        os.kill(os.getpid(), signum)  # noted, not acted on: the process goes on
        assert guard.poll() == (signum, False)
    assert signal.getsignal(signum) is before


def test_any_stop_signal_ends_in_the_requeue_handler_then_stops():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))  # as submitit's requeue handler
    try:
        with preemption.StopGuard() as guard:
            os.kill(os.getpid(), signal.SIGTERM)  # SLURM's pre-emption signal
            with pytest.raises(preemption.Preempted) as e:
                guard.stop(guard.poll()[0], epoch=3, step=7)
        assert seen == [signal.SIGUSR2] and e.value.exit_code == 128 + signal.SIGTERM
        assert "stopped by SIGTERM at epoch 3, step 7" in str(e.value)
    finally:
        signal.signal(signal.SIGUSR2, previous)
