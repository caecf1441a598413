"""Run settings, resolved once right after distributed init and recorded in args (and so in args.json).

Device, precision, torch.compile, the lr from --blr and the effective batch, the attention and
patch-embedding paths, and where the run resumes. Nothing after `resolve_settings` changes args:
helpers further up take these values explicitly.
"""
import os
import warnings
from typing import Any

import torch

import util.perf as perf
from util.checkpoint import to_plain
from util.dali import require_dali
from util.distributed import get_world_size, init_distributed_mode, init_single_process_group
from util.errors import UserError
from util.logger import log, warn
from util.precision import resolve_amp
from util.resume import resolve_resume
from util.transforms import FINETUNE_SCALE, LINPROBE_SCALE, PRETRAIN_SCALE


def check_common_args(args: Any) -> None:
    """Reject flag values that cannot work, with a message naming the flag."""
    for flag in ("batch_size", "accum_iter", "epochs", "print_freq"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if getattr(args, "input_size", 1) < 1:
        raise UserError(f"--input_size must be at least 1 pixel, got {args.input_size}")
    if not 0 <= getattr(args, "drop_path", 0.0) < 1:
        raise UserError(f"--drop_path is a probability, from 0 to less than 1, got {args.drop_path}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if args.save_every_minutes is not None and args.save_every_minutes <= 0:
        raise UserError(f"--save_every_minutes must be more than 0, got {args.save_every_minutes}")
    if not 0 <= getattr(args, "hflip", 0.5) <= 1:
        raise UserError(f"--hflip is a probability, from 0 to 1, got {args.hflip}")
    scale = getattr(args, "crop_scale", None)
    if scale and not 0 < scale[0] <= scale[1] <= 1:
        raise UserError(f"--crop_scale MIN MAX needs 0 < MIN <= MAX <= 1, got {scale[0]} {scale[1]}")
    if not args.data_path:
        raise UserError("--data_path is required: a folder with train/ (and val/) sub-folders of class folders")
    if getattr(args, "eval", False) and not args.resume and not getattr(args, "finetune", ""):
        raise UserError("--eval needs the weights to evaluate: --resume CKPT (a checkpoint of this script) or "
                        "--finetune CKPT (a fine-tuned classifier: ours, the reference's, timm's or Hugging Face's)")
    if getattr(args, "data_loader", "torch") == "dali":
        require_dali()


def check_fsdp_args(args: Any) -> None:
    """--fsdp combinations that are not supported, each a one-line error naming the fix."""
    if not getattr(args, "fsdp", False):
        return
    if args.amp == "fp16":
        raise UserError("--fsdp does not support --amp fp16 (its loss scaler would check only each process's shard "
                        "for overflows); use --amp bf16 (the default with --fsdp on CUDA) or --amp none")
    if args.compile:
        raise UserError("--fsdp with --compile is not supported; drop --compile (the default is off with --fsdp)")
    if getattr(args, "dist_eval", False):
        raise UserError("--fsdp with --dist_eval is not supported: shards of unequal length would leave processes "
                        "waiting for each other's parameters; drop --dist_eval (each process evaluates the whole set)")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def note_num_workers(num_workers: int) -> None:
    """One line when --num_workers exceeds the CPUs (the reference's default of 10 on a small machine), in place
    of the DataLoader's own warning, which it repeats for every loader it builds."""
    cpus = available_cpus()
    if num_workers > cpus:
        warn(f"--num_workers {num_workers} is more than the {cpus} CPUs this process can use: loading works, "
             f"but --num_workers {cpus} or fewer avoids oversubscribing them")
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)


STAGE_SCALE = {"main_pretrain": PRETRAIN_SCALE, "main_finetune": FINETUNE_SCALE, "main_linprobe": LINPROBE_SCALE}


def resolve_paths(args: Any) -> None:
    """--data_path, --knn_data_path and a local --finetune as absolute paths: args.json and the run identity then
    name the same files whatever the working directory of a rerun."""
    for flag in ("data_path", "knn_data_path", "finetune"):
        value = getattr(args, flag, None)
        if isinstance(value, str) and value and "://" not in value:
            setattr(args, flag, os.path.abspath(value))


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


def resolve_settings(args: Any, entry: str) -> torch.device:
    """Validate the flags, join the process group, and set every setting left to a default in args.

    Returns the device. Sets args.entry (the entry point, e.g. 'main_pretrain': part of the run identity,
    util/runs.py), device, amp, compile, attn, patch_embed, lr, resume and start_epoch (plus rank,
    world_size, gpu, distributed from the process group). With --fsdp and no launcher, a process group of
    this process alone is created (FSDP needs one).
    """
    args.entry = entry
    check_common_args(args)
    note_num_workers(args.num_workers)
    resolve_paths(args)
    if getattr(args, "crop_scale", None) is None and entry in STAGE_SCALE:
        args.crop_scale = list(STAGE_SCALE[entry])  # recorded as run, not as "the default"
    check_fsdp_args(args)
    fsdp = getattr(args, "fsdp", False)
    if args.device is None:
        args.device = default_device()
    device = parse_device(args.device)
    init_distributed_mode(args)
    if device.type == "cuda" and args.distributed:
        device = torch.device("cuda", args.gpu)
    if fsdp and not args.distributed:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # the device mesh is built on the current device
        init_single_process_group(device.type)

    if fsdp and args.amp is None and device.type == "cuda":
        args.amp = "bf16"  # FSDP's policy computes in bf16; fp16 would need a loss scaler across the shards
    args.amp = resolve_amp(args.amp, device)
    if args.compile is None:
        args.compile = device.type == "cuda" and not fsdp  # measured faster there (PRETRAIN.md); off on CPU
    try:
        args.attn, args.patch_embed = perf.resolve_layers(device.type, args.amp, args.attn, args.patch_embed)
    except ValueError as e:
        raise UserError(f"{e}; use --attn auto|sdpa|math and --patch_embed auto|conv|linear") from None

    eff_batch_size = args.batch_size * args.accum_iter * get_world_size()
    args.lr = resolve_lr(args.lr, args.blr, eff_batch_size)
    log("base lr: %.2e" % (args.lr * 256 / eff_batch_size))
    log("actual lr: %.2e" % args.lr)
    log("accumulate grad iterations: %d" % args.accum_iter)
    log("effective batch size: %d" % eff_batch_size)

    args.resume, args.start_epoch = resolve_resume(
        args.resume, args.output_dir, getattr(args, "auto_resume", True), getattr(args, "eval", False),
        args.start_epoch, entry=entry, settings=to_plain(args), overwrite=getattr(args, "overwrite", False),
        log_dir=getattr(args, "log_dir", ""))
    return device
