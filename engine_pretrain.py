"""One epoch of MAE pre-training.

References:
    MAE: https://github.com/facebookresearch/mae
    DeiT: https://github.com/facebookresearch/deit
"""
from typing import Any, Dict, Iterable, Optional

import torch

import util.lr_sched as lr_sched
import util.misc as misc
from util.engine_utils import LossWatch, ScalarBuffer, maybe_no_sync, reduce_loss_for_logging
from util.logger import log
from util.runner import autocast


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler: Any,
                    log_writer: Optional[Any] = None, args: Optional[Any] = None) -> Dict[str, float]:
    """Train for one epoch; return the global averages of the logged meters ('loss', 'lr').

    Args:
        model: MAE model (possibly DDP-wrapped) returning (loss, pred, mask).
        data_loader: yields (images, labels); labels are ignored.
        loss_scaler: misc.NativeScalerWithGradNormCount (backward + step).
        log_writer: TensorBoard SummaryWriter or None.
        args: needs accum_iter, mask_ratio, lr schedule fields; optional amp, print_freq.
    """
    model.train(True)
    metric_logger = misc.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", misc.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = "Epoch: [{}]".format(epoch)
    print_freq = getattr(args, "print_freq", 20)
    accum_iter = args.accum_iter
    amp = getattr(args, "amp", "none") or "none"
    watch = LossWatch(epoch)
    scalars = ScalarBuffer(log_writer)

    optimizer.zero_grad()
    if log_writer is not None:
        log("log_dir: {}".format(log_writer.log_dir))

    num_steps = len(data_loader)
    for data_iter_step, (samples, _) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        # a per-iteration (instead of per-epoch) lr schedule
        if data_iter_step % accum_iter == 0:
            lr_sched.adjust_learning_rate(optimizer, data_iter_step / num_steps + epoch, args)

        samples = samples.to(device, non_blocking=True)
        update_grad = (data_iter_step + 1) % accum_iter == 0
        with maybe_no_sync(model, update_grad):
            with autocast(device, amp):
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            loss_scaler(loss / accum_iter, optimizer, update_grad=update_grad)
        if update_grad:
            optimizer.zero_grad(set_to_none=True)

        lr = max(group["lr"] for group in optimizer.param_groups)
        watch.add(data_iter_step, loss, lr)
        metric_logger.update(loss=loss.detach())
        metric_logger.update(lr=lr)

        if update_grad:
            loss_value_reduce = reduce_loss_for_logging(loss)
            # x-axis in 1000ths of an epoch, to compare runs with different batch sizes
            epoch_1000x = int((data_iter_step / num_steps + epoch) * 1000)
            scalars.add("train_loss", loss_value_reduce, epoch_1000x)
            scalars.add("lr", lr, epoch_1000x)

        if data_iter_step % print_freq == 0 or data_iter_step == num_steps - 1:
            watch.check()  # the only read-back of the loss between prints
            scalars.flush()

    watch.check()
    scalars.flush()
    # gather the stats from all processes
    metric_logger.synchronize_between_processes()
    log("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
