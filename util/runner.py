"""What the three entry points share: flags, setup, loaders, lr scaling, resume and the epoch loop.

Each `main_*.py` keeps only what differs (data, model surgery, optimizer, criterion, engine).
"""
import argparse
import datetime
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.backends.cudnn as cudnn
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

import util.misc as misc
import util.perf as perf
from util.checkpoint import atomic_save, find_latest_checkpoint, save_model, to_plain
from util.errors import NonFiniteLossError, UserError
from util.logger import log, warn

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}


# ----------------------------------------------------------------------------
# flags

def add_common_args(parser: argparse.ArgumentParser, *, batch_size: int, epochs: int, model: str,
                    weight_decay: float, blr: float, min_lr: float, warmup_epochs: int,
                    model_help: str) -> argparse.ArgumentParser:
    """Add the flags every entry point has, with that entry point's reference defaults."""
    parser.add_argument("--batch_size", default=batch_size, type=int,
                        help="Batch size per process (effective batch size is batch_size * accum_iter * # processes)")
    parser.add_argument("--epochs", default=epochs, type=int)
    parser.add_argument("--accum_iter", default=1, type=int,
                        help="Accumulate gradient iterations (for increasing the effective batch size under memory constraints)")

    # Model parameters
    parser.add_argument("--model", default=model, type=str, metavar="MODEL", help=model_help)
    parser.add_argument("--input_size", default=224, type=int, help="images input size")

    # Optimizer parameters
    parser.add_argument("--weight_decay", type=float, default=weight_decay,
                        help=f"weight decay (default: {weight_decay})")
    parser.add_argument("--lr", type=float, default=None, metavar="LR",
                        help="learning rate (absolute lr)")
    parser.add_argument("--blr", type=float, default=blr, metavar="LR",
                        help="base learning rate: absolute_lr = base_lr * total_batch_size / 256")
    parser.add_argument("--min_lr", type=float, default=min_lr, metavar="LR",
                        help="lower lr bound for cyclic schedulers that hit 0")
    parser.add_argument("--warmup_epochs", type=int, default=warmup_epochs, metavar="N",
                        help="epochs to warmup LR")

    # Dataset and run parameters
    parser.add_argument("--data_path", default=None, type=str,
                        help="dataset path: a folder with train/ (and val/) ImageFolder sub-folders")
    parser.add_argument("--output_dir", default="./output_dir",
                        help="path where to save, empty for no saving")
    parser.add_argument("--log_dir", default="./output_dir", help="path where to tensorboard log")
    parser.add_argument("--device", default=None,
                        help="device to use for training / testing (default: cuda if available, else cpu)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="", help="resume from checkpoint (path or https URL)")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin_mem", action="store_true",
                        help="Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)

    # distributed training parameters
    parser.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    parser.add_argument("--local_rank", default=-1, type=int)
    parser.add_argument("--dist_on_itp", action="store_true")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")

    # ours
    parser.add_argument("--amp", default=None, choices=sorted(AMP_DTYPES),
                        help="mixed precision (default: fp16 on CUDA, bf16 on CPUs with native bf16, else none)")
    parser.add_argument("--print_freq", default=20, type=int, help="console log every N iterations")
    parser.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                        help="do not resume from the newest checkpoint in --output_dir when --resume is empty")
    parser.set_defaults(auto_resume=True)
    parser.add_argument("--strict_data", action="store_true",
                        help="stop at the first unreadable image instead of skipping it with a warning")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the model (default: on for CUDA, off for CPU)")
    parser.add_argument("--no_compile", action="store_false", dest="compile", help="do not torch.compile")
    parser.add_argument("--stop_epoch", default=None, type=int,
                        help="end this run before epoch N while keeping the --epochs schedule; "
                             "the same command without it resumes (for time-limited jobs)")
    parser.add_argument("--dist_timeout", default=30, type=float,
                        help="minutes a process waits for the others before the job fails")
    return parser


# ----------------------------------------------------------------------------
# setup

def default_device() -> str:
    """cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_amp(amp: Optional[str], device: torch.device) -> str:
    """The --amp value in effect: the given one, or the device's default."""
    if amp is not None:
        return amp
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and perf.cpu_has_native_bf16():
        return "bf16"
    return "none"


def check_common_args(args: Any) -> None:
    """Reject flag values that cannot work, with a message naming the flag."""
    for flag in ("batch_size", "accum_iter", "epochs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.print_freq < 1:
        raise UserError(f"--print_freq must be at least 1, got {args.print_freq}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if not args.data_path:
        raise UserError("--data_path is required: a folder with train/ (and val/) sub-folders of class folders")


def setup(args: Any) -> torch.device:
    """Distributed init, device, seeds, precision and output folder; returns the device."""
    check_common_args(args)
    if args.device is None:
        args.device = default_device()
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available; use --device cpu")
    misc.init_distributed_mode(args)
    if device.type == "cuda" and args.distributed:
        device = torch.device("cuda", args.gpu)
    args.amp = resolve_amp(args.amp, device)

    log(f"job dir: {os.path.dirname(os.path.dirname(os.path.realpath(__file__)))}")
    log("{}".format(args).replace(", ", ",\n"))

    # fix the seed for reproducibility
    seed = args.seed + misc.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    cudnn.benchmark = True

    if args.output_dir and misc.is_main_process():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(to_plain(args), f, indent=2)
    return device


def autocast(device: torch.device, amp: str):
    """Autocast context for the --amp value (a no-op for 'none')."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_loss_scaler(args: Any, device: torch.device) -> misc.NativeScalerWithGradNormCount:
    """Loss scaler: a GradScaler for fp16, plain backward/step otherwise."""
    return misc.NativeScalerWithGradNormCount(device.type, enabled=args.amp == "fp16")


def scale_lr(args: Any) -> int:
    """Set args.lr from --blr when --lr is absent; print the effective batch; return it."""
    eff_batch_size = args.batch_size * args.accum_iter * misc.get_world_size()
    if args.lr is None:  # only base_lr is specified
        args.lr = args.blr * eff_batch_size / 256
    log("base lr: %.2e" % (args.lr * 256 / eff_batch_size))
    log("actual lr: %.2e" % args.lr)
    log("accumulate grad iterations: %d" % args.accum_iter)
    log("effective batch size: %d" % eff_batch_size)
    return eff_batch_size


def check_input_size(input_size: int, model: torch.nn.Module) -> None:
    """--input_size must be a multiple of the model's patch size."""
    patch = model.patch_embed.patch_size[0]
    if input_size % patch:
        raise UserError(f"--input_size {input_size} is not divisible by the patch size {patch} of this model; "
                        f"use a multiple of {patch} (e.g. {max(patch, input_size // patch * patch)})")


def prepare_model(model: torch.nn.Module, args: Any, device: torch.device):
    """Fast-path choices, move to the device, lr from --blr, DDP / compile; return (model, model_without_ddp)."""
    perf.configure(model, device.type, args.amp)
    model.to(device)
    model_without_ddp = model
    log("Model = %s" % str(model_without_ddp))
    scale_lr(args)
    return wrap_ddp(model, args, device), model_without_ddp


def wrap_ddp(model: torch.nn.Module, args: Any, device: torch.device) -> torch.nn.Module:
    """DDP around the model when distributed (no unused-parameter search), then torch.compile if asked.

    --compile defaults to on for CUDA (measured faster, see PRETRAIN.md) and off for CPU.
    """
    if args.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if getattr(args, "compile", None) is None:
        args.compile = device.type == "cuda"
    if args.compile:
        log("Compiling the model with torch.compile (the first steps are slower)")
        model = torch.compile(model)
    return model


# ----------------------------------------------------------------------------
# data

class ShardSampler(Sampler):
    """Every index exactly once across ranks (rank r takes r, r+W, ...): no padding duplicates."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        self.n, self.num_replicas, self.rank = len(dataset), num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


def train_loader(dataset: Dataset, args: Any) -> DataLoader:
    """Shuffled, per-rank sharded (DistributedSampler), drop_last training loader."""
    if len(dataset) < args.batch_size * misc.get_world_size():
        raise UserError(f"the training set has {len(dataset)} images, fewer than one batch "
                        f"({args.batch_size} x {misc.get_world_size()} processes); lower --batch_size")
    sampler = DistributedSampler(dataset, num_replicas=misc.get_world_size(), rank=misc.get_rank(),
                                 shuffle=True, seed=args.seed)
    log("Sampler_train = %s" % str(sampler))
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                      pin_memory=args.pin_mem and torch.cuda.is_available(), drop_last=True, persistent_workers=args.num_workers > 0)


def eval_loader(dataset: Dataset, args: Any) -> DataLoader:
    """Validation loader: sequential, or sharded without duplicates across ranks with --dist_eval."""
    if getattr(args, "dist_eval", False) and misc.get_world_size() > 1:
        sampler: Sampler = ShardSampler(dataset, misc.get_world_size(), misc.get_rank())
    else:
        if misc.get_world_size() > 1:
            log("Evaluating on every process without --dist_eval: each one sees the full validation set")
        sampler = torch.utils.data.SequentialSampler(dataset)
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                      pin_memory=args.pin_mem and torch.cuda.is_available(), drop_last=False, persistent_workers=args.num_workers > 0)


def tensorboard_writer(args: Any):
    """SummaryWriter on rank 0 (None elsewhere, or without --log_dir, or with --eval)."""
    if not misc.is_main_process() or not args.log_dir or getattr(args, "eval", False):
        return None
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(args.log_dir, exist_ok=True)
    # a resumed run drops the events it is about to write again
    purge_step = args.start_epoch * 1000 if args.start_epoch > 0 else None
    return SummaryWriter(log_dir=args.log_dir, purge_step=purge_step)


# ----------------------------------------------------------------------------
# resume

def resume(args: Any, model_without_ddp: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
           loss_scaler: Any) -> Optional[Dict[str, Any]]:
    """--resume, or (unless --no_auto_resume) the newest checkpoint in --output_dir; restores RNG."""
    if not args.resume and getattr(args, "auto_resume", True) and args.output_dir \
            and not getattr(args, "eval", False):
        latest = find_latest_checkpoint(args.output_dir)
        if latest is not None:
            args.resume = str(latest)
            log(f"Auto-resuming from {latest} (pass --no_auto_resume to start afresh)")
    checkpoint = misc.load_model(args, model_without_ddp, optimizer, loss_scaler)
    if checkpoint is not None and "rng" in checkpoint and not getattr(args, "eval", False):
        states = checkpoint["rng"]
        if len(states) == misc.get_world_size():
            misc.set_rng_state(states[misc.get_rank()])
        else:
            warn(f"checkpoint holds random states for {len(states)} processes, this run has "
                 f"{misc.get_world_size()}: continuing with fresh random streams")
    return checkpoint


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every rank's random state, in rank order (a collective in distributed runs)."""
    state = misc.get_rng_state()
    if misc.get_world_size() == 1:
        return [state]
    out: List[Any] = [None] * misc.get_world_size()
    dist.all_gather_object(out, state)
    return out


# ----------------------------------------------------------------------------
# epoch loop

def _truncate_log(path: str, start_epoch: int) -> None:
    """Drop log lines of epochs >= start_epoch (they are about to be trained again)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("epoch", -1) >= start_epoch:
                    continue
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            kept.append(line)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def remove_stale_temp_files(output_dir: str) -> None:
    """Delete temporary checkpoint files a killed run left behind (never a finished checkpoint)."""
    for p in Path(output_dir).glob(".checkpoint-*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


def save_checkpoints(args: Any, epoch: int, model: torch.nn.Module, model_without_ddp: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, loss_scaler: Any, numbered: bool) -> None:
    """checkpoint-last.pth every epoch; checkpoint-{epoch}.pth too when `numbered` (a hard link)."""
    rng = gather_rng_states()
    if not args.output_dir:
        return
    last = save_model(args, epoch, model, model_without_ddp, optimizer, loss_scaler,
                      name="last", extra={"rng": rng})
    if numbered and misc.is_main_process():
        target = Path(args.output_dir) / f"checkpoint-{epoch}.pth"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            os.link(last, tmp)
        except OSError:  # no hard links on this filesystem: write a copy
            atomic_save(torch.load(last, map_location="cpu", weights_only=True), target)
        else:
            os.replace(tmp, target)


def train_loop(args: Any, *, model: torch.nn.Module, model_without_ddp: torch.nn.Module,
               optimizer: torch.optim.Optimizer, loss_scaler: Any, data_loader_train: DataLoader,
               train_one_epoch: Callable[[int], Dict[str, float]],
               evaluate: Optional[Callable[[int], Dict[str, float]]] = None,
               log_writer: Any = None, numbered_every: int = 1,
               extra_log: Optional[Dict[str, Any]] = None) -> None:
    """Train from args.start_epoch to args.epochs: train, evaluate, log, save, once per epoch.

    Args:
        train_one_epoch: epoch -> training stats.
        evaluate: epoch -> test stats, or None for no evaluation.
        numbered_every: write checkpoint-{epoch}.pth every this many epochs and at the last one.
        extra_log: constant entries for every log.txt line (e.g. n_parameters).
    """
    log_path = os.path.join(args.output_dir, "log.txt") if args.output_dir else None
    if log_path and misc.is_main_process():
        _truncate_log(log_path, args.start_epoch)
        remove_stale_temp_files(args.output_dir)
    if args.start_epoch >= args.epochs:
        log(f"Nothing to train: the run is already at epoch {args.start_epoch} of {args.epochs}.")
        return
    log(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    end_epoch = args.epochs if getattr(args, "stop_epoch", None) is None else min(args.stop_epoch, args.epochs)
    for epoch in range(args.start_epoch, end_epoch):
        if isinstance(data_loader_train.sampler, DistributedSampler):
            data_loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(epoch)
        test_stats = evaluate(epoch) if evaluate is not None else {}
        skipped = getattr(data_loader_train.dataset, "skipped", 0)
        if skipped:
            warn(f"epoch {epoch}: {skipped} unreadable training image(s) skipped so far (see the warnings "
                 f"above; --strict_data stops at the first)")

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()},
                     "epoch": epoch, **(extra_log or {})}
        if log_path and misc.is_main_process():
            if log_writer is not None:
                log_writer.flush()
            with open(log_path, mode="a", encoding="utf-8") as f:
                f.write(json.dumps(log_stats) + "\n")
        numbered = epoch % numbered_every == 0 or epoch + 1 == args.epochs
        save_checkpoints(args, epoch, model, model_without_ddp, optimizer, loss_scaler, numbered)

    total_time = time.time() - start_time
    log("Training time {}".format(str(datetime.timedelta(seconds=int(total_time)))))


# ----------------------------------------------------------------------------
# classification (fine-tuning and linear probing)

def add_classification_args(parser: argparse.ArgumentParser, *, global_pool: bool) -> argparse.ArgumentParser:
    """Flags fine-tuning and linear probing share (reference names and defaults)."""
    parser.add_argument("--finetune", default="", help="finetune from checkpoint")
    parser.add_argument("--global_pool", action="store_true")
    parser.set_defaults(global_pool=global_pool)
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="Use class token instead of global pool for classification")
    parser.add_argument("--nb_classes", default=1000, type=int, help="number of the classification types")
    parser.add_argument("--eval", action="store_true", help="Perform evaluation only")
    parser.add_argument("--dist_eval", action="store_true", default=False,
                        help="Enabling distributed evaluation (every image counted exactly once)")
    return parser


def classification_data(args: Any, train_transform: Callable, val_transform: Callable):
    """Train/val ImageFolders and their loaders; checks --nb_classes against the class folders."""
    from util.datasets import build_dataset

    dataset_train = build_dataset(True, args, transform=train_transform)
    dataset_val = build_dataset(False, args, transform=val_transform)
    log(dataset_train)
    log(dataset_val)
    n_found = len(dataset_train.classes)
    if args.nb_classes < n_found:
        raise UserError(f"--nb_classes {args.nb_classes} is smaller than the {n_found} class folders in "
                        f"{dataset_train.root}; use --nb_classes {n_found}")
    world = misc.get_world_size()
    if args.dist_eval and len(dataset_val) % world != 0:
        warn(f"the validation set ({len(dataset_val)} images) does not divide evenly over {world} processes; "
             f"shards differ in size, every image is still counted exactly once")
    loader_train = None if args.eval else train_loader(dataset_train, args)
    return dataset_train, dataset_val, loader_train, eval_loader(dataset_val, args)


def run_classification(args: Any, *, model: torch.nn.Module, model_without_ddp: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, loss_scaler: Any, criterion: torch.nn.Module,
                       device: torch.device, data_loader_train: Optional[DataLoader],
                       data_loader_val: DataLoader, mixup_fn: Any = None,
                       max_norm: Optional[float] = None) -> Dict[str, float]:
    """Resume, then either --eval once or train with evaluation every epoch; return the last test stats."""
    from engine_finetune import evaluate, train_one_epoch

    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    log("number of params (M): %.2f" % (n_parameters / 1.e6))
    resume(args, model_without_ddp, optimizer, loss_scaler)
    n_val = len(data_loader_val.dataset)

    def eval_epoch(_epoch: int) -> Dict[str, float]:
        test_stats = evaluate(data_loader_val, model, device, amp=args.amp)
        log(f"Accuracy of the network on the {n_val} test images: {test_stats['acc1']:.1f}%")
        return test_stats

    if args.eval:
        return eval_epoch(args.start_epoch)

    log_writer = tensorboard_writer(args)
    state = {"max_accuracy": 0.0, "last": {}}

    def eval_and_track(epoch: int) -> Dict[str, float]:
        test_stats = eval_epoch(epoch)
        state["max_accuracy"] = max(state["max_accuracy"], test_stats["acc1"])
        log(f"Max accuracy: {state['max_accuracy']:.2f}%")
        if log_writer is not None:
            log_writer.add_scalar("perf/test_acc1", test_stats["acc1"], epoch)
            log_writer.add_scalar("perf/test_acc5", test_stats["acc5"], epoch)
            log_writer.add_scalar("perf/test_loss", test_stats["loss"], epoch)
        state["last"] = test_stats
        return test_stats

    train_loop(
        args, model=model, model_without_ddp=model_without_ddp, optimizer=optimizer, loss_scaler=loss_scaler,
        data_loader_train=data_loader_train,
        train_one_epoch=lambda epoch: train_one_epoch(model, criterion, data_loader_train, optimizer, device,
                                                      epoch, loss_scaler, max_norm, mixup_fn,
                                                      log_writer=log_writer, args=args),
        evaluate=eval_and_track, log_writer=log_writer, numbered_every=1,
        extra_log={"n_parameters": n_parameters})
    if log_writer is not None:
        log_writer.close()
    return state["last"]


# ----------------------------------------------------------------------------
# command-line wrapper

def _one_line(e: BaseException) -> str:
    """The user-facing line of an exception (also when re-raised from a loader worker)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    msg = lines[-1] if lines else type(e).__name__
    prefix = f"{type(e).__module__}.{type(e).__name__}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def launch(main: Callable[[Any], Any], args: Any) -> int:
    """Run main(args); turn user errors and non-finite losses into one line and an exit code."""
    code = 0
    try:
        main(args)
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        code = e.exit_code
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        code = 130
    finally:
        if dist.is_available() and dist.is_initialized():
            if code == 0:
                dist.destroy_process_group()
    return code
