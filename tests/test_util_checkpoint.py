"""Tests for util.checkpoint: atomic writes, safe loading, key checks, finding the newest checkpoint."""
import argparse
import os

import pytest
import torch

import models_mae
import models_vit
from helpers import tiny_net as _tiny_net
from util import checkpoint as ckpt_lib
from util.errors import CheckpointError
from util.resume import save_model


def _create_marker(path):
    with open(path, "w") as f:
        f.write("code ran while unpickling")
    return "payload"


class _Payload:
    """Unpickling this object calls _create_marker(path): arbitrary code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (_create_marker, (self.path,))


# ----------------------------------------------------------------------------
# atomic_save / load_checkpoint


def test_atomic_save_load_round_trip(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 4, "args": {"lr": 0.5}}
    path = tmp_path / "sub" / "ckpt.pth"
    ckpt_lib.atomic_save(obj, path)
    assert sorted(os.listdir(path.parent)) == ["ckpt.pth"]  # no temporary files left
    loaded = ckpt_lib.load_checkpoint(str(path))
    torch.testing.assert_close(loaded["model"]["w"], obj["model"]["w"], rtol=0, atol=0)
    assert loaded["epoch"] == 4 and loaded["args"] == {"lr": 0.5}


def test_reference_checkpoint_with_pickled_namespace_loads(tmp_path):
    path = tmp_path / "reference.pth"
    ns = argparse.Namespace(lr=0.25, model="mae_vit_base_patch16", norm_pix_loss=True, resume="")
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 7, "args": ns}, path)  # reference style
    loaded = ckpt_lib.load_checkpoint(str(path))
    assert loaded["args"] == {"lr": 0.25, "model": "mae_vit_base_patch16", "norm_pix_loss": True,
                              "resume": ""}
    assert loaded["epoch"] == 7


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as exc:
        ckpt_lib.load_checkpoint(str(path))
    assert str(path) in str(exc.value)
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    control_marker = tmp_path / "control.txt"
    control = tmp_path / "control.pth"
    torch.save({"args": _Payload(control_marker)}, control)
    torch.load(control, weights_only=False)
    assert control_marker.exists()


def test_missing_file_error_names_the_file(tmp_path):
    path = tmp_path / "nope" / "checkpoint-3.pth"
    with pytest.raises(CheckpointError) as exc:
        ckpt_lib.load_checkpoint(str(path))
    assert str(path) in str(exc.value)


def test_truncated_file_error_names_the_file(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}, "epoch": 1}, good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        ckpt_lib.load_checkpoint(str(bad))
    assert str(bad) in str(exc.value)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError) as exc:
        ckpt_lib.load_checkpoint(str(empty))
    assert str(empty) in str(exc.value)


@pytest.mark.parametrize("payload", [
    b"this is not a checkpoint",  # a text file: IndexError inside torch's unpickler
    b"h\x05\x8f\xd6n4\xb9\xaa\x80w\xffl\x1a",  # KeyError
    b"J\xba?\x9c",  # struct.error
])
def test_non_checkpoint_file_gives_checkpoint_error(tmp_path, payload):
    garbage = tmp_path / "notes.pth"
    garbage.write_bytes(payload)
    with pytest.raises(CheckpointError) as exc:
        ckpt_lib.load_checkpoint(str(garbage))
    assert str(garbage) in str(exc.value)


def test_non_dict_and_folder_refused(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), path)
    with pytest.raises(CheckpointError):
        ckpt_lib.load_checkpoint(str(path))
    with pytest.raises(CheckpointError):
        ckpt_lib.load_checkpoint(str(tmp_path))


def test_failed_atomic_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-1.pth"
    ckpt_lib.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt_lib.atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint-1.pth"]
    assert path.read_bytes() == before
    assert ckpt_lib.load_checkpoint(str(path))["epoch"] == 1


def test_mae_checkpoint_into_vit_leaves_spec_missing_keys(tmp_path):
    mae = models_mae.mae_vit_tiny_patch16(img_size=32, depth=2, decoder_depth=1)
    opt = torch.optim.AdamW(mae.parameters())
    path = save_model(argparse.Namespace(output_dir=str(tmp_path)), 19, mae, mae, opt, None)
    state = ckpt_lib.load_checkpoint(str(path))["model"]
    for global_pool, extra in ((True, {"fc_norm.weight", "fc_norm.bias"}), (False, set())):
        vit = models_vit.vit_tiny_patch16(img_size=32, depth=2, num_classes=3, global_pool=global_pool)
        msg = vit.load_state_dict(state, strict=False)
        assert set(msg.missing_keys) == {"head.weight", "head.bias"} | extra


def test_load_state_dict_strict_names_mismatches():
    model = _tiny_net(0)
    sd = dict(model.state_dict())
    del sd["0.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["2.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError) as exc:
        ckpt_lib.load_state_dict_strict(model, sd, "somefile.pth")
    msg = str(exc.value)
    assert "somefile.pth" in msg
    assert "0.bias" in msg and "extra.weight" in msg
    assert "2.weight" in msg and "(5, 3)" in msg and "(2, 3)" in msg
    good = _tiny_net(3).state_dict()
    ckpt_lib.load_state_dict_strict(model, good, "ok.pth")
    torch.testing.assert_close(model[2].weight, good["2.weight"], rtol=0, atol=0)


# ----------------------------------------------------------------------------
# find_latest_checkpoint


def test_find_latest_checkpoint_by_stored_epoch_skipping_corrupt(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, epoch in (("checkpoint-0.pth", 0), ("checkpoint-19.pth", 19),
                        ("checkpoint-last.pth", 23), ("checkpoint-5.pth", 5)):
        ckpt_lib.atomic_save({"epoch": epoch, "model": {}}, out / name)
    (out / "checkpoint-40.pth").write_bytes(b"\x00corrupt")  # highest number, unreadable
    (out / "notes.pth").write_bytes(b"not a checkpoint name")
    assert ckpt_lib.find_latest_checkpoint(out) == out / "checkpoint-last.pth"
    # a stale 'last' loses against a numbered checkpoint with a higher stored epoch
    ckpt_lib.atomic_save({"epoch": 2, "model": {}}, out / "checkpoint-last.pth")
    assert ckpt_lib.find_latest_checkpoint(out) == out / "checkpoint-19.pth"


def test_find_latest_checkpoint_empty_or_missing(tmp_path):
    assert ckpt_lib.find_latest_checkpoint(tmp_path / "missing") is None
    assert ckpt_lib.find_latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint-1.pth").write_bytes(b"broken")
    assert ckpt_lib.find_latest_checkpoint(tmp_path) is None


def test_find_latest_checkpoint_accepts_reference_format(tmp_path):
    torch.save({"epoch": 7, "model": {}, "args": argparse.Namespace(lr=0.1)},
               tmp_path / "checkpoint-7.pth")
    ckpt_lib.atomic_save({"epoch": 3, "model": {}, "args": {"lr": 0.1}}, tmp_path / "checkpoint-3.pth")
    assert ckpt_lib.load_checkpoint(str(tmp_path / "checkpoint-7.pth"))["epoch"] == 7
    assert ckpt_lib.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-7.pth"
