"""One epoch of MAE pre-training.

References:
    MAE: https://github.com/facebookresearch/mae
    DeiT: https://github.com/facebookresearch/deit
"""
from typing import Any, Dict, Iterable, Optional

import torch

from util.engine_loop import StepBoundary, EpochSteps
from util.precision import autocast
from util.resume import EpochPosition
from util.transforms import normalize_images


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler: Any,
                    log_writer: Optional[Any] = None, args: Optional[Any] = None,
                    position: Optional[EpochPosition] = None, stop: Optional[StepBoundary] = None,
                    probe: Optional[Any] = None) -> Dict[str, float]:
    """Train for one epoch; return the global averages of the logged meters ('loss', 'lr').

    Args:
        model: MAE model (possibly DDP-wrapped) returning (loss, pred, mask): the model holds the loss.
        data_loader: yields (images, labels); labels are ignored. Images are normalised floats, as every
            loader of util/loaders.py yields them (uint8 batches are normalised here).
        loss_scaler: util.precision.NativeScalerWithGradNormCount (backward + optimizer step).
        log_writer: TensorBoard SummaryWriter or None (scalars 'train_loss' and 'lr').
        args: accum_iter, mask_ratio, amp, print_freq and the lr schedule fields (settings.args of a run).
        position, stop: continue a stopped epoch; told at each optimizer step (util/engine_loop.py).
        probe: an attached util.online_probe.OnlineProbe (--online_probe): one step of it per batch, on the
            class token of this batch's forward and its labels; its accuracy is the 'probe_acc1' meter.
    """
    steps = EpochSteps(model, optimizer, loss_scaler, epoch, args, log_writer, "train_loss", position=position,
                       stop=stop)
    for data_iter_step, (samples, labels) in steps.batches(data_loader):
        samples = normalize_images(samples.to(device, non_blocking=True))
        with steps.micro_step(data_iter_step):  # lr schedule; gradients reduced at the accumulation's end
            with autocast(device, args.amp):
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            if probe is not None:  # detached features, its own optimizer; before the step a position may save
                steps.meters.update(probe_acc1=probe.train_step(labels.to(device, non_blocking=True)))
            steps.backward(loss)  # loss_scaler: backward, optimizer step every accum_iter; meters, NaN check
    return steps.finish()
