"""Per-iteration learning-rate schedule: linear warm-up, then half-cycle cosine."""
import math
from typing import Any


def lr_at(epoch: float, args: Any) -> float:
    """Learning rate at fractional `epoch` for args.lr / min_lr / warmup_epochs / epochs."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-12)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch: float, args: Any) -> float:
    """Set every param group's lr for fractional `epoch` (times its `lr_scale`); return the base value."""
    lr = lr_at(epoch, args)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr * param_group.get("lr_scale", 1.0)
    return lr
