"""One epoch of fine-tuning / linear probing, and evaluation.

References:
    DeiT: https://github.com/facebookresearch/deit
    BEiT: https://github.com/microsoft/unilm/tree/master/beit
"""
from typing import Any, Dict, Iterable, Optional

import torch
from timm.data import Mixup

from util.engine_loop import StepBoundary, EpochSteps
from util.logger import log
from util.metrics import MetricLogger, SmoothedValue
from util.precision import autocast, resolve_amp
from util.resume import EpochPosition
from util.transforms import normalize_images


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, loss_scaler: Any,
                    max_norm: Optional[float] = 0, mixup_fn: Optional[Mixup] = None,
                    log_writer: Optional[Any] = None, args: Optional[Any] = None,
                    position: Optional[EpochPosition] = None, stop: Optional[StepBoundary] = None) -> Dict[str, float]:
    """Train for one epoch; return the global averages of 'loss' and 'lr'.

    Args:
        criterion: loss on (logits, targets); soft targets when mixup_fn is given.
        data_loader: yields (images, targets); images are normalised floats, as every loader of
            util/loaders.py yields them (uint8 batches are normalised here).
        max_norm: gradient clipping norm; None or 0 for no clipping.
        mixup_fn: timm Mixup/CutMix applied to each batch, or None.
        log_writer: TensorBoard SummaryWriter or None (scalars 'loss' and 'lr').
        args: accum_iter, amp, print_freq and the lr schedule fields (settings.args of a run).
        position, stop: continue a stopped epoch; told at each optimizer step (util/engine_loop.py).
    """
    steps = EpochSteps(model, optimizer, loss_scaler, epoch, args, log_writer, "loss", clip_grad=max_norm,
                       position=position, stop=stop)
    for data_iter_step, (samples, targets) in steps.batches(data_loader):
        samples = normalize_images(samples.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with steps.micro_step(data_iter_step):  # lr schedule; gradients reduced at the accumulation's end
            with autocast(device, args.amp):
                outputs = model(samples)
                # the loss in fp32 from the logits, whatever --amp: CPU autocast keeps log_softmax (timm's
                # LabelSmoothingCrossEntropy) in bf16, where CUDA autocast runs it in fp32; a no-op for fp32 logits
                loss = criterion(outputs.float(), targets)
            steps.backward(loss)  # loss_scaler: backward, clip, optimizer step every accum_iter; meters
    return steps.finish()


@torch.no_grad()
def evaluate(data_loader: Iterable, model: torch.nn.Module, device: torch.device,
             amp: Optional[str] = None) -> Dict[str, float]:
    """Cross-entropy, top-1 and top-5 accuracy (percent) over the loader; every image counts once.

    Loss and accuracies are averaged per image, summed over processes, so a sharded evaluation
    gives the same numbers as a single process. uint8 images are normalised on the device.
    """
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    metric_logger = MetricLogger(delimiter="  ")
    header = "Test:"
    amp = resolve_amp(amp, device)
    for name in ("loss", "acc1", "acc5"):  # every rank holds every meter, even with an empty shard
        metric_logger.add_meter(name, SmoothedValue())

    # switch to evaluation mode
    model.eval()
    for images, target in metric_logger.log_every(data_loader, 10, header):
        images = normalize_images(images.to(device, non_blocking=True))
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            output = model(images)
        output = output.float()
        batch_size = images.shape[0]
        loss = criterion(output, target) / batch_size
        maxk = min(5, output.shape[1])
        topk = output.topk(maxk, dim=1).indices  # [N, k]
        hits = topk.eq(target.unsqueeze(1))
        acc1 = hits[:, :1].any(dim=1).float().mean() * 100.0
        acc5 = hits.any(dim=1).float().mean() * 100.0
        metric_logger.meters["loss"].update(loss, n=batch_size)
        metric_logger.meters["acc1"].update(acc1, n=batch_size)
        metric_logger.meters["acc5"].update(acc5, n=batch_size)
    # gather the stats from all processes
    metric_logger.synchronize_between_processes()
    log("* Acc@1 {top1.global_avg:.3f} Acc@5 {top5.global_avg:.3f} loss {losses.global_avg:.3f}".format(
        top1=metric_logger.acc1, top5=metric_logger.acc5, losses=metric_logger.loss))
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
