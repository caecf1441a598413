"""One epoch of MAE pre-training.

References:
    MAE: https://github.com/facebookresearch/mae
    DeiT: https://github.com/facebookresearch/deit
"""
from typing import Any, Dict, Iterable, Optional

import torch

from util.engine_loop import AfterStep, train_epoch
from util.resume import EpochPosition
from util.transforms import normalize_images


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler: Any,
                    log_writer: Optional[Any] = None, args: Optional[Any] = None,
                    position: Optional[EpochPosition] = None, after_step: Optional[AfterStep] = None) -> Dict[str, float]:
    """Train for one epoch; return the global averages of the logged meters ('loss', 'lr').

    Args:
        model: MAE model (possibly DDP-wrapped) returning (loss, pred, mask).
        data_loader: yields (images, labels); labels are ignored. Images are normalised floats, or
            uint8 (util.transforms.pretrain_transform(normalize=False)), normalised here on the device.
        loss_scaler: util.precision.NativeScalerWithGradNormCount (backward + step).
        log_writer: TensorBoard SummaryWriter or None (scalars 'train_loss' and 'lr').
        args: needs accum_iter, mask_ratio and the lr schedule fields; optional amp, print_freq.
        position, after_step: continue a stopped epoch, and the step-boundary hook (util/engine_loop.py).
    """
    def compute_loss(samples: torch.Tensor, _targets: Any) -> torch.Tensor:
        samples = normalize_images(samples)  # uint8 batches are normalised here, on the device
        loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
        return loss

    return train_epoch(model, data_loader, optimizer, device, epoch, loss_scaler, compute_loss,
                       args=args, log_writer=log_writer, loss_tag="train_loss", position=position,
                       after_step=after_step)
