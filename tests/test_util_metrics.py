"""util/metrics.py: SmoothedValue and MetricLogger statistics, printing, and sums that do not round to the
dtype of the values handed to them."""
import statistics

import pytest
import torch

from util import misc
from util.metrics import MetricLogger, SmoothedValue


def test_reference_names_are_the_meters():
    # scripts written for the reference use util.misc.SmoothedValue / MetricLogger
    assert misc.SmoothedValue is SmoothedValue and misc.MetricLogger is MetricLogger


@pytest.mark.parametrize("as_tensor", [False, True])
def test_smoothed_value_statistics(as_tensor):
    values = [5.0, 1.0, 4.0, 2.0, 9.0, 3.0, 7.0]
    sv = SmoothedValue(window_size=5)
    for v in values:
        sv.update(torch.tensor(v) if as_tensor else v)
    window = values[-5:]  # [4, 2, 9, 3, 7]
    assert sv.median == pytest.approx(statistics.median(window))  # 4
    assert sv.avg == pytest.approx(sum(window) / 5)
    assert sv.max == 9.0
    assert sv.value == 7.0
    assert sv.global_avg == pytest.approx(sum(values) / len(values))
    assert sv.count == 7
    for stat in (sv.median, sv.avg, sv.global_avg, sv.max, sv.value):
        assert isinstance(stat, float)
    assert str(sv) == f"{4.0:.4f} ({sum(values) / 7:.4f})"


def test_smoothed_value_weighted_update_and_empty():
    sv = SmoothedValue(window_size=3, fmt="{avg:.2f}|{global_avg:.2f}|{max:.1f}")
    assert sv.global_avg == 0.0 and sv.median == 0.0
    sv.update(2.0, n=3)
    sv.update(torch.tensor(6.0), n=1)
    assert sv.global_avg == pytest.approx((2 * 3 + 6) / 4)
    assert sv.avg == pytest.approx(4.0)
    assert str(sv) == "4.00|3.00|6.0"


def test_metric_logger_log_every_yields_everything(capsys):
    logger = MetricLogger(delimiter="  ")
    items = list(range(7))
    seen = []
    for x in logger.log_every(items, print_freq=3, header="Epoch: [1]"):
        seen.append(x)
        logger.update(loss=float(x), lr=0.5)
    assert seen == items
    assert logger.loss.global_avg == pytest.approx(3.0)
    assert logger.meters["lr"].value == 0.5
    out = capsys.readouterr().out
    for idx in ("[0/7]", "[3/7]", "[6/7]"):
        assert f"Epoch: [1]  {idx}" in out
    assert "[1/7]" not in out and "[5/7]" not in out
    assert "eta: " in out and "loss: " in out and "Total time" in out
    with pytest.raises(AttributeError):
        logger.does_not_exist


def test_metric_logger_skips_none_and_accepts_tensors():
    logger = MetricLogger()
    logger.update(a=torch.tensor(2.0), b=None)
    logger.update(a=4)
    assert "b" not in logger.meters
    assert logger.a.global_avg == pytest.approx(3.0)
    assert str(logger).startswith("a: ")


# ----------------------------------------------------------------------------
# sums wider than the values


@pytest.mark.parametrize("dtype, big", [(torch.bfloat16, 256.0), (torch.float16, 2048.0), (torch.float32, 2.0 ** 24)])
def test_global_average_does_not_round_to_the_values_dtype(dtype, big):
    # big + 1 is not representable in dtype (8, 11, 24 significant bits): a sum kept in dtype drops the 1
    assert float(torch.tensor(big, dtype=dtype) + torch.tensor(1.0, dtype=dtype)) == big
    sv = SmoothedValue()
    sv.update(torch.tensor(big, dtype=dtype))
    sv.update(torch.tensor(1.0, dtype=dtype), n=3)
    assert sv.global_avg == (big + 3.0) / 4  # exact in fp64
    assert sv.value == 1.0 and sv.max == big
    # still a tensor on the values' device, in fp64: read back only when printed
    assert torch.is_tensor(sv.total) and sv.total.dtype == torch.float64


def test_bf16_step_losses_average_like_their_fp64_mean():
    # an epoch of bf16 losses around 0.69: the logged average is their mean, not a value on bf16's grid
    g = torch.Generator().manual_seed(0)
    losses = (0.69 + 0.01 * torch.randn(50, generator=g)).to(torch.bfloat16)
    logger = MetricLogger()
    for loss in losses:
        logger.update(loss=loss)
    expected = losses.double().mean().item()
    assert logger.loss.global_avg == pytest.approx(expected, rel=1e-12, abs=0)
    assert logger.loss.avg == pytest.approx(losses[-20:].double().mean().item(), rel=1e-12, abs=0)


def test_totals_round_trip_keeps_the_fp64_sum():
    # a mid-epoch checkpoint stores totals(); the continued epoch's average is the uninterrupted one
    values = [torch.tensor(v, dtype=torch.bfloat16) for v in (256.0, 1.0, 1.0, 3.0)]
    whole = MetricLogger()
    for v in values:
        whole.update(loss=v)
    first, rest = MetricLogger(), MetricLogger()
    for v in values[:2]:
        first.update(loss=v)
    rest.load_totals(first.totals())
    for v in values[2:]:
        rest.update(loss=v)
    assert first.totals()["loss"] == [257.0, 2]
    assert rest.loss.global_avg == whole.loss.global_avg == 261.0 / 4
