"""Tests for util.resume: save_model / load_model, where a rerun continues, per-epoch files, the log."""
import argparse
import json
import os
from pathlib import Path

import torch

import util.resume as resume
from helpers import tiny_net as _tiny_net
from helpers import trained_optimizer as _trained_optimizer
from util.checkpoint import atomic_save
from util.precision import NativeScalerWithGradNormCount


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), resume="", eval=False, start_epoch=0,
                lr=0.1, model="tiny", input_size=(32, 32), data_path=Path("/data"))
    base.update(kw)
    return argparse.Namespace(**base)


# ----------------------------------------------------------------------------
# save_model / load_model


def test_save_model_load_model_round_trip(tmp_path):
    model = _tiny_net(0)
    opt = _trained_optimizer(model)
    scaler = NativeScalerWithGradNormCount("cpu", enabled=False)
    args = _args(tmp_path)
    path = resume.save_model(args, 5, model, model, opt, scaler)
    assert Path(path) == Path(args.output_dir) / "checkpoint-5.pth" and Path(path).is_file()

    raw = torch.load(path, weights_only=True)  # a plain, safely loadable file
    assert set(raw) >= {"model", "optimizer", "epoch", "scaler", "args"}
    assert raw["epoch"] == 5
    assert raw["args"]["lr"] == 0.1 and raw["args"]["data_path"] == "/data"
    assert raw["args"]["input_size"] == [32, 32]

    model2 = _tiny_net(1)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5, betas=(0.9, 0.95))
    args2 = _args(tmp_path, resume=str(path))
    loaded = resume.load_model(args2, model2, opt2, NativeScalerWithGradNormCount("cpu", enabled=False))
    assert loaded["epoch"] == 5
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert args2.start_epoch == 6
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 0.01
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(s1["state"][k][name], s2["state"][k][name], rtol=0, atol=0)


def test_load_model_eval_leaves_optimizer_and_start_epoch(tmp_path):
    model = _tiny_net(0)
    opt = _trained_optimizer(model)
    path = resume.save_model(_args(tmp_path), 3, model, model, opt, None)
    model2 = _tiny_net(1)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    args2 = _args(tmp_path, resume=str(path), eval=True, start_epoch=0)
    resume.load_model(args2, model2, opt2, None)
    torch.testing.assert_close(model2[0].weight, model[0].weight, rtol=0, atol=0)
    assert args2.start_epoch == 0
    assert opt2.state_dict()["state"] == {}
    assert opt2.param_groups[0]["lr"] == 0.5


def test_load_model_restores_enabled_scaler(tmp_path):
    model = _tiny_net(0)
    opt = _trained_optimizer(model)
    scaler = NativeScalerWithGradNormCount("cpu", enabled=True)
    scaler.load_state_dict({"scale": 128.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                            "growth_interval": 2000, "_growth_tracker": 3})
    path = resume.save_model(_args(tmp_path), 0, model, model, opt, scaler)
    scaler2 = NativeScalerWithGradNormCount("cpu", enabled=True)
    resume.load_model(_args(tmp_path, resume=str(path)), _tiny_net(2),
                        torch.optim.AdamW(_tiny_net(2).parameters()), scaler2)
    assert scaler2.state_dict()["scale"] == 128.0 and scaler2.state_dict()["_growth_tracker"] == 3


def test_load_model_without_resume_is_noop(tmp_path):
    args = _args(tmp_path)
    assert resume.load_model(args, _tiny_net(0), None, None) is None
    assert args.start_epoch == 0




# ----------------------------------------------------------------------------
# where a rerun continues


def test_resolve_resume_picks_the_newest_checkpoint_and_its_next_epoch(tmp_path):
    out = tmp_path / "out"
    model = _tiny_net(0)
    opt = _trained_optimizer(model)
    for epoch in (0, 3):
        resume.save_model(_args(tmp_path), epoch, model, model, opt, None)
    latest = str(out / "checkpoint-3.pth")
    assert resume.resolve_resume("", str(out), True, False, 0) == (latest, 4)
    assert resume.resolve_resume("", str(out), False, False, 0) == ("", 0)  # --no_auto_resume
    assert resume.resolve_resume("", str(out), True, True, 0) == ("", 0)  # --eval never auto-resumes
    explicit = str(out / "checkpoint-0.pth")
    assert resume.resolve_resume(explicit, str(out), True, False, 0) == (explicit, 1)
    assert resume.resolve_resume(explicit, str(out), True, True, 0) == (explicit, 0)  # evaluation only
    # a weights-only file (no optimizer state) loads the model but starts at --start_epoch
    atomic_save({"model": model.state_dict(), "epoch": 9}, out / "weights.pth")
    assert resume.resolve_resume(str(out / "weights.pth"), "", True, False, 2) == (str(out / "weights.pth"), 2)


def test_save_epoch_links_the_numbered_checkpoint_to_last(tmp_path):
    model = _tiny_net(0)
    opt = _trained_optimizer(model)
    args = _args(tmp_path)
    resume.save_epoch(args, 0, model, model, opt, None, numbered=True)
    resume.save_epoch(args, 1, model, model, opt, None, numbered=False)
    out = Path(args.output_dir)
    assert sorted(os.listdir(out)) == ["checkpoint-0.pth", "checkpoint-last.pth"]
    last, first = torch.load(out / "checkpoint-last.pth", weights_only=True), torch.load(out / "checkpoint-0.pth", weights_only=True)
    assert (last["epoch"], first["epoch"]) == (1, 0)
    assert len(last["rng"]) == 1 and set(last["rng"][0]) >= {"torch", "numpy", "python"}
    resume.save_epoch(args, 2, model, model, opt, None, numbered=True)
    assert os.path.samefile(out / "checkpoint-2.pth", out / "checkpoint-last.pth")  # one file, two names


def test_restore_sets_the_saved_random_state(tmp_path):
    model = _tiny_net(0)
    opt = _trained_optimizer(model)
    args = _args(tmp_path)
    torch.manual_seed(7)
    resume.save_epoch(args, 0, model, model, opt, None, numbered=False)
    expected = torch.rand(3)
    torch.manual_seed(123)
    resume.restore(str(Path(args.output_dir) / "checkpoint-last.pth"), False, _tiny_net(1),
                   torch.optim.AdamW(_tiny_net(1).parameters()), None)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_truncate_log_drops_epochs_to_be_trained_again_and_broken_lines(tmp_path):
    log = tmp_path / "log.txt"
    rows = [{"epoch": e, "train_loss": 1.0 / (e + 1)} for e in range(4)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 4, "train_lo')
    resume.truncate_log(str(log), 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == rows[:2]
    resume.truncate_log(str(tmp_path / "missing.txt"), 0)  # nothing to do


def test_remove_stale_temp_files_keeps_finished_checkpoints(tmp_path):
    for name in (".checkpoint-last.pth.abc.tmp", ".checkpoint-3.pth.123.tmp", "checkpoint-3.pth", "notes.tmp"):
        (tmp_path / name).write_bytes(b"x")
    resume.remove_stale_temp_files(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3.pth", "notes.tmp"]
