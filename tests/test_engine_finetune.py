"""engine_finetune.train_one_epoch in this process: the loss is computed in fp32 from the model's outputs under
bf16 autocast, whichever criterion main_finetune picks, and the epoch's logged loss is the mean of its steps."""
import argparse
import math

import pytest
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
from engine_finetune import train_one_epoch
from util.precision import make_loss_scaler

NUM_CLASSES = 3


class RecordingLoss(torch.nn.Module):
    """The criterion, recording what it saw and returned at each step (and whether bf16 autocast was on)."""

    def __init__(self, criterion: torch.nn.Module):
        super().__init__()
        self.criterion = criterion
        self.steps = []

    def forward(self, outputs, targets):
        loss = self.criterion(outputs, targets)
        bf16_autocast = (torch.is_autocast_enabled("cpu")
                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        self.steps.append((outputs.detach(), targets, loss.detach(), bf16_autocast))
        return loss


def _criterion(mixup: bool, smoothing: float) -> torch.nn.Module:
    # main_finetune's choice: soft targets with mixup (smoothing inside Mixup), else smoothing, else plain CE
    if mixup:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return torch.nn.CrossEntropyLoss()


def _run_epoch(criterion, mixup_fn=None, amp="bf16", batches=5):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g))
            for _ in range(batches)]
    model = models_vit.vit_micro_patch4(img_size=16, depth=1, num_classes=NUM_CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(accum_iter=1, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1, amp=amp,
                              print_freq=100)
    device = torch.device("cpu")
    return train_one_epoch(model, criterion, data, optimizer, device, 0, make_loss_scaler(amp, device),
                           max_norm=None, mixup_fn=mixup_fn, args=args)


@pytest.mark.parametrize("mixup, smoothing", [(False, 0.1), (False, 0.0), (True, 0.1), (True, 0.0)],
                         ids=["smoothing", "plain", "mixup-smoothing", "mixup"])
def test_loss_is_fp32_from_the_logits_under_bf16_autocast(mixup, smoothing):
    # CPU autocast keeps log_softmax in bf16: the engine hands the criterion fp32 logits, so every criterion
    # returns an fp32 loss equal to an fp64 computation on the same logits
    mixup_fn = (Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=smoothing, num_classes=NUM_CLASSES)
                if mixup else None)
    recorder = RecordingLoss(_criterion(mixup, smoothing))
    _run_epoch(recorder, mixup_fn)
    assert len(recorder.steps) == 5
    for outputs, targets, loss, bf16_autocast in recorder.steps:
        assert bf16_autocast  # the case under test: the criterion runs inside bf16 autocast
        assert loss.dtype == torch.float32 and outputs.dtype == torch.float32
        soft = targets.double() if targets.is_floating_point() else targets
        expected = recorder.criterion(outputs.double(), soft)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def test_epoch_loss_is_the_fp64_mean_of_the_step_losses():
    # the issue's case: bf16 autocast, label smoothing, no mixup; the logged loss is not on bf16's grid
    recorder = RecordingLoss(LabelSmoothingCrossEntropy(smoothing=0.1))
    stats = _run_epoch(recorder, batches=6)
    losses = [float(loss) for _, _, loss, _ in recorder.steps]
    assert len(losses) == 6
    expected = math.fsum(losses) / len(losses)
    assert stats["loss"] == pytest.approx(expected, rel=1e-12, abs=0)
