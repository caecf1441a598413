"""What the three entry points share around their engines: setup, model preparation and the epoch loop.

Each `main_*.py` keeps only what differs (data, model surgery, optimizer, criterion, engine); the
classification side (fine-tuning and linear probing) continues in util/classification.py.
"""
import datetime
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.backends.cudnn as cudnn
from torch.utils.data import DataLoader

from util.checkpoint import load_pretrained, to_plain
from util.dali import make_train_loader
from util.distributed import get_rank, get_world_size, is_main_process
from util.engine_loop import AfterStep
from util.errors import UserError
from util.logger import log, warn
from util.metrics import MetricLogger
from util.preemption import StopGuard
from util.resume import (EpochPosition, data_fingerprint, epoch_position, remove_stale_temp_files, save_epoch,
                         save_position, truncate_log)
from util.runs import remove_run
from util.settings import resolve_settings
from util.sharding import shard_model


def setup(args: Any, entry: str) -> torch.device:
    """Resolve the run settings of entry point `entry` (util/settings.py) and seed; return the device.

    Nothing is written here: a training run writes its files in `start_run`, once everything it needs has
    been checked and built.
    """
    device = resolve_settings(args, entry)
    log(f"job dir: {os.path.dirname(os.path.dirname(os.path.realpath(__file__)))}")
    log("{}".format(args).replace(", ", ",\n"))

    # fix the seed for reproducibility
    seed = args.seed + get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    cudnn.benchmark = True
    return device


def end_epoch(args: Any) -> int:
    """The epoch this run stops before: --epochs, or --stop_epoch when that comes first."""
    return args.epochs if getattr(args, "stop_epoch", None) is None else min(args.stop_epoch, args.epochs)


def epochs_left(args: Any) -> int:
    """Epochs this run trains (0 for the rerun of a finished run)."""
    return max(end_epoch(args) - args.start_epoch, 0)


def start_run(args: Any) -> None:
    """The first write of a training run, on rank 0, after the data, model and resume state are ready.

    With --overwrite the run files of --output_dir (and its TensorBoard events, when --log_dir is the same
    folder) are deleted first; then log lines of the epochs about to be trained again are dropped, temporary files of a killed
    run removed, and args.json written: every setting resolved, the `args` of each checkpoint this run writes.
    """
    if not args.output_dir or not is_main_process() or not epochs_left(args):
        return  # a finished run's rerun changes nothing
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if getattr(args, "overwrite", False):
        removed = remove_run(args.output_dir, args.log_dir)
        if removed:
            log(f"--overwrite: deleted {len(removed)} file(s) of the earlier run in {args.output_dir}")
    truncate_log(os.path.join(args.output_dir, "log.txt"), args.start_epoch)
    remove_stale_temp_files(args.output_dir)
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump(to_plain(args), f, indent=2)


def eval_weights(args: Any, model: torch.nn.Module) -> None:
    """--eval: the weights to evaluate. --resume is loaded strictly later (util.resume.restore); otherwise
    --finetune's classifier is loaded by the fine-tuning rules (any format, position table resized) and must
    bring its trained head: a pre-training checkpoint has none."""
    if args.resume:
        if args.finetune:
            warn(f"--eval evaluates --resume {args.resume}; --finetune {args.finetune} is not used")
        return
    load_pretrained(model, args.finetune, args.global_pool, with_head=True)


def build_model(create: Callable[..., torch.nn.Module], name: str, **kwargs: Any) -> torch.nn.Module:
    """create(name, **kwargs), with a one-line error for settings the model cannot be built with (a ValueError
    or timm's AssertionError, e.g. grid masking on an odd patch grid, heads that do not divide the width)."""
    try:
        return create(name, **kwargs)
    except UserError:
        raise
    except (ValueError, AssertionError) as e:
        raise UserError(f"cannot build --model {name} with these flags: {e or type(e).__name__}") from None


def check_input_size(input_size: int, model: torch.nn.Module) -> None:
    """--input_size must be a multiple of the model's patch size."""
    patch = model.patch_embed.patch_size[0]
    if input_size % patch:
        raise UserError(f"--input_size {input_size} is not divisible by the patch size {patch} of this model; "
                        f"use a multiple of {patch} (e.g. {max(patch, input_size // patch * patch)})")


def prepare_model(model: torch.nn.Module, device: torch.device, distributed: bool, compile: bool,
                  fsdp: bool = False, amp: str = "none", grad_checkpointing: bool = False
                  ) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """Activation checkpointing if asked; then shard (--fsdp), or move to the device, wrap in DDP when
    distributed and torch.compile when asked.

    Returns (model to train, model_without_ddp: the module whose (full) state dict is saved). With --fsdp
    both are the same module, sharded in place; fully_shard moves each process's shards to the device, so
    the whole model never sits on one GPU.
    """
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if not fsdp:
        model.to(device)
    log("Model = %s" % str(model))
    return wrap_model(model, device, distributed, compile, fsdp=fsdp, amp=amp), model


def wrap_model(model: torch.nn.Module, device: torch.device, distributed: bool, compile: bool,
               fsdp: bool = False, amp: str = "none") -> torch.nn.Module:
    """FSDP2 (util/sharding.py) with `fsdp`; otherwise DDP around the model when distributed (no
    unused-parameter search), then torch.compile if asked."""
    if fsdp:
        log(f"Sharding the model with FSDP2 over {get_world_size()} process(es), compute in "
            f"{'fp32' if amp == 'none' else amp}, gradients reduced in fp32")
        return shard_model(model, device, amp)
    if distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compile:
        log("Compiling the model with torch.compile (the first steps are slower)")
        model = torch.compile(model)
    return model


def train_loader(args: Any, dataset: Any, dali_aug: Any, device: torch.device) -> Any:
    """The training loader of --data_loader (util/dali.py make_train_loader); refuses an --accum_iter that no
    epoch reaches, which would train nothing."""
    loader = make_train_loader(args.data_loader, dataset, dali_aug, args.batch_size, args.num_workers, args.pin_mem,
                               args.seed, device)
    if len(loader) < args.accum_iter:
        raise UserError(f"--accum_iter {args.accum_iter} is more than the {len(loader)} batch(es) of an epoch "
                        f"({len(dataset)} images, --batch_size {args.batch_size} x {get_world_size()} process(es)): "
                        f"no optimizer step would run; lower --accum_iter to at most {len(loader)} (or --batch_size)")
    return loader


def position_in_epoch(resumed: Optional[Dict[str, Any]], dataset: Any, args: Any) -> Optional[EpochPosition]:
    """Where training continues inside its first epoch, from the checkpoint util.resume.restore returned
    (None to start that epoch from its beginning); the checkpoint itself can then be dropped."""
    return epoch_position(resumed, data_fingerprint(dataset), args.batch_size, args.accum_iter)


def tensorboard_writer(log_dir: str, start_epoch: int, position: Optional[EpochPosition] = None,
                       steps_per_epoch: int = 1, enabled: bool = True):
    """SummaryWriter on rank 0 (None elsewhere, without a log_dir, or when not enabled).

    A resumed run drops the events from where it continues (start_epoch, or the step inside it), which
    it is about to write again.
    """
    if not enabled or not log_dir or not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter  # tensorboard is slow to import: only when used

    os.makedirs(log_dir, exist_ok=True)
    start = start_epoch + (position.step / max(steps_per_epoch, 1) if position is not None else 0)
    return SummaryWriter(log_dir=log_dir, purge_step=int(start * 1000) if start > 0 else None)


def train_loop(args: Any, *, model: torch.nn.Module, model_without_ddp: torch.nn.Module,
               optimizer: torch.optim.Optimizer, loss_scaler: Any, data_loader_train: DataLoader,
               train_one_epoch: Callable[..., Dict[str, float]],
               evaluate: Optional[Callable[[int], Dict[str, float]]] = None,
               log_writer: Any = None, numbered_every: int = 1,
               extra_log: Optional[Dict[str, Any]] = None, position: Optional[EpochPosition] = None,
               monitor: Optional[Callable[[int], Dict[str, float]]] = None) -> None:
    """Train from args.start_epoch to args.epochs (or --stop_epoch): train, evaluate, log, save, per epoch.

    On SIGTERM / SIGUSR1 / SIGUSR2 every rank finishes the optimizer step it is in, checkpoint-last.pth
    records the position inside the epoch, and Preempted is raised (after submitit's requeue handler,
    where there is one); with --save_every_minutes the same position is saved every M minutes.

    Args:
        args: the resolved run settings; saved in every checkpoint, not changed.
        train_one_epoch: (epoch, position=, after_step=) -> training stats (see util/engine_loop.py).
        evaluate: epoch -> test stats, or None for no evaluation.
        numbered_every: write checkpoint-{epoch}.pth every this many epochs and at the last one.
        extra_log: constant entries for every log.txt line (e.g. n_parameters).
        position: where to continue inside the first epoch (position_in_epoch), or None.
        monitor: epoch -> numbers logged as they are named (e.g. knn_acc1), or None.
    """
    log_path = os.path.join(args.output_dir, "log.txt") if args.output_dir else None
    if not epochs_left(args):
        until = f"--stop_epoch {args.stop_epoch}" if end_epoch(args) < args.epochs else f"{args.epochs} epochs"
        log(f"Nothing to train: {args.start_epoch} epoch(s) done, this run stops after {until}.")
        return
    log(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    last_epoch = end_epoch(args)
    sampler = data_loader_train.sampler
    fingerprint: List[str] = []  # of the training set, hashed at the first mid-epoch save only

    with StopGuard(getattr(args, "save_every_minutes", None), getattr(args, "dist_timeout", 30)) as guard:
        def step_hook(epoch: int) -> AfterStep:
            def after_step(step: int, metric_logger: MetricLogger, check_losses: Callable[[], None]) -> None:
                signum, due = guard.poll()
                if not (signum or due):
                    return
                check_losses()  # never save a position reached through a NaN
                if not fingerprint:
                    fingerprint.append(data_fingerprint(data_loader_train.dataset))
                save_position(args, epoch, step, model, model_without_ddp, optimizer, loss_scaler, sampler.order(),
                              metric_logger.totals(), fingerprint[0])
                guard.saved()
                if signum:
                    guard.barrier()  # rank 0 has written the file before any rank exits
                    guard.stop(signum, epoch, step, saved=bool(args.output_dir))
            return after_step

        for epoch in range(args.start_epoch, last_epoch):
            sampler.set_epoch(epoch)
            here = position if position is not None and position.epoch == epoch else None
            if here is not None:
                sampler.resume_from(here.order, here.step * data_loader_train.batch_size)
            train_stats = train_one_epoch(epoch, position=here, after_step=step_hook(epoch))
            test_stats = evaluate(epoch) if evaluate is not None else {}
            monitored = monitor(epoch) if monitor is not None else {}
            skipped = getattr(data_loader_train.dataset, "skipped", 0)
            if skipped:
                warn(f"epoch {epoch}: {skipped} unreadable training image(s) skipped so far (see the warnings "
                     f"above; --strict_data stops at the first)")

            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                         **{f"test_{k}": v for k, v in test_stats.items()},
                         **monitored, "epoch": epoch, **(extra_log or {})}
            if log_path and is_main_process():
                if log_writer is not None:
                    log_writer.flush()
                with open(log_path, mode="a", encoding="utf-8") as f:
                    f.write(json.dumps(log_stats) + "\n")
            numbered = epoch % numbered_every == 0 or epoch + 1 == args.epochs
            save_epoch(args, epoch, model, model_without_ddp, optimizer, loss_scaler, numbered)
            guard.saved()
            signum, _ = guard.poll()  # a signal during evaluation or saving: stop at this epoch boundary
            if signum and epoch + 1 < last_epoch:
                guard.stop(signum, epoch + 1, 0, saved=bool(args.output_dir))

    total_time = time.time() - start_time
    log("Training time {}".format(str(datetime.timedelta(seconds=int(total_time)))))
