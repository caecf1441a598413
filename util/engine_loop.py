"""What an epoch of either engine does around its forward pass: `EpochSteps`.

engine_pretrain.train_one_epoch and engine_finetune.train_one_epoch hold their step (batch to the device,
forward under autocast, the model's or the criterion's loss) and call down into an EpochSteps for the rest:

- `batches(loader)`: (step, batch) pairs, continuing a stopped epoch from its saved position (step numbers,
  meters and random state carry on as if never interrupted), with the console progress line;
- `micro_step(step)`: the lr schedule at the start of each accumulation, and no gradient reduction on the
  micro-steps inside it (DDP no_sync, FSDP set_requires_gradient_sync);
- `backward(loss)`: the loss scaler's backward (loss / accum_iter), clipping and the optimizer step at the
  accumulation boundary (a plain backward and step without fp16), then the meters, the deferred NaN check
  and buffered TensorBoard scalars (nothing waits for the device between console prints), and at each
  optimizer-step boundary `stop.step_done` (util/runner.py: saves the position and stops on a signal);
- `finish()`: the epoch's averages over all processes.

The NaN check, the meters and TensorBoard see each step's loss widened to fp64 on the device
(util.metrics.widen), whatever its dtype.
"""
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

import util.lr_sched as lr_sched
from util.distributed import all_reduce_mean
from util.errors import NonFiniteLossError
from util.logger import log, warn
from util.metrics import MetricLogger, SmoothedValue, widen
from util.precision import autocast
from util.resume import EpochPosition
from util.rng import set_rng_state
from util.sharding import gradient_sync


NAN_POLICIES = ("stop", "skip", "rollback")
CONSOLE_ONLY = ("grad_norm",)  # meters printed (and in TensorBoard) but kept out of log.txt, whose keys are the reference's


class NanPolicy:
    """--nan_policy: what a step whose loss (or, without fp16's loss scaler, whose gradients) is not finite does.

    'stop' (the reference's): the run stops with one line (checked at print boundaries, without a per-step sync).
    'skip': that update is dropped (no optimizer step; the loss is kept out of the averages), a line and a
    TensorBoard mark ('nan_skipped') say so, and the run stops after `max_skips` such updates in a row.
    'rollback': that update is dropped too, then the model, optimizer, loss scaler (and the online probe) are
    restored from checkpoint-last.pth (StepBoundary.rollback: util/runner.py) and the epoch goes on with the next
    batch; after `max_rollbacks` rollbacks the run stops. Both read each update's loss and gradient norm back (one
    host sync per step). Under fp16 non-finite gradients with a finite loss are the loss scaler's business (it
    skips the step and lowers the scale), not a NaN event.
    """

    def __init__(self, policy: str = "stop", max_skips: int = 5, max_rollbacks: int = 3):
        if policy not in NAN_POLICIES:
            raise ValueError(f"--nan_policy must be one of {', '.join(NAN_POLICIES)}, got {policy}")
        self.policy, self.max_skips, self.max_rollbacks = policy, max_skips, max_rollbacks
        self.in_a_row, self.skipped = 0, 0

    @property
    def checks(self) -> bool:
        """Whether every update is checked (skip, rollback) instead of only at print boundaries (stop)."""
        return self.policy != "stop"

    @classmethod
    def of(cls, args: Any) -> "NanPolicy":
        """The policy of a run's flags (the reference's namespaces have none: 'stop')."""
        flags = vars(args)
        return cls(flags.get("nan_policy") or "stop", int(flags.get("nan_max_skips") or 5),
                   int(flags.get("nan_max_rollbacks") or 3))


def block_grad_norms(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Gradient 2-norm of each block ('blocks.3', 'decoder_blocks.0') and of the other top-level parts
    ('patch_embed', 'head', ...), on the device (no host sync)."""
    squares: Dict[str, List[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        parts = name.split(".")
        if parts[0] in ("module", "_orig_mod"):  # DDP / torch.compile wrappers
            parts = parts[1:]
        key = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        grad = p.grad.detach()
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        squares.setdefault(key, []).append(grad.float().pow(2).sum())
    return {k: torch.stack(v).sum().sqrt() for k, v in squares.items()}


class StepBoundary:
    """What an EpochSteps tells at every optimizer-step boundary (util.runner.Run implements it)."""

    def step_done(self, epoch: int, step: int, meters: MetricLogger, check_losses: Callable[[], None]) -> None:
        """`step` batches of `epoch` are done; `check_losses` raises if a loss since the last check was not
        finite."""

    def rollback(self, epoch: int, step: int, loss: float, lr: float) -> None:
        """--nan_policy rollback: the update after `step` batches of `epoch` was not finite; restore the last
        good state (or raise NonFiniteLossError when there is none, or after too many rollbacks)."""
        raise NonFiniteLossError(epoch, step, lr, loss)


class LossWatch:
    """Checks losses for NaN/inf in batches, so that no step waits for the device.

    `add` records a step's loss tensor; `check` (at print boundaries and at the end of the epoch)
    reads them back once and raises NonFiniteLossError naming the first bad step.
    """

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.pending: List[Tuple[int, torch.Tensor, float]] = []

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.pending.append((step, widen(loss).reshape(()), lr))

    def check(self) -> None:
        if not self.pending:
            return
        values = torch.stack([v for _, v, _ in self.pending]).cpu()
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            step, _, lr = self.pending[i]
            raise NonFiniteLossError(self.epoch, step, lr, values[i].item())
        self.pending.clear()


class ScalarBuffer:
    """TensorBoard scalars kept on the device and written at print boundaries (no per-step sync)."""

    def __init__(self, log_writer: Any):
        self.log_writer = log_writer
        self.rows: List[Tuple[str, Any, int]] = []

    def add(self, tag: str, value: Any, step: int) -> None:
        if self.log_writer is not None:
            self.rows.append((tag, value.detach() if torch.is_tensor(value) else value, step))

    def flush(self) -> None:
        rows = [(tag, float(value), step) for tag, value, step in self.rows]
        if hasattr(self.log_writer, "add_step_scalars"):  # util.tracking.Writers: TensorBoard and W&B
            self.log_writer.add_step_scalars(rows)
        else:
            for tag, value, step in rows:
                self.log_writer.add_scalar(tag, value, step)
        self.rows.clear()


class _Started:
    """A loader's iterator, started, that still knows how many batches it has left (for the progress line)."""

    def __init__(self, iterator: Iterator, length: int):
        self.iterator, self.length = iterator, length

    def __iter__(self) -> Iterator:
        return self.iterator

    def __len__(self) -> int:
        return self.length


class EpochSteps:
    """One epoch of optimisation around an engine's forward pass (see the module docstring).

    Args:
        args: accum_iter, amp, print_freq and the lr schedule fields (lr, min_lr, warmup_epochs, epochs).
        loss_tag: TensorBoard tag of the loss ('train_loss' for pre-training, 'loss' for fine-tuning).
        clip_grad: max gradient norm, or None (or 0) for no clipping.
        position: continue this epoch after position.step batches (the loader yields only the rest).
        stop: told at every optimizer-step boundary (StepBoundary), or None.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_scaler: Any, epoch: int,
                 args: Any, log_writer: Optional[Any] = None, loss_tag: str = "loss",
                 clip_grad: Optional[float] = None, position: Optional[EpochPosition] = None,
                 stop: Optional[StepBoundary] = None):
        self.model, self.optimizer, self.loss_scaler, self.epoch, self.args = model, optimizer, loss_scaler, epoch, args
        self.accum_iter, self.loss_tag, self.position, self.stop = args.accum_iter, loss_tag, position, stop
        self.clip_grad = clip_grad or None
        # every update measures the total gradient norm (clipped or not): the console, log.txt and TensorBoard
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.nan = NanPolicy.of(args)
        self.grad_blocks = bool(vars(args).get("log_grad_blocks"))
        self.log_writer = log_writer
        self.accum_losses: List[torch.Tensor] = []
        self.micro: List[Tuple[int, float, torch.Tensor]] = []  # skip / rollback: an accumulation's earlier micro-steps
        self._block_window = -1
        self.meters = MetricLogger(delimiter="  ")
        self.meters.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
        self.meters.add_meter("grad_norm", SmoothedValue(fmt="{median:.4f} ({global_avg:.4f})"))
        self.watch = LossWatch(epoch)
        self.scalars = ScalarBuffer(log_writer)
        self.num_steps = 0
        self.step = 0
        model.train(True)
        optimizer.zero_grad()
        if log_writer is not None:
            log("log_dir: {}".format(log_writer.log_dir))

    def batches(self, data_loader: Iterable) -> Iterator[Tuple[int, Any]]:
        """(step, batch) over the epoch, or over the rest of a stopped one."""
        start = 0
        batches: Iterable = data_loader
        if self.position is not None:
            start = self.position.step
            self.meters.load_totals(self.position.meters)
            batches = _Started(iter(data_loader), len(data_loader))
            set_rng_state(self.position.rng)  # iter() drew the loader's seed: back to the state at the saved step
        self.num_steps = start + len(data_loader)
        header = "Epoch: [{}]".format(self.epoch)
        return enumerate(self.meters.log_every(batches, self.args.print_freq, header, start=start), start=start)

    @contextmanager
    def micro_step(self, step: int) -> Iterator[None]:
        """One batch's forward and backward: the lr set at the start of an accumulation, and gradients reduced
        over the processes only on the accumulation's last micro-step."""
        self.step = step
        if step % self.accum_iter == 0:  # a per-iteration (instead of per-epoch) lr schedule
            lr_sched.adjust_learning_rate(self.optimizer, step / self.num_steps + self.epoch, self.args)
        # The epoch's last micro-step reduces even without an update: FSDP2 keeps no-sync gradients outside
        # param.grad, where zero_grad() would miss them; reduced, they land in param.grad and the next
        # epoch's zero_grad() discards them, as DDP's leftovers always were.
        with gradient_sync(self.model, self._updates() or step + 1 == self.num_steps):
            yield

    def _updates(self) -> bool:
        return (self.step + 1) % self.accum_iter == 0

    def _skip(self, norm: Optional[torch.Tensor]) -> bool:
        """--nan_policy skip: whether this update's losses (and gradients, without fp16's scaler) are not finite."""
        values = [widen(v).reshape(()) for v in self.accum_losses]
        if norm is not None and not self.loss_scaler.enabled:
            values.append(widen(norm).reshape(()))
        bad = torch.stack(values).isfinite().all().logical_not()
        return bool(all_reduce_mean(bad.double()) > 0)  # one host sync; every rank drops the same update

    def backward(self, loss: torch.Tensor) -> None:
        """Backward (and at the accumulation boundary clip and step), then record the step's loss and lr."""
        step, update_grad = self.step, self._updates()
        skip = self.nan.checks
        if skip:
            self.accum_losses.append(loss.detach())
        skipped = []
        norm = self.loss_scaler(loss / self.accum_iter, self.optimizer, clip_grad=self.clip_grad,
                                parameters=self.trainable, update_grad=update_grad,
                                skip=(lambda n: skipped.append(self._skip(n)) or skipped[-1]) if skip else None)
        if update_grad:
            window = step // self.args.print_freq  # the first update of each --print_freq window
            if self.grad_blocks and self.log_writer is not None and window != self._block_window:
                self._block_window = window
                epoch_1000x = int((step / self.num_steps + self.epoch) * 1000)
                for name, value in block_grad_norms(self.model).items():
                    self.scalars.add(f"grad_norm/{name}", value, epoch_1000x)
            self.optimizer.zero_grad(set_to_none=True)
            self.accum_losses.clear()

        lr = max(group["lr"] for group in self.optimizer.param_groups)
        if skipped and skipped[-1]:
            self._skipped(step, lr, loss)
        elif skip and not update_grad:
            self.micro.append((step, lr, loss.detach()))  # counted with the update that ends the accumulation
        else:
            self.nan.in_a_row = 0 if update_grad else self.nan.in_a_row
            for micro_step, micro_lr, micro_loss in self.micro:
                self._record(micro_step, False, micro_lr, micro_loss, None)
            self._record(step, update_grad, lr, loss, norm)
        if update_grad:
            self.micro.clear()
        if step % self.args.print_freq == 0 or step == self.num_steps - 1:
            self.watch.check()  # the only read-back of the loss between prints
            self.scalars.flush()
        if update_grad and self.stop is not None:
            self.stop.step_done(self.epoch, step + 1, self.meters, self.watch.check)

    def _record(self, step: int, update_grad: bool, lr: float, loss: torch.Tensor,
                norm: Optional[torch.Tensor]) -> None:
        """The step's loss, lr and (at an update) gradient norm into the meters, the NaN check and TensorBoard."""
        loss_value = widen(loss)  # fp64, still on the device: what the NaN check, meters and TensorBoard see
        self.watch.add(step, loss_value, lr)
        self.meters.update(loss=loss_value)
        self.meters.update(lr=lr)
        if update_grad:
            self.meters.update(grad_norm=norm)
            loss_value_reduce = all_reduce_mean(loss_value)  # still a tensor: no host sync
            # x-axis in 1000ths of an epoch, to compare runs with different batch sizes
            epoch_1000x = int((step / self.num_steps + self.epoch) * 1000)
            self.scalars.add(self.loss_tag, loss_value_reduce, epoch_1000x)
            self.scalars.add("lr", lr, epoch_1000x)
            if norm is not None:
                self.scalars.add("grad_norm", norm, epoch_1000x)
            if self.loss_scaler.enabled:
                self.scalars.add("loss_scale", self.loss_scaler.scale(), epoch_1000x)

    def _skipped(self, step: int, lr: float, loss: torch.Tensor) -> None:
        """--nan_policy skip dropped this update: a line, a TensorBoard mark, and a stop after too many in a row
        (rollback: the last good state back, StepBoundary.rollback)."""
        if self.nan.policy == "rollback":
            epoch_1000x = int((step / self.num_steps + self.epoch) * 1000)
            self.scalars.add("nan_rollback", 1.0, epoch_1000x)
            if self.stop is None:
                raise NonFiniteLossError(self.epoch, step, lr, float(widen(loss)))
            self.stop.rollback(self.epoch, step, float(widen(loss)), lr)
            return
        self.nan.in_a_row += 1
        self.nan.skipped += 1
        epoch_1000x = int((step / self.num_steps + self.epoch) * 1000)
        self.scalars.add("nan_skipped", 1.0, epoch_1000x)
        value = float(widen(loss))
        warn(f"skipped the update of epoch {self.epoch}, step {step}: the loss ({value}) or the gradients are not "
             f"finite (--nan_policy skip; {self.nan.in_a_row} in a row, {self.nan.skipped} this epoch)")
        if self.nan.in_a_row >= self.nan.max_skips:
            raise NonFiniteLossError(self.epoch, step, lr, value, skipped=self.nan.in_a_row)

    def finish(self) -> Dict[str, float]:
        """The global averages of the logged meters ('loss', 'lr') over all processes: log.txt's train_* (the
        reference's keys; the gradient norm is printed and in TensorBoard, not in log.txt)."""
        self.watch.check()
        self.scalars.flush()
        self.meters.synchronize_between_processes()
        log("Averaged stats:", self.meters)
        return {k: meter.global_avg for k, meter in self.meters.meters.items() if k not in CONSOLE_ONLY}


def train_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                device: torch.device, epoch: int, loss_scaler: Any,
                compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                args: Any, log_writer: Optional[Any] = None, loss_tag: str = "loss",
                clip_grad: Optional[float] = None, position: Optional[EpochPosition] = None,
                stop: Optional[StepBoundary] = None) -> Dict[str, float]:
    """A EpochSteps around any loss: compute_loss(samples, targets) on the device, under autocast (for a
    loss that is not one of the engines'; they write the same loop with their model's forward)."""
    steps = EpochSteps(model, optimizer, loss_scaler, epoch, args, log_writer, loss_tag, clip_grad, position,
                       stop)
    for step, (samples, targets) in steps.batches(data_loader):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True) if torch.is_tensor(targets) else targets
        with steps.micro_step(step):
            with autocast(device, args.amp):
                loss = compute_loss(samples, targets)
            steps.backward(loss)
    return steps.finish()
