"""Training health (util/engine_loop.py): the gradient norm of every update (console, log.txt, TensorBoard), the
fp16 loss scale, per-block gradient norms, and --nan_policy skip on an injected non-finite batch."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn as nn

import main_pretrain
from helpers import TINY_PRETRAIN, read_log, run_entry
from util.engine_loop import EpochSteps, NanPolicy, block_grad_norms
from util.errors import NonFiniteLossError
from util.precision import NativeScalerWithGradNormCount


class Writer:
    """A TensorBoard SummaryWriter stand-in that keeps what it is given."""

    log_dir = "memory"

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), step))

    def tags(self, prefix):
        return [(t, v) for t, v, _ in self.scalars if t.startswith(prefix)]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = nn.Linear(4, 3)
        self.blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 1)])

    def forward(self, x):
        for m in (self.patch_embed, *self.blocks):
            x = m(x)
        return (x ** 2).mean()


def _args(**kw):
    return argparse.Namespace(accum_iter=1, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1, print_freq=1, **kw)


def _epoch(model, batches, args, scaler=None, writer=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    applied = []  # the gradients each optimizer step applied, independently of the loop's own norm
    optimizer.register_step_pre_hook(lambda *_: applied.append(
        [p.grad.detach().clone() for p in model.parameters()]))
    steps = EpochSteps(model, optimizer, scaler or NativeScalerWithGradNormCount("cpu", enabled=False), 0, args,
                       writer)
    weights = []
    for step, x in steps.batches(batches):
        with steps.micro_step(step):
            steps.backward(model(x))
        weights.append([p.detach().clone() for p in model.parameters()])
    return steps, applied, weights


def test_every_update_logs_its_total_gradient_norm():
    batches = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    writer = Writer()
    steps, applied, _ = _epoch(Tiny(), batches, _args(log_grad_blocks=True), writer=writer)
    expected = [float(np.sqrt(sum((g.double().numpy() ** 2).sum() for g in grads))) for grads in applied]
    logged = [v for t, v in writer.tags("grad_norm") if t == "grad_norm"]
    np.testing.assert_allclose(logged, expected, rtol=1e-6)
    stats = steps.finish()
    assert steps.meters.grad_norm.global_avg == pytest.approx(np.mean(expected), rel=1e-6)
    assert set(stats) == {"loss", "lr"}  # log.txt keeps the reference's keys
    # per part: blocks.0, blocks.1, patch_embed, whose squares add up to the total
    first = {t: v for t, v in writer.tags("grad_norm/")[:3]}
    assert sorted(first) == ["grad_norm/blocks.0", "grad_norm/blocks.1", "grad_norm/patch_embed"]
    assert np.sqrt(sum(v ** 2 for v in first.values())) == pytest.approx(expected[0], rel=1e-6)


def test_fp16_logs_its_loss_scale():
    writer = Writer()
    _epoch(Tiny(), [torch.randn(2, 4)] * 2, _args(), NativeScalerWithGradNormCount("cpu", enabled=True), writer)
    assert [v for _, v in writer.tags("loss_scale")] == [65536.0, 65536.0]  # GradScaler's initial scale


def test_skip_drops_a_non_finite_update_and_stops_after_k_in_a_row(capsys):
    good = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    bad = torch.full((2, 4), float("nan"))
    writer = Writer()
    steps, applied, weights = _epoch(Tiny(), [good[0], bad, good[1], good[2]], _args(nan_policy="skip"),
                                     writer=writer)
    assert len(applied) == 3  # the optimizer never stepped on the NaN batch
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))  # the weights did not move
    stats = steps.finish()
    assert np.isfinite(stats["loss"]) and np.isfinite(steps.meters.grad_norm.global_avg)  # out of the averages
    assert writer.tags("nan_skipped") == [("nan_skipped", 1.0)]
    assert "skipped the update of epoch 0, step 1: the loss (nan)" in capsys.readouterr().err
    with pytest.raises(NonFiniteLossError, match="2 updates in a row had a non-finite loss"):
        _epoch(Tiny(), [good[0], bad, bad, good[1]], _args(nan_policy="skip", nan_max_skips=2))
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 0, step 1"):  # stop: the reference's
        steps, _, _ = _epoch(Tiny(), [good[0], bad, good[1]], _args())
    assert NanPolicy.of(argparse.Namespace()).policy == "stop"


def test_block_norms_name_the_blocks_of_a_wrapped_model():
    model = Tiny()
    model(torch.randn(2, 4)).backward()
    names = sorted(block_grad_norms(nn.ModuleDict({"module": model})["module"]))
    assert names == ["blocks.0", "blocks.1", "patch_embed"]


@pytest.mark.e2e
def test_a_nan_image_is_skipped_by_the_entry_point_or_stops_it(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "data" / "train" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            image = rng.random((32, 32, 3), dtype=np.float32)
            if c == 1 and i == 0:
                image[:, :, 0] = np.nan  # one float image with NaN values: a non-finite loss in its batch
            np.save(tmp_path / "data" / "train" / f"class{c}" / f"{i}.npy", image)
    args = [*TINY_PRETRAIN, "--batch_size", "2", "--amp", "none", "--data_path", tmp_path / "data", "--epochs", "2",
            "--log_dir", ""]
    proc = run_entry(main_pretrain, *args, "--nan_policy", "skip", "--output_dir", tmp_path / "skip")
    assert proc.stderr.count("skipped the update of epoch") == 2  # once per epoch
    assert all(np.isfinite(r["train_loss"]) for r in read_log(tmp_path / "skip"))
    proc = run_entry(main_pretrain, *args, "--nan_policy", "skip", "--nan_max_skips", "1", "--output_dir",
                     tmp_path / "stop", check=False)
    assert proc.returncode == 1 and "1 updates in a row had a non-finite loss" in proc.stderr


@pytest.mark.e2e
def test_rollback_restores_the_last_checkpoint_and_goes_on_with_the_next_batch(tmp_path, monkeypatch):
    import util.runner as runner
    from helpers import load
    from util.datasets import ImageFolder

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "data" / "train" / f"class{c}").mkdir(parents=True)
        for i in range(4):  # float arrays: a NaN image has the batch's dtype
            np.save(tmp_path / "data" / "train" / f"class{c}" / f"{i}.npy", rng.random((32, 32, 3), dtype=np.float32))
    real, count = ImageFolder.__getitem__, [0]

    def poisoned(at):
        def getitem(self, index):
            count[0] += 1
            image, label = real(self, index)
            return (torch.full_like(image, float("nan")) if count[0] in at else image), label
        return getitem

    restored = []
    real_rollback = runner.Run.rollback

    def spy(self, *a):
        real_rollback(self, *a)
        restored.append({k: v.clone() for k, v in self.model_without_ddp.state_dict().items()})

    monkeypatch.setattr(runner.Run, "rollback", spy)
    args = [*TINY_PRETRAIN, "--batch_size", "2", "--amp", "none", "--data_path", tmp_path / "data", "--log_dir", "",
            "--nan_policy", "rollback"]
    # 8 images, 4 steps an epoch: the 11th read is in epoch 1, step 1
    monkeypatch.setattr(ImageFolder, "__getitem__", poisoned({11}))
    out = tmp_path / "out"
    proc = run_entry(main_pretrain, *args, "--epochs", "3", "--output_dir", out)
    assert "rolled back to" in proc.stderr and "(the end of epoch 0), going on with the next batch" in proc.stderr
    saved = load(out / "checkpoint-0.pth")["model"]  # what checkpoint-last.pth held then
    assert len(restored) == 1 and all(torch.equal(restored[0][k], saved[k]) for k in saved)
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2] and all(np.isfinite(r["train_loss"]) for r in read_log(out))
    # too many rollbacks, or none to go back to: the run stops with one line
    count[0] = 0
    monkeypatch.setattr(ImageFolder, "__getitem__", poisoned({11, 19}))
    proc = run_entry(main_pretrain, *args, "--epochs", "3", "--nan_max_rollbacks", "1", "--output_dir",
                     tmp_path / "twice", check=False)
    assert proc.returncode == 1 and "1 rollback(s) already (--nan_max_rollbacks 1)" in proc.stderr
    count[0] = 0
    monkeypatch.setattr(ImageFolder, "__getitem__", poisoned({3}))
    proc = run_entry(main_pretrain, *args, "--epochs", "1", "--output_dir", tmp_path / "early", check=False)
    assert proc.returncode == 1 and "no checkpoint to roll back to yet" in proc.stderr
