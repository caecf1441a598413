"""A run's settings: resolved once from the parsed flags into one frozen, typed object (util/config.py).

`resolve_settings(args, entry)` validates the flags (util/flag_checks.py), joins the process group and fills in
every setting left to a default (device, precision, torch.compile, attention and patch-embedding kernels, the
lr from --blr and the effective batch, where the run resumes and from which epoch), and returns the
`Settings`. Nothing changes them afterwards: the groups are frozen dataclasses and `settings.args` refuses
writes. benchmark.py and the launchers use the same functions (`resolve_precision`, `join`, the flag checks).
"""
import argparse
import os
from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import util.perf as perf
from util.checkpoint import to_plain
from util.config import Settings, settings_from_flags
from util.distributed import init_single_process_group, join_process_group
from util.errors import UserError
from util.flag_checks import check_common_flags, check_fsdp_flags, note_num_workers
from util.logger import log
from util.precision import resolve_amp
from util.recipes import STAGE_SCALE
from util.resume import resolve_resume


def resolve_paths(flags: Dict[str, Any]) -> None:
    """--data_path, --knn_data_path and a local --finetune as absolute paths: args.json and the run identity then
    name the same files whatever the working directory of a rerun."""
    for flag in ("data_path", "knn_data_path", "finetune"):
        value = flags.get(flag)
        if isinstance(value, str) and value and "://" not in value:
            flags[flag] = os.path.abspath(value)


def resolve_stats(in_chans: int, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
                  ) -> Tuple[List[float], List[float]]:
    """--mean / --std as run: ImageNet's when neither is given for 3 channels; otherwise both are needed, with
    --in_chans positive numbers (std) each."""
    if mean is None and std is None:
        if in_chans == 3:
            return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
        raise UserError(f"--in_chans {in_chans} needs the data's --mean and --std ({in_chans} numbers each): "
                        f"`python compute_stats.py --data_path D --in_chans {in_chans}` prints them")
    if mean is None or std is None:
        raise UserError(f"--{'std' if mean is None else 'mean'} is given without --{'mean' if mean is None else 'std'}"
                        f"; give both, {in_chans} numbers each")
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != in_chans:
            raise UserError(f"--{name} has {len(values)} number(s), --in_chans is {in_chans}: give one per channel")
    if min(std) <= 0:
        raise UserError(f"--std must be positive, got {' '.join(map(str, std))}")
    return [float(v) for v in mean], [float(v) for v in std]


def default_device() -> str:
    """cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(name: str) -> torch.device:
    """The --device value as a torch.device, with one-line errors for bad or unavailable devices."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available; use --device cpu")
    return device


def resolve_lr(lr: Any, blr: float, eff_batch_size: int) -> float:
    """--lr when given, else blr * eff_batch_size / 256 (the linear scaling rule)."""
    return lr if lr is not None else blr * eff_batch_size / 256


def resolve_precision(device: torch.device, amp: Optional[str], compile: Optional[bool], fsdp: bool,
                      attn: str = "auto", patch_embed: str = "auto") -> Dict[str, Any]:
    """amp, compile, attn and patch_embed in effect on `device` (the training scripts' and benchmark.py's)."""
    if fsdp and amp is None and device.type == "cuda":
        amp = "bf16"  # FSDP's policy computes in bf16; fp16 would need a loss scaler across the shards
    amp = resolve_amp(amp, device)
    if compile is None:
        compile = device.type == "cuda" and not fsdp  # measured faster there (PRETRAIN.md); off on CPU
    try:
        attn, patch_embed = perf.resolve_layers(device.type, amp, attn, patch_embed)
    except ValueError as e:
        raise UserError(f"{e}; use --attn auto|sdpa|math and --patch_embed auto|conv|linear") from None
    return {"amp": amp, "compile": compile, "attn": attn, "patch_embed": patch_embed}


def join(device_name: Optional[str], dist_url: str, dist_on_itp: bool, timeout_minutes: float, fsdp: bool,
         gpu: Optional[int] = None) -> Tuple[torch.device, Dict[str, Any]]:
    """(the device this process trains on, the process group's rank/world_size/gpu/distributed) after joining
    the group of torchrun / SLURM / OpenMPI, if any; with `fsdp` and no launcher, a group of this process
    alone (FSDP needs one)."""
    device = parse_device(device_name or default_device())
    group = join_process_group(device.type, dist_url, dist_on_itp, timeout_minutes, gpu)
    if device.type == "cuda" and group["distributed"]:
        device = torch.device("cuda", group["gpu"])
    if fsdp and not group["distributed"]:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # the device mesh is built on the current device
        init_single_process_group(device.type)
    return device, group


def resolve_settings(args: argparse.Namespace, entry: str, resolved: Optional[Mapping[str, Any]] = None) -> Settings:
    """The run's Settings from its parsed flags (which are not changed).

    `resolved`: stage values the entry point resolved itself (e.g. the decoder sizes of the model), recorded
    as run. The settings record the entry point (`entry`, part of the run identity, util/runs.py), device, amp,
    compile, attn, patch_embed, lr, resume and start_epoch, plus rank, world_size, gpu and distributed.
    """
    flags: Dict[str, Any] = {**vars(args), **(resolved or {}), "entry": entry}
    given = settings_from_flags(flags)  # typed reads; the groups' defaults stand for flags this entry lacks
    check_common_flags(given)
    note_num_workers(given.data.num_workers)
    resolve_paths(flags)
    flags["mean"], flags["std"] = resolve_stats(given.data.in_chans, given.data.mean, given.data.std)
    if given.data.crop_scale is None and entry in STAGE_SCALE:
        flags["crop_scale"] = list(STAGE_SCALE[entry])  # recorded as run, not as "the default"
    check_fsdp_flags(given)
    dist, precision = given.dist, given.precision
    device, group = join(flags["device"], dist.dist_url, dist.dist_on_itp, dist.dist_timeout, dist.fsdp, dist.gpu)
    flags.update(group, device=flags["device"] or default_device())
    flags.update(resolve_precision(device, flags["amp"], flags["compile"], dist.fsdp, precision.attn,
                                   precision.patch_embed))

    optim = given.optim
    eff_batch_size = given.data.batch_size * optim.accum_iter * group["world_size"]
    flags["lr"] = resolve_lr(optim.lr, optim.blr, eff_batch_size)
    log("base lr: %.2e" % (flags["lr"] * 256 / eff_batch_size))
    log("actual lr: %.2e" % flags["lr"])
    log("accumulate grad iterations: %d" % optim.accum_iter)
    log("effective batch size: %d" % eff_batch_size)

    ckpt = given.ckpt
    flags["resume"], flags["start_epoch"] = resolve_resume(
        ckpt.resume, ckpt.output_dir, ckpt.auto_resume, ckpt.eval, optim.start_epoch, entry=entry,
        settings=to_plain(flags), overwrite=ckpt.overwrite, log_dir=ckpt.log_dir)
    settings = settings_from_flags(flags)
    # the device this process trains on (cuda:LOCAL_RANK under a launcher); the record keeps the flag's value
    return replace(settings, precision=replace(settings.precision, device=str(device)))
