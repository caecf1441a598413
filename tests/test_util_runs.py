"""The run identity (util/runs.py): a folder's run is continued only by the same run, and no run writes over
another's files unless --overwrite says so. Entry points run in this process (helpers.run_entry)."""
import os

import pytest
import torch

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
import util.runs as runs
from helpers import TINY_CLS, TINY_PRETRAIN, load, one_error_line, read_log, run_entry


def snapshot(folder):
    """name -> (size, mtime) of every file in a folder: what must not change."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_settings_that_may_change_and_the_effective_batch():
    run = dict(entry="main_finetune", model="vit_tiny_patch16", blr=1e-3, lr=1.5e-5, seed=0, batch_size=4,
               accum_iter=1, world_size=2, epochs=10, num_workers=10, amp="none", output_dir="a",
               data_path="data/", drop_path=0.1)
    same = dict(run, epochs=20, num_workers=0, amp="bf16", output_dir="b", print_freq=5, data_path="./data",
                batch_size=2, accum_iter=2, world_size=2,  # 4 x 1 x 2 == 2 x 2 x 2
                vis_channels="3,2,1", nan_policy="skip", nan_max_skips=3, wandb=True, log_grad_blocks=True)
    assert runs.differences(run, same) == []
    other = dict(run, blr=2e-3, lr=3e-5, drop_path=0.2, batch_size=8)
    diffs = runs.differences(run, other)
    assert diffs[0] == "--blr 0.001 there, 0.002 here"  # the lr follows from --blr: not listed again
    assert "--drop_path 0.1 there, 0.2 here" in diffs and not any(d.startswith("--lr") for d in diffs)
    assert any(d.startswith("the effective batch size 8 (--batch_size 4 x --accum_iter 1 x 2 process(es)) there, "
                            "16 (") for d in diffs)
    # a setting only one run records (a flag added since, or a reference checkpoint's args) is not compared
    assert runs.differences({"blr": 1e-3}, {"blr": 1e-3, "new_flag": 1}) == []


def test_a_link_to_the_data_is_the_same_data_and_unread_columns_do_not_count(tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "link")
    run = dict(data_path=str(tmp_path / "data"), image_column="image", label_column="label")
    assert runs.differences(run, dict(run, data_path=str(tmp_path / "link"), image_column="img")) == []
    (tmp_path / "data" / "dataset_dict.json").write_text("{}")  # a Hugging Face dataset: its columns count
    assert runs.differences(run, dict(run, image_column="img")) == ["--image_column 'image' there, 'img' here"]


def test_entry_of_a_checkpoint_recorded_or_told_from_its_weights():
    w = torch.zeros(1)
    assert runs.entry_of({"args": {"entry": "main_linprobe"}, "model": {}}) == "main_linprobe"
    # the reference's checkpoints record no entry point: told from the weights
    assert runs.entry_of({"args": {"mask_ratio": 0.75}, "model": {"decoder_embed.weight": w}}) == "main_pretrain"
    assert runs.entry_of({"model": {"head.0.running_mean": w, "head.1.weight": w}}) == "main_linprobe"
    assert runs.entry_of({"model": {"head.weight": w}}) == "main_finetune"
    assert runs.entry_of_args({"nb_knn": [20]}) == "main_knn"


@pytest.fixture
def pretrain_dir(cls_data, tmp_path):
    """A folder holding one epoch of main_pretrain.py (the folder both reference commands default to)."""
    out = tmp_path / "output_dir"
    run_entry(main_pretrain, *TINY_PRETRAIN, "--data_path", cls_data, "--epochs", "1", "--output_dir", out,
              "--log_dir", out)
    return out


@pytest.mark.e2e
def test_another_entry_point_in_a_run_folder_is_refused_before_any_file_changes(cls_data, pretrain_dir):
    before = snapshot(pretrain_dir)
    ckpt = pretrain_dir / "checkpoint-0.pth"
    common = [*TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "1", "--output_dir", pretrain_dir,
              "--log_dir", pretrain_dir]
    for module, extra in ((main_finetune, ["--finetune", ckpt]), (main_finetune, ["--finetune", ckpt, "--no_auto_resume"]),
                          (main_linprobe, ["--finetune", ckpt])):
        proc = run_entry(module, *common, *extra, check=False)
        line = one_error_line(proc.stderr)
        assert proc.returncode == 2 and "holds an MAE pre-training run of main_pretrain.py" in line
        # --overwrite is no way out here: it would delete the checkpoint --finetune starts from
        assert "new --output_dir" in line and "--overwrite" not in line
        assert snapshot(pretrain_dir) == before
    proc = run_entry(main_finetune, *common, "--finetune", ckpt, "--overwrite", check=False)
    assert "--overwrite would delete the run in --output_dir" in one_error_line(proc.stderr)
    assert snapshot(pretrain_dir) == before
    # without --finetune: the hint for the reference's two commands in one folder, and --overwrite is offered
    line = one_error_line(run_entry(main_finetune, *common, check=False).stderr)
    assert f"--finetune {pretrain_dir / 'checkpoint-last.pth'} from a new --output_dir starts from its encoder" in line
    assert "--overwrite" in line
    # the reference's default --log_dir (./output_dir) beside a new --output_dir: refused too
    proc = run_entry(main_finetune, *common[:-4], "--finetune", ckpt, "--output_dir", pretrain_dir.parent / "ft",
                     "--log_dir", pretrain_dir, check=False)
    assert f"--log_dir {pretrain_dir} holds an MAE pre-training run" in one_error_line(proc.stderr)
    assert snapshot(pretrain_dir) == before and not (pretrain_dir.parent / "ft").exists()
    # --resume of a pre-training checkpoint in fine-tuning names --finetune
    proc = run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "1",
                     "--resume", ckpt, "--output_dir", "", check=False)
    assert f"is a checkpoint of an MAE pre-training run of main_pretrain.py, not of main_finetune.py: to start " \
           f"from its encoder, use --finetune {ckpt}" in one_error_line(proc.stderr)
    # evaluation only reads: --eval and the k-NN tool leave the run's files alone (k-NN adds its own log)
    run_entry(main_knn, *TINY_CLS[:4], "--batch_size", "8", "--num_workers", "0", "--device", "cpu",
              "--data_path", cls_data, "--finetune", ckpt, "--nb_knn", "1", "--output_dir", pretrain_dir)
    assert snapshot(pretrain_dir).items() >= before.items() and set(snapshot(pretrain_dir)) - set(before) == \
        {"knn_log.txt"}


@pytest.mark.e2e
def test_a_rerun_with_other_settings_is_refused_and_resume_continues_on_purpose(cls_data, pretrained, tmp_path):
    out = tmp_path / "ft"
    common = [*TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--finetune", pretrained, "--output_dir", out,
              "--log_dir", ""]
    run_entry(main_finetune, *common, "--epochs", "1")
    before = snapshot(out)
    for extra, named in ((["--blr", "2e-3"], "--blr 0.001 there, 0.002 here"),
                         (["--drop_path", "0.2"], "--drop_path 0.1 there, 0.2 here"),
                         (["--seed", "1"], "--seed 0 there, 1 here")):
        for epochs in ("1", "2"):  # a finished run ("Nothing to train") and one with epochs left
            proc = run_entry(main_finetune, *common, "--epochs", epochs, *extra, check=False)
            line = one_error_line(proc.stderr)
            assert proc.returncode == 2 and named in line and "Nothing to train" not in proc.stdout
            assert f"--resume {out / 'checkpoint-last.pth'} to continue that run" in line
            assert snapshot(out) == before
    # the same settings with another length, batch split and worker count: the same run, continued
    proc = run_entry(main_finetune, *common, "--epochs", "2", "--batch_size", "2", "--accum_iter", "2",
                     "--num_workers", "1")
    assert "Auto-resuming from" in proc.stdout and "Epoch: [1]" in proc.stdout and "Epoch: [0]" not in proc.stdout
    # --resume continues on purpose, with a warning naming the differences; its checkpoints record the new value
    proc = run_entry(main_finetune, *common, "--epochs", "3", "--blr", "2e-3", "--resume", out / "checkpoint-last.pth")
    assert "--blr 0.001 there, 0.002 here" in proc.stderr and "Epoch: [2]" in proc.stdout
    assert load(out / "checkpoint-last.pth")["args"]["blr"] == 2e-3 and [r["epoch"] for r in read_log(out)] == [0, 1, 2]
    # --resume from another folder would write over this one's run: refused
    other = tmp_path / "other"
    run_entry(main_finetune, *common[:-4], "--output_dir", other, "--log_dir", "", "--epochs", "1", "--blr", "3e-3")
    before = snapshot(out)
    proc = run_entry(main_finetune, *common, "--epochs", "3", "--resume", other / "checkpoint-last.pth", check=False)
    assert "continuing --resume" in one_error_line(proc.stderr) and snapshot(out) == before
    # ... but the same command run again continues its own progress there (a crash, a requeue)
    branch = [*common[:-4], "--output_dir", tmp_path / "branch", "--log_dir", "", "--blr", "3e-3", "--resume",
              other / "checkpoint-last.pth"]
    run_entry(main_finetune, *branch, "--epochs", "2", "--stop_epoch", "2")
    proc = run_entry(main_finetune, *branch, "--epochs", "3")
    assert "already holds this run" in proc.stdout and "Epoch: [2]" in proc.stdout and "Epoch: [1]" not in proc.stdout
    assert [r["epoch"] for r in read_log(tmp_path / "branch")] == [1, 2]
    # a finished run's rerun writes nothing at all
    before = snapshot(tmp_path / "branch")
    proc = run_entry(main_finetune, *branch, "--epochs", "3")
    assert "Nothing to train: 3 epoch(s) done" in proc.stdout and snapshot(tmp_path / "branch") == before


@pytest.mark.e2e
def test_overwrite_deletes_the_run_and_starts_afresh(cls_data, pretrain_dir):
    (pretrain_dir / "notes.txt").write_text("mine")
    ckpt = load(pretrain_dir / "checkpoint-0.pth")
    proc = run_entry(main_linprobe, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "1",
                     "--output_dir", pretrain_dir, "--log_dir", pretrain_dir, "--overwrite")
    assert "--overwrite: deleted" in proc.stdout
    assert load(pretrain_dir / "checkpoint-0.pth")["args"]["entry"] == "main_linprobe" != ckpt["args"]["entry"]
    assert (pretrain_dir / "notes.txt").read_text() == "mine"  # only the run's own files go
    events = [p for p in pretrain_dir.iterdir() if p.name.startswith("events.out.tfevents")]
    assert len(events) == 1  # the old run's TensorBoard events went with it


def test_a_folder_with_only_a_log_or_args_of_another_run_is_refused(cls_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text('{"epoch": 0}\n')
    proc = run_entry(main_pretrain, *TINY_PRETRAIN, "--data_path", cls_data, "--epochs", "1", "--output_dir", out,
                     "--log_dir", "", check=False)
    assert "holds a run of unknown kind (log.txt)" in one_error_line(proc.stderr)
    assert os.listdir(out) == ["log.txt"]


def test_checkpoints_are_written_with_the_umask_permissions(tmp_path):
    from util.checkpoint import atomic_save

    old = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(1)}, tmp_path / "a.pth")
        os.umask(0o077)
        atomic_save({"x": torch.zeros(1)}, tmp_path / "b.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o644  # as torch.save writes it: colleagues can read
    assert (tmp_path / "b.pth").stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "b.pth"]  # no temporary file left
