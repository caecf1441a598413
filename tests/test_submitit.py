"""The submitit launchers: flags, and a local CPU job that a signal requeues and that resumes mid-epoch."""
import os
import re
import signal
import time

import pytest
import torch

import submitit_finetune
import submitit_linprobe
import submitit_pretrain
from conftest import make_image_folder
from helpers import read_log
from util.checkpoint import atomic_save

LAUNCHER_FLAGS = ["--ngpus", "--nodes", "--timeout", "--job_dir", "--partition", "--use_volta32", "--comment",
                  "--cluster"]


@pytest.mark.parametrize("module", [submitit_pretrain, submitit_finetune, submitit_linprobe])
def test_help_lists_launcher_flags(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in LAUNCHER_FLAGS + ["--batch_size", "--resume"]:
        assert flag in out
    args = module.parse_args([])
    assert (args.ngpus, args.nodes, args.timeout, args.job_dir, args.partition, args.use_volta32,
            args.comment) == (8, 2, 4320, "", "learnfair", False, "")


def _tiny(job_dir, data, *extra):
    return ["--cluster", "local", "--ngpus", "1", "--nodes", "1", "--device", "cpu", "--job_dir", job_dir,
            "--data_path", data, "--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size", "2",
            "--warmup_epochs", "1", "--num_workers", "0", "--timeout", "10", "--print_freq", "1", *extra]


def _children(pid):
    """Process ids whose parent is pid (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.e2e
def test_signal_requeues_the_job_and_it_resumes_mid_epoch(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=12, size=32)  # 12 steps per epoch
    monkeypatch.chdir(tmp_path)
    job = submitit_pretrain.main(_tiny(str(tmp_path / "jobs" / "%j"), data, "--epochs", "2"))
    deadline = time.time() + 180
    while "Epoch: [1]  [ 3/12]" not in (job.paths.stdout.read_text() if job.paths.stdout.exists() else ""):
        assert time.time() < deadline and job.get_info()["jobState"] == "RUNNING", "the job never got to epoch 1"
        time.sleep(0.1)
    # what SLURM sends before the time limit (--signal USR2@120): submitit's requeue signal
    (task,) = _children(job._process.pid)
    os.kill(task, signal.SIGUSR2)
    job.result()  # the local controller restarts the task that asked to be requeued; wait for it to finish

    out = tmp_path / "jobs" / str(job.job_id)
    stdout = job.paths.stdout.read_text()
    assert "received SIGUSR2" in stdout and f"Resume checkpoint {out / 'checkpoint-last.pth'}" in stdout
    step = int(re.search(r"Continuing epoch 1 at step (\d+)", stdout).group(1))
    assert 4 <= step < 12
    assert f"Epoch: [1]  [{step:2d}/12]" in stdout.split("Continuing epoch 1")[1]  # not from its beginning
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "jobs" / "%j").exists()  # no empty folder named after the pattern itself


def test_requeue_resumes_from_the_newest_checkpoint(tmp_path):
    out = tmp_path / "out"
    for epoch, name in ((0, "checkpoint-0.pth"), (3, "checkpoint-last.pth")):
        atomic_save({"epoch": epoch, "model": {}}, out / name)
    args = submitit_pretrain.parse_args(["--job_dir", str(tmp_path / "jobs" / "%j"), "--data_path", "unused"])
    args.output_dir = str(out)
    args.resume = str(out / "checkpoint-0.pth")  # even an explicit older --resume gives way to the newest
    delayed = submitit_pretrain.Trainer(args).checkpoint()
    trainer = delayed.function
    assert isinstance(trainer, submitit_pretrain.Trainer)
    assert trainer.args.resume == str(out / "checkpoint-last.pth")
    assert trainer.args.dist_url.startswith("file://")
