"""A run's state across restarts: what is saved each epoch, where a rerun continues, and exactly how.

- `save_model` / `load_model`: the reference's checkpoint entry points (re-exported by util.misc); they take the
  run's flags (`args`: settings.args of a run, util/settings.py) and write the whole record into each file.
- `resolve_resume`: --resume, or the run in --output_dir when it is this run (auto-resume, util/runs.py), and
  the epoch the run starts at.
- `restore`: load that checkpoint into the model, optimizer and scaler, and every rank's random state.
- `save_epoch`: checkpoint-last.pth each epoch, checkpoint-{epoch}.pth as a hard link of it when due.
- `save_position` / `epoch_position`: checkpoint-last.pth in the middle of an epoch (on a stop signal or
  every --save_every_minutes) and, on resume, where this rank continues inside that epoch.
- `truncate_log` and `remove_stale_temp_files`: a rerun repeats no log line and keeps no partial file.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from util.checkpoint import atomic_save, load_checkpoint, load_state_dict_strict, to_plain
from util.distributed import all_gather_objects, broadcast_object, get_rank, get_world_size, is_main_process
from util.errors import CheckpointError
from util.logger import log, warn
from util.runs import (changed, check_explicit_resume, check_folder, check_log_dir, check_resumable,
                       read_folder)
from util.rng import get_rng_state, set_rng_state
from util.sharding import full_state_dicts, load_optimizer_state


# ----------------------------------------------------------------------------
# the reference's save_model / load_model

def save_model(args: Any, epoch: int, model: torch.nn.Module, model_without_ddp: torch.nn.Module,
               optimizer: torch.optim.Optimizer, loss_scaler: Any, name: Optional[str] = None,
               extra: Optional[Dict[str, Any]] = None) -> Optional[Path]:
    """Write output_dir/checkpoint-{name or epoch}.pth atomically on rank 0; return its path.

    The model and optimizer are saved unsharded in either case (with --fsdp they are gathered first, so
    every rank must call this; util/sharding.py).
    """
    if not args.output_dir:
        return None
    path = Path(args.output_dir) / f"checkpoint-{name if name is not None else epoch}.pth"
    model_state, optimizer_state = full_state_dicts(model_without_ddp, optimizer)
    to_save = {
        "model": model_state,
        "optimizer": optimizer_state,
        "epoch": epoch,
        "scaler": loss_scaler.state_dict() if loss_scaler is not None else {},
        "args": to_plain(args),
    }
    if extra:
        to_save.update(extra)
    if is_main_process():
        atomic_save(to_save, path)
    return path


def load_training_state(resume: str, model_without_ddp: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                        loss_scaler: Any, eval_only: bool = False) -> Optional[Dict[str, Any]]:
    """Load checkpoint `resume`: the model strictly; unless eval_only, the optimizer and the scaler.

    Returns the loaded checkpoint dict (or None when `resume` is empty).
    """
    if not resume:
        return None
    checkpoint = load_checkpoint(resume)
    if "model" not in checkpoint:
        raise CheckpointError(f"{resume} has no 'model' entry; is it a training checkpoint?")
    load_state_dict_strict(model_without_ddp, checkpoint["model"], resume)
    log(f"Resume checkpoint {resume}")
    if "optimizer" in checkpoint and "epoch" in checkpoint and not eval_only:
        if optimizer is not None:
            load_optimizer_state(model_without_ddp, optimizer, checkpoint["optimizer"], resume)
        if "scaler" in checkpoint and loss_scaler is not None:
            loss_scaler.load_state_dict(checkpoint["scaler"])
        log("With optim & sched!")
    return checkpoint


def load_model(args: Any, model_without_ddp: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
               loss_scaler: Any) -> Optional[Dict[str, Any]]:
    """The reference's: resume from args.resume (load_training_state) and, unless args.eval, set
    args.start_epoch to the checkpoint's epoch + 1. Returns the loaded checkpoint dict (or None)."""
    eval_only = vars(args).get("eval", False)  # the reference's pre-training flags have no --eval
    checkpoint = load_training_state(args.resume, model_without_ddp, optimizer, loss_scaler, eval_only)
    if checkpoint is not None and "optimizer" in checkpoint and "epoch" in checkpoint and not eval_only:
        args.start_epoch = checkpoint["epoch"] + 1
    return checkpoint


# ----------------------------------------------------------------------------
# where a run continues

def resolve_resume(resume: str, output_dir: str, auto_resume: bool, eval_only: bool, start_epoch: int,
                   entry: str = "", settings: Optional[Dict[str, Any]] = None, overwrite: bool = False,
                   log_dir: str = "") -> Tuple[str, int]:
    """(checkpoint to resume from, epoch the run starts at), before anything is built or written.

    With `settings` (the run's resolved args as a plain dict) and `entry` (its entry point), the run identity
    is enforced (util/runs.py): an empty `resume` with `auto_resume` continues the run in `output_dir` only
    when it is a run of the same entry point and run-defining settings, and any other run in the folder (or
    in a separate `log_dir`) is a one-line error naming what it holds, which flags differ and the ways out,
    unless `overwrite` (its files are then deleted when training starts, util/runner.py). An explicit
    `resume` continues that checkpoint on purpose: a checkpoint of another entry point is an error,
    differing settings a warning. The start epoch is the checkpoint's epoch + 1 when it holds training
    state; otherwise `start_epoch` unchanged. Without `settings` only the newest checkpoint is picked
    (library use).
    """
    if eval_only:  # evaluation writes nothing into output_dir and never auto-resumes
        if resume and entry:
            check_resumable(load_checkpoint(resume, mmap=True), resume, entry, eval_only=True)
        return resume, start_epoch
    folder = None
    if output_dir:
        # rank 0 reads, so that every rank decides alike and resumes from the same file
        folder = broadcast_object(read_folder(output_dir) if is_main_process() else None)
    if settings is not None and log_dir and os.path.abspath(log_dir) != os.path.abspath(output_dir or "."):
        check_log_dir(broadcast_object(read_folder(log_dir) if is_main_process() else None), log_dir, output_dir)
    checkpoint = None
    if resume:
        if settings is not None:
            resume, checkpoint = check_explicit_resume(resume, folder, output_dir, entry, settings, overwrite)
        else:
            checkpoint = load_checkpoint(resume, mmap=True)
    elif folder is not None and settings is not None:
        check_folder(folder, output_dir, auto_resume, entry, settings, overwrite)
        if folder.checkpoint is not None and not overwrite:
            resume = folder.checkpoint
    elif folder is not None and auto_resume and folder.checkpoint is not None:
        resume = folder.checkpoint
    if resume and checkpoint is None:
        log(f"Auto-resuming from {resume} (pass --no_auto_resume to start afresh)")
        checkpoint = load_checkpoint(resume, mmap=True)
        if settings is not None:
            moved = changed(checkpoint.get("args") or {}, settings)
            if moved:
                log(f"Continuing with changed settings that may change on resume: {', '.join(moved)}")
    if checkpoint is not None and "optimizer" in checkpoint and "epoch" in checkpoint:
        start_epoch = int(checkpoint["epoch"]) + 1
    return resume, start_epoch


def restore(resume: str, eval_only: bool, model_without_ddp: torch.nn.Module,
            optimizer: Optional[torch.optim.Optimizer], loss_scaler: Any) -> Optional[Dict[str, Any]]:
    """load_training_state, then every rank's random state when the checkpoint has one per process (the
    start epoch was resolved with the settings, util/settings.py)."""
    checkpoint = load_training_state(resume, model_without_ddp, optimizer, loss_scaler, eval_only)
    if checkpoint is not None and "rng" in checkpoint and not eval_only:
        states = checkpoint["rng"]
        if len(states) == get_world_size():
            set_rng_state(states[get_rank()])
        else:
            warn(f"checkpoint holds random states for {len(states)} processes, this run has "
                 f"{get_world_size()}: continuing with fresh random streams")
    return checkpoint


# ----------------------------------------------------------------------------
# what is written each epoch

def save_epoch(args: Any, epoch: int, model: torch.nn.Module, model_without_ddp: torch.nn.Module,
               optimizer: torch.optim.Optimizer, loss_scaler: Any, numbered: bool,
               extra_state: Optional[Dict[str, Any]] = None) -> None:
    """checkpoint-last.pth every epoch; checkpoint-{epoch}.pth too when `numbered` (a hard link).

    A collective in distributed runs (every rank's random state goes into the file).
    """
    rng = all_gather_objects(get_rng_state())
    if not args.output_dir:
        return
    last = save_model(args, epoch, model, model_without_ddp, optimizer, loss_scaler,
                      name="last", extra={"rng": rng, **(extra_state or {})})
    if numbered and is_main_process():
        target = Path(args.output_dir) / f"checkpoint-{epoch}.pth"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            os.link(last, tmp)
        except OSError:  # no hard links on this filesystem: write a copy
            atomic_save(torch.load(last, map_location="cpu", weights_only=True), target)
        else:
            os.replace(tmp, target)


@dataclass
class EpochPosition:
    """Where this rank continues inside an epoch, from a mid-epoch checkpoint."""

    epoch: int
    step: int  # batches already trained in this epoch (an optimizer-step boundary)
    order: List[int]  # this rank's sample order for the whole epoch
    meters: Dict[str, List[float]]  # meter -> [total, count] so far, for an honest epoch average
    rng: Dict[str, Any]  # this rank's random state at that step


def data_fingerprint(dataset: Any) -> str:
    """A hash of the training set's file list and labels (the source's own `fingerprint()` where it has one, its
    size where it has neither)."""
    if hasattr(dataset, "fingerprint"):
        return dataset.fingerprint()
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return f"len:{len(dataset)}"
    digest = hashlib.sha1()
    root = str(getattr(dataset, "root", ""))
    for path, target in samples:
        digest.update(f"{os.path.relpath(path, root) if root else path}\t{target}\n".encode())
    return digest.hexdigest()


def save_position(args: Any, epoch: int, step: int, model: torch.nn.Module, model_without_ddp: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, loss_scaler: Any, order: List[int],
                  meters: Dict[str, List[float]], data: str, extra_state: Optional[Dict[str, Any]] = None) -> None:
    """checkpoint-last.pth in the middle of `epoch`, after `step` batches (a collective in distributed runs).

    The reference's entries keep their meaning (`epoch` is the last finished one, so other tools see
    the end of epoch - 1); `position` adds the step, every rank's sample order and meters, the batch
    layout and a fingerprint of the training set (`data_fingerprint`), to notice changes; `rng` holds
    every rank's state at that step.
    """
    per_rank = all_gather_objects({"rng": get_rng_state(), "order": torch.tensor(order, dtype=torch.int64),
                                   "meters": meters})
    if not args.output_dir:
        return
    position = {"epoch": epoch, "step": step, "data": data, "world_size": len(per_rank),
                "batch_size": args.batch_size, "accum_iter": args.accum_iter,
                "order": [r["order"] for r in per_rank], "meters": [r["meters"] for r in per_rank]}
    save_model(args, epoch - 1, model, model_without_ddp, optimizer, loss_scaler, name="last",
               extra={"rng": [r["rng"] for r in per_rank], "position": position, **(extra_state or {})})


def epoch_position(checkpoint: Optional[Dict[str, Any]], data: str, batch_size: int,
                   accum_iter: int) -> Optional[EpochPosition]:
    """This rank's position inside an epoch from a mid-epoch checkpoint, or None.

    None, with a warning, when the training set, the number of processes, --batch_size or --accum_iter
    changed since it was saved: the epoch then starts again from its beginning (with the saved weights)
    instead of indexing a stale order.
    """
    position = (checkpoint or {}).get("position")
    if not position:
        return None
    epoch = position["epoch"]
    changes = [what for what, same in (
        ("the training set (images added, removed or renamed)", position["data"] == data),
        (f"the number of processes ({position['world_size']} -> {get_world_size()})",
         position["world_size"] == get_world_size()),
        (f"--batch_size ({position['batch_size']} -> {batch_size})", position["batch_size"] == batch_size),
        (f"--accum_iter ({position['accum_iter']} -> {accum_iter})", position["accum_iter"] == accum_iter),
    ) if not same]
    if changes:
        warn(f"checkpoint-last.pth stopped inside epoch {epoch}, but {' and '.join(changes)} changed since: "
             f"restarting epoch {epoch} from its beginning")
        return None
    rank = get_rank()
    log(f"Continuing epoch {epoch} at step {position['step']}")
    return EpochPosition(epoch, int(position["step"]), position["order"][rank].tolist(),
                         position["meters"][rank], checkpoint["rng"][rank])


def truncate_log(path: str, start_epoch: int) -> None:
    """Drop log lines of epochs >= start_epoch (they are about to be trained again)."""
    if not os.path.exists(path):
        return
    kept: List[str] = []
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
