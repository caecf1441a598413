"""What the training entry points share around their loops: setup, model preparation, and `Run`.

Each `main_*.py` reads as the reference's: it resolves its settings (`setup`), builds the model, data,
optimizer and loss scaler, then runs the epochs (pre-training in main_pretrain.py; fine-tuning and linear
probing in their shared util.classification.train_and_evaluate),

    run = Run(settings, model, model_without_ddp, optimizer, loss_scaler, data_loader_train)
    with run:
        for epoch in run.epochs():
            train_stats = train_one_epoch(..., position=run.position(epoch), stop=run)
            run.end_epoch(epoch, train_stats, ...)

and `Run` does what the reference's loop did around the engine (resume, log.txt, checkpoints) plus
ours: exact mid-epoch positions, stop signals and the rerun of a finished run.
"""
import datetime
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.backends.cudnn as cudnn

import util.tracking as tracking
from util.checkpoint import load_pretrained, to_plain
from util.config import Settings
from util.distributed import get_world_size, is_main_process
from util.engine_loop import StepBoundary
from util.errors import NonFiniteLossError, UserError
from util.logger import log, warn
from util.metrics import MetricLogger
from util.preemption import StopGuard
from util.resume import (EpochPosition, data_fingerprint, epoch_position, load_training_state,
                         remove_stale_temp_files, restore, save_epoch, save_position, truncate_log)
from util.runs import remove_run
from util.settings import resolve_settings
from util.sharding import shard_model


def setup(args: Any, entry: str, resolved: Optional[Mapping[str, Any]] = None) -> Settings:
    """The run settings of entry point `entry` (util/settings.py), logged; every rank seeded --seed + rank.

    Nothing is written here: a training run writes its files when `Run` starts, once everything it
    needs has been checked and built.
    """
    settings = resolve_settings(args, entry, resolved)
    log(f"job dir: {os.path.dirname(os.path.dirname(os.path.realpath(__file__)))}")
    log("{}".format(settings.args).replace("FrozenArgs(", "Namespace(").replace(", ", ",\n"))

    # fix the seed for reproducibility
    seed = settings.data.seed + settings.dist.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    cudnn.benchmark = True
    return settings


def start_run(settings: Settings) -> None:
    """The first write of a training run, on rank 0, after the data, model and resume state are ready.

    With --overwrite the run files of --output_dir (and its TensorBoard events, when --log_dir is the same
    folder) are deleted first; then log lines of the epochs about to be trained again are dropped, temporary
    files of a killed run removed, and args.json written: every setting resolved, the `args` of each checkpoint
    this run writes.
    """
    ckpt = settings.ckpt
    if not ckpt.output_dir or not is_main_process() or not settings.optim.epochs_left:
        return  # a finished run's rerun changes nothing
    Path(ckpt.output_dir).mkdir(parents=True, exist_ok=True)
    if ckpt.overwrite:
        removed = remove_run(ckpt.output_dir, ckpt.log_dir)
        if removed:
            log(f"--overwrite: deleted {len(removed)} file(s) of the earlier run in {ckpt.output_dir}")
    truncate_log(os.path.join(ckpt.output_dir, "log.txt"), settings.optim.start_epoch)
    remove_stale_temp_files(ckpt.output_dir)
    with open(os.path.join(ckpt.output_dir, "args.json"), "w") as f:
        json.dump(to_plain(settings.args), f, indent=2)


def eval_weights(settings: Settings, model: torch.nn.Module) -> None:
    """--eval: the weights to evaluate. --resume is loaded strictly later (util.resume.restore); otherwise
    --finetune's classifier is loaded by the fine-tuning rules (any format, position table resized) and must
    bring its trained head: a pre-training checkpoint has none."""
    resume, finetune = settings.ckpt.resume, settings.model.finetune
    if resume:
        if finetune:
            warn(f"--eval evaluates --resume {resume}; --finetune {finetune} is not used")
        return
    load_pretrained(model, finetune, settings.model.global_pool, with_head=True)


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


def position_in_epoch(resumed: Optional[Dict[str, Any]], dataset: Any, batch_size: int,
                      accum_iter: int) -> Optional[EpochPosition]:
    """Where training continues inside its first epoch, from the checkpoint util.resume.restore returned
    (None to start that epoch from its beginning); the checkpoint itself can then be dropped."""
    return epoch_position(resumed, data_fingerprint(dataset), batch_size, accum_iter)


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


def wandb_run(settings: Settings) -> Optional[Any]:
    """The W&B run of --wandb (rank 0), or None."""
    c = settings.ckpt
    if not c.wandb or not is_main_process():
        return None
    name = c.wandb_name or os.path.basename(os.path.normpath(c.output_dir)) or None
    return tracking.start_wandb(c.wandb_project, name, c.wandb_mode, c.output_dir, to_plain(vars(settings.args)))


class Run(StepBoundary):
    """The epochs of a training run: resume, TensorBoard, log.txt, checkpoints, stop signals.

    Built once the model, optimizer, scaler and training loader exist: it restores --resume (or the run being
    continued) into them, finds where the first epoch continues, writes the run's first files (`start_run`)
    and opens the TensorBoard writer. Use as a context manager around the epoch loop: on SIGTERM / SIGUSR1 /
    SIGUSR2 every rank finishes the optimizer step it is in, checkpoint-last.pth records the position inside
    the epoch, and Preempted is raised (after submitit's requeue handler, where there is one); with
    --save_every_minutes the same position is saved every M minutes.
    """

    def __init__(self, settings: Settings, model: torch.nn.Module, model_without_ddp: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, loss_scaler: Any, data_loader_train: Any,
                 extra_log: Optional[Dict[str, Any]] = None, extras: Optional[Dict[str, Any]] = None):
        self.settings, self.model, self.model_without_ddp = settings, model, model_without_ddp
        self.optimizer, self.loss_scaler, self.loader = optimizer, loss_scaler, data_loader_train
        self.extra_log = extra_log or {}
        # more state that checkpoints carry: name -> object with checkpoint_state() / load_checkpoint_state()
        self.extras = extras or {}
        self.optim, self.ckpt = settings.optim, settings.ckpt
        resumed = restore(settings.ckpt.resume, False, model_without_ddp, optimizer, loss_scaler)
        for name, part in self.extras.items():
            if resumed is not None and name in resumed:
                part.load_checkpoint_state(resumed[name])
            elif resumed is not None:
                log(f"{settings.ckpt.resume} holds no {name} state: it starts afresh")
        self.first_position = position_in_epoch(resumed, data_loader_train.dataset, settings.data.batch_size,
                                                settings.optim.accum_iter)
        del resumed  # the position is all the loop needs: do not hold the checkpoint's tensors
        start_run(settings)
        self.log_writer = tracking.writers(
            tensorboard_writer(self.ckpt.log_dir, self.optim.start_epoch, self.first_position,
                               len(data_loader_train), enabled=self.optim.epochs_left > 0),
            wandb_run(settings) if self.optim.epochs_left > 0 else None)
        self.log_path = os.path.join(self.ckpt.output_dir, "log.txt") if self.ckpt.output_dir else None
        self.guard = StopGuard(self.ckpt.save_every_minutes, settings.dist.dist_timeout)
        self._fingerprint: List[str] = []  # of the training set, hashed at the first mid-epoch save only
        self.rollbacks = 0  # --nan_policy rollback: how many this run did

    def __enter__(self) -> "Run":
        self.guard.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.guard.__exit__(*exc)
        if self.log_writer is not None:
            self.log_writer.close()

    def epochs(self) -> Iterator[int]:
        """The epochs this run trains (from the resumed one to --epochs or --stop_epoch), each with the sampler's
        order set (and, for a stopped epoch, continued where it stopped)."""
        optim = self.optim
        if not optim.epochs_left:
            until = f"--stop_epoch {optim.stop_epoch}" if optim.end_epoch < optim.epochs else f"{optim.epochs} epochs"
            log(f"Nothing to train: {optim.start_epoch} epoch(s) done, this run stops after {until}.")
            return
        log(f"Start training for {optim.epochs} epochs")
        start_time = time.time()
        sampler = self.loader.sampler
        for epoch in range(optim.start_epoch, optim.end_epoch):
            sampler.set_epoch(epoch)
            here = self.position(epoch)
            if here is not None:
                sampler.resume_from(here.order, here.step * self.loader.batch_size)
            yield epoch
        log("Training time {}".format(str(datetime.timedelta(seconds=int(time.time() - start_time)))))

    def rollback(self, epoch: int, step: int, loss: float, lr: float) -> None:
        """--nan_policy rollback: the model, optimizer, loss scaler and extras back to checkpoint-last.pth (every
        rank: the NaN check agreed across them); the data goes on with the next batch."""
        path = os.path.join(self.ckpt.output_dir, "checkpoint-last.pth") if self.ckpt.output_dir else ""
        limit = self.optim.nan_max_rollbacks
        if not path or not os.path.isfile(path):
            raise NonFiniteLossError(epoch, step, lr, loss, why="; no checkpoint to roll back to yet "
                                     "(--nan_policy rollback needs a saved epoch or --save_every_minutes position)")
        if self.rollbacks >= limit:
            raise NonFiniteLossError(epoch, step, lr, loss, why=f"; {self.rollbacks} rollback(s) already "
                                     f"(--nan_max_rollbacks {limit})")
        self.rollbacks += 1
        saved = load_training_state(path, self.model_without_ddp, self.optimizer, self.loss_scaler)
        for name, part in self.extras.items():
            if name in saved:
                part.load_checkpoint_state(saved[name])
        where = saved.get("position")
        state = f"epoch {where['epoch']}, step {where['step']}" if where else f"the end of epoch {saved['epoch']}"
        warn(f"non-finite loss ({loss}) at epoch {epoch}, step {step}: rolled back to {path} ({state}), going on with "
             f"the next batch (--nan_policy rollback, {self.rollbacks} of {limit})")

    def extra_state(self) -> Dict[str, Any]:
        """The checkpoint entries of `extras` (e.g. 'online_probe')."""
        return {name: part.checkpoint_state() for name, part in self.extras.items()}

    def position(self, epoch: int) -> Optional[EpochPosition]:
        """Where `epoch` continues (a stopped epoch of the resumed checkpoint), or None to run it whole."""
        here = self.first_position
        return here if here is not None and here.epoch == epoch else None

    def step_done(self, epoch: int, step: int, meters: MetricLogger, check_losses: Callable[[], None]) -> None:
        """At an optimizer-step boundary: on a stop signal or when a --save_every_minutes save is due, save the
        position inside the epoch (a collective), and on a signal stop."""
        signum, due = self.guard.poll()
        if not (signum or due):
            return
        check_losses()  # never save a position reached through a NaN
        if not self._fingerprint:
            self._fingerprint.append(data_fingerprint(self.loader.dataset))
        save_position(self.settings.args, epoch, step, self.model, self.model_without_ddp, self.optimizer,
                      self.loss_scaler, self.loader.sampler.order(), meters.totals(), self._fingerprint[0],
                      self.extra_state())
        self.guard.saved()
        if signum:
            self.guard.barrier()  # rank 0 has written the file before any rank exits
            self.guard.stop(signum, epoch, step, saved=bool(self.ckpt.output_dir))

    def end_epoch(self, epoch: int, train_stats: Dict[str, float], test_stats: Optional[Dict[str, float]] = None,
                  monitored: Optional[Dict[str, float]] = None, numbered: bool = True) -> None:
        """After an epoch: a line in log.txt, checkpoint-last.pth (checkpoint-{epoch}.pth too when `numbered`, and
        at the last epoch), and a stop here if a signal came during evaluation or saving."""
        skipped = getattr(self.loader.dataset, "skipped", 0)
        if skipped:
            warn(f"epoch {epoch}: {skipped} unreadable training image(s) skipped so far (see the warnings "
                 f"above; --strict_data stops at the first)")
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in (test_stats or {}).items()},
                     **(monitored or {}), "epoch": epoch, **self.extra_log}
        if self.log_path and is_main_process():
            if self.log_writer is not None:
                self.log_writer.flush()
            with open(self.log_path, mode="a", encoding="utf-8") as f:
                f.write(json.dumps(log_stats) + "\n")
        if self.log_writer is not None:
            self.log_writer.epoch_row(log_stats)
        last = epoch + 1 == self.optim.epochs
        save_epoch(self.settings.args, epoch, self.model, self.model_without_ddp, self.optimizer, self.loss_scaler,
                   numbered or last, self.extra_state())
        self.guard.saved()
        signum, _ = self.guard.poll()  # a signal during evaluation or saving: stop at this epoch boundary
        if signum and epoch + 1 < self.optim.end_epoch:
            self.guard.stop(signum, epoch + 1, 0, saved=bool(self.ckpt.output_dir))
