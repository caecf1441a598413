"""The training-epoch loop both engines share, and its parts.

Accumulation boundaries, no gradient reduction on micro-steps (DDP no_sync, FSDP
set_requires_gradient_sync), deferred NaN checks and buffered TensorBoard
scalars: nothing waits for the device between console prints. The NaN check, the meters and TensorBoard
see each step's loss widened to fp64 on the device (util.metrics.widen), whatever its dtype. An epoch can
continue from a saved position, and a hook at every optimizer-step boundary may save one and stop
(util/runner.py).
"""
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

import util.lr_sched as lr_sched
from util.distributed import all_reduce_mean
from util.errors import NonFiniteLossError
from util.logger import log
from util.metrics import MetricLogger, SmoothedValue, widen
from util.precision import autocast
from util.resume import EpochPosition, set_rng_state
from util.sharding import gradient_sync

# called at each optimizer-step boundary with (batches done this epoch, the epoch's meters, a function
# that raises if a loss since the last check was not finite)
AfterStep = Callable[[int, MetricLogger, Callable[[], None]], None]


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
        for tag, value, step in self.rows:
            self.log_writer.add_scalar(tag, float(value), step)
        self.rows.clear()


def train_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                device: torch.device, epoch: int, loss_scaler: Any,
                compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                args: Any, log_writer: Optional[Any] = None, loss_tag: str = "loss",
                clip_grad: Optional[float] = None, position: Optional[EpochPosition] = None,
                after_step: Optional[AfterStep] = None) -> Dict[str, float]:
    """One epoch of optimisation; returns the global averages of 'loss' and 'lr'.

    Args:
        compute_loss: (samples, targets) on the device -> scalar loss; runs under autocast, and should compute
            the loss in fp32 from the model's outputs (cast them first: CPU autocast keeps log_softmax in bf16).
        args: accum_iter and the lr schedule fields; optional amp and print_freq.
        loss_tag: TensorBoard tag of the loss ('train_loss' for pre-training, 'loss' for fine-tuning).
        clip_grad: max gradient norm, or None (or 0) for no clipping.
        position: continue this epoch after position.step batches (the loader yields only the rest):
            step numbers, lr schedule, meters and random state carry on as if never interrupted.
        after_step: hook at every optimizer-step boundary (see AfterStep).
    """
    model.train(True)
    metric_logger = MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = "Epoch: [{}]".format(epoch)
    print_freq = getattr(args, "print_freq", 20)
    accum_iter = args.accum_iter
    amp = getattr(args, "amp", "none") or "none"
    clip_params = [p for p in model.parameters() if p.requires_grad] if clip_grad else None
    watch = LossWatch(epoch)
    scalars = ScalarBuffer(log_writer)

    optimizer.zero_grad()
    if log_writer is not None:
        log("log_dir: {}".format(log_writer.log_dir))

    start = 0
    if position is not None:
        start = position.step
        metric_logger.load_totals(position.meters)
    num_steps = start + len(data_loader)
    batches = data_loader
    if position is not None:
        batches = iter(data_loader)
        set_rng_state(position.rng)  # iter() drew the loader's seed: back to the state at the saved step
    for data_iter_step, (samples, targets) in enumerate(
            metric_logger.log_every(batches, print_freq, header, start=start), start=start):
        # a per-iteration (instead of per-epoch) lr schedule
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / num_steps + epoch, args)

        samples = samples.to(device, non_blocking=True)
        if torch.is_tensor(targets):
            targets = targets.to(device, non_blocking=True)
        update_grad = (data_iter_step + 1) % accum_iter == 0
        # The epoch's last micro-step reduces even without an update: FSDP2 keeps no-sync gradients outside
        # param.grad, where zero_grad() would miss them; reduced, they land in param.grad and the next
        # epoch's zero_grad() discards them, as DDP's leftovers always were.
        sync = update_grad or data_iter_step + 1 == num_steps
        with gradient_sync(model, sync):
            with autocast(device, amp):
                loss = compute_loss(samples, targets)
            loss_scaler(loss / accum_iter, optimizer, clip_grad=clip_grad or None, parameters=clip_params,
                        update_grad=update_grad)
        if update_grad:
            optimizer.zero_grad(set_to_none=True)

        lr = max(group["lr"] for group in optimizer.param_groups)
        loss_value = widen(loss)  # fp64, still on the device: what the NaN check, meters and TensorBoard see
        watch.add(data_iter_step, loss_value, lr)
        metric_logger.update(loss=loss_value)
        metric_logger.update(lr=lr)

        if update_grad:
            loss_value_reduce = all_reduce_mean(loss_value)  # still a tensor: no host sync
            # x-axis in 1000ths of an epoch, to compare runs with different batch sizes
            epoch_1000x = int((data_iter_step / num_steps + epoch) * 1000)
            scalars.add(loss_tag, loss_value_reduce, epoch_1000x)
            scalars.add("lr", lr, epoch_1000x)

        if data_iter_step % print_freq == 0 or data_iter_step == num_steps - 1:
            watch.check()  # the only read-back of the loss between prints
            scalars.flush()
        if update_grad and after_step is not None:
            after_step(data_iter_step + 1, metric_logger, watch.check)

    watch.check()
    scalars.flush()
    # gather the stats from all processes
    metric_logger.synchronize_between_processes()
    log("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
