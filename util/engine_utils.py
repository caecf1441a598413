"""Pieces both epoch loops use: accumulation boundaries, deferred loss checks, buffered scalars."""
from contextlib import nullcontext
from typing import Any, List, Tuple

import torch

import util.misc as misc
from util.errors import NonFiniteLossError


def maybe_no_sync(model: torch.nn.Module, update_grad: bool):
    """DDP's no_sync() on accumulation micro-steps (gradients are all-reduced only when stepping)."""
    if not update_grad and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


class LossWatch:
    """Checks losses for NaN/inf in batches, so that no step waits for the device.

    `add` records a step's loss tensor; `check` (at print boundaries and at the end of the epoch)
    reads them back once and raises NonFiniteLossError naming the first bad step.
    """

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.pending: List[Tuple[int, torch.Tensor, float]] = []

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.pending.append((step, loss.detach().float().reshape(()), lr))

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


def reduce_loss_for_logging(loss: torch.Tensor) -> torch.Tensor:
    """Loss averaged over processes, still a tensor (no host sync)."""
    return misc.all_reduce_mean(loss.detach())
