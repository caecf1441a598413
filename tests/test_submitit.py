"""The submitit launchers: flags, a local CPU job, and a requeue that resumes."""
import json
import os

import pytest
import torch

import submitit_finetune
import submitit_linprobe
import submitit_pretrain
from helpers import read_log

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
            "--data_path", data, "--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size", "4",
            "--warmup_epochs", "1", "--num_workers", "0", "--timeout", "10", *extra]


@pytest.mark.e2e
def test_local_job_then_requeue_resumes_from_newest(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job_dir = str(tmp_path / "jobs" / "%j")
    # a first job that stops after epoch 0 of 3 (as if its time ran out)
    job = submitit_pretrain.main(_tiny(job_dir, image_folder, "--epochs", "3", "--stop_epoch", "1"))
    job.result()
    out = tmp_path / "jobs" / str(job.job_id)
    assert {"checkpoint-0.pth", "checkpoint-last.pth", "log.txt"} <= set(os.listdir(out))
    assert [r["epoch"] for r in read_log(out)] == [0]
    assert (out / f"{job.job_id}_0_log.out").exists()

    # what submitit does on timeout: call checkpoint() on the job's trainer (its args resolved in the job)
    args = submitit_pretrain.parse_args(_tiny(job_dir, image_folder, "--epochs", "3"))
    args.output_dir = str(out)
    args.job_dir = job_dir
    args.resume = str(out / "checkpoint-0.pth")  # even an explicit older --resume gives way to the newest
    torch.save(torch.load(out / "checkpoint-last.pth", weights_only=True), out / "checkpoint-last.pth")
    delayed = submitit_pretrain.Trainer(args).checkpoint()
    trainer = delayed.function
    assert isinstance(trainer, submitit_pretrain.Trainer)
    assert trainer.args.resume == str(out / "checkpoint-last.pth")
    assert trainer.args.dist_url.startswith("file://")

    # run the requeued trainer as a new job: it continues at epoch 1
    import submitit
    executor = submitit.AutoExecutor(folder=str(tmp_path / "requeue"), cluster="local")
    executor.update_parameters(timeout_min=10, tasks_per_node=1, nodes=1, gpus_per_node=0)
    job2 = executor.submit(trainer)
    job2.result()
    log_out = open(job2.paths.stdout).read()
    assert f"Resume checkpoint {out / 'checkpoint-last.pth'}" in log_out
    assert "Epoch: [1]" in log_out and "Epoch: [0]" not in log_out
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 2
    with open(out / "args.json") as f:
        assert json.load(f)["resume"] == str(out / "checkpoint-last.pth")
