"""util/settings.py: every setting left to a default is resolved once, from the flags and the machine."""
import dataclasses

import pytest
import torch

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
import util.precision as precision
from util.errors import UserError
from util.settings import resolve_lr, resolve_settings


def _args(module, *argv):
    return module.get_args_parser().parse_args(["--data_path", "unused", "--output_dir", "", *map(str, argv)])


def test_lr_from_blr_and_the_effective_batch():
    assert resolve_lr(None, 1e-3, 4096) == pytest.approx(1.6e-2)
    assert resolve_lr(5e-4, 1e-3, 4096) == 5e-4  # --lr wins


def test_defaults_resolved_for_this_machine(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    args = _args(main_pretrain, "--device", "cpu", "--batch_size", "8", "--accum_iter", "4", "--blr", "1e-3")
    before = dict(vars(args))
    s = resolve_settings(args, "main_pretrain")
    assert vars(args) == before  # the parsed flags are not changed
    assert s.device == torch.device("cpu")
    p = s.precision
    assert (p.amp, p.compile, p.attn, p.patch_embed) == ("none", False, "sdpa", "linear")
    assert s.optim.lr == pytest.approx(1e-3 * 32 / 256)
    assert (s.dist.distributed, s.dist.world_size, s.ckpt.resume, s.optim.start_epoch) == (False, 1, "", 0)
    assert s.crop_scale == (0.2, 1.0)  # the stage's own default, recorded as run
    # the flat record is what args.json holds: the flags that ran plus what resolution added
    assert set(vars(s.args)) == set(before) | {"entry", "distributed", "rank", "gpu"}
    assert (s.args.amp, s.args.lr, s.args.entry) == ("none", s.optim.lr, "main_pretrain")
    with pytest.raises(AttributeError, match="resolved once"):
        s.args.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.optim.lr = 1.0


def test_given_values_are_kept(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    args = _args(main_finetune, "--device", "cpu", "--amp", "none", "--compile", "--attn", "math",
                 "--patch_embed", "conv", "--lr", "0.5")
    s = resolve_settings(args, "main_finetune")
    p = s.precision
    assert (p.amp, p.compile, p.attn, p.patch_embed, s.optim.lr) == ("none", True, "math", "conv", 0.5)
    s = resolve_settings(_args(main_finetune, "--device", "cpu"), "main_finetune")
    assert (s.precision.amp, s.precision.attn) == ("bf16", "math")  # native bf16: bf16 and the explicit attention


@pytest.mark.parametrize("argv, message", [
    (["--print_freq", "0"], "--print_freq must be at least 1, got 0"),
    (["--device", "tpu0"], "--device tpu0 is not a device"),
    (["--hflip", "1.5"], "--hflip is a probability, from 0 to 1, got 1.5"),
    (["--crop_scale", "0.8", "0.5"], "--crop_scale MIN MAX needs 0 < MIN <= MAX <= 1, got 0.8 0.5"),
    (["--crop_scale", "0", "1"], "--crop_scale MIN MAX needs 0 < MIN <= MAX <= 1"),
])
def test_bad_values_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        resolve_settings(_args(main_pretrain, *argv), "main_pretrain")
    with pytest.raises(UserError, match="--data_path is required"):
        resolve_settings(main_pretrain.get_args_parser().parse_args([]), "main_pretrain")


def test_num_workers_beyond_the_cpus_is_said_once(monkeypatch, capsys):
    import warnings

    import util.flag_checks as settings

    monkeypatch.setattr(settings, "available_cpus", lambda: 2)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        settings.note_num_workers(10)
        warnings.warn("This DataLoader will create 10 worker processes in total.", UserWarning)  # ours said it
        warnings.warn("another warning", UserWarning)
    assert [str(w.message) for w in shown] == ["another warning"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num_workers 10 is more than the 2 CPUs this process can use" in err
    settings.note_num_workers(2)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("module", [main_pretrain, main_finetune, main_linprobe, main_knn])
def test_every_flag_lands_in_exactly_one_group(module):
    from util.config import GROUPS, RECORD_ONLY
    from util.submit import add_launcher_args

    parser = add_launcher_args(module.get_args_parser())
    flags = {a.dest for a in parser._actions if a.dest != "help"}
    owners = {flag: [name for name, cls in GROUPS.items() if flag in {f.name for f in dataclasses.fields(cls)}]
              for flag in flags}
    assert {flag: groups for flag, groups in owners.items() if len(groups) != 1} == {}
    # and every group field is a flag of some entry point or set by resolution (no field nobody fills)
    resolved = {"distributed", "rank", "gpu", "world_size"}
    all_flags = set().union(*({a.dest for a in add_launcher_args(m.get_args_parser())._actions}
                              for m in (main_pretrain, main_finetune, main_linprobe, main_knn)))
    for cls in GROUPS.values():
        assert {f.name for f in dataclasses.fields(cls)} <= all_flags | resolved, cls.__name__
    assert not RECORD_ONLY & all_flags
