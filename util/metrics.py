"""Meters and the progress-printing iterator of the training and evaluation loops.

Values may stay on the device: they are read back only when printed or averaged, so updating a meter
every step does not synchronise the host with the device. Tensor values are widened to fp64 on their
device as they arrive (fp32 on MPS, which has no fp64): a bf16 or fp32 value does not make the sum
round to its own precision.

References:
    DeiT: https://github.com/facebookresearch/deit
"""
import datetime
import time
from collections import defaultdict, deque
from typing import Dict, Iterable, Iterator, List, Optional

import torch

from util.distributed import Number, all_reduce_sum_, dist_device, get_world_size
from util.logger import log


def _to_float(v: Number) -> float:
    return v.item() if torch.is_tensor(v) else float(v)


def widen(value: torch.Tensor) -> torch.Tensor:
    """`value` detached, in fp64 on its device (fp32 on MPS), to sum without rounding to a narrow dtype;
    no host sync."""
    dtype = torch.float32 if value.device.type == "mps" else torch.float64
    return value.detach().to(dtype)


class SmoothedValue:
    """Track a series of values; smoothed over a window and globally averaged.

    Values may be device tensors: they are only read back when printed, so updating a meter
    every step does not synchronise the host with the device. Tensors are kept and summed in fp64
    whatever their dtype (see `widen`); Python numbers sum as Python floats.
    """

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total: Number = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: Number, n: int = 1) -> None:
        if torch.is_tensor(value):
            value = widen(value)
        self.deque.append(value)
        self.count += n
        self.total = self.total + value * n

    def synchronize_between_processes(self) -> None:
        """All-reduce count and total (the window stays local)."""
        if get_world_size() == 1:
            return
        t = torch.tensor([self.count, _to_float(self.total)], dtype=torch.float64, device=dist_device())
        all_reduce_sum_(t)
        self.count = int(t[0].item())
        self.total = t[1].item()

    def _values(self):
        return torch.tensor([_to_float(v) for v in self.deque] or [0.0], dtype=torch.float64)

    @property
    def median(self) -> float:
        return self._values().median().item()

    @property
    def avg(self) -> float:
        return self._values().mean().item()

    @property
    def global_avg(self) -> float:
        return _to_float(self.total) / max(self.count, 1)

    @property
    def max(self) -> float:
        return self._values().max().item()

    @property
    def value(self) -> float:
        return _to_float(self.deque[-1]) if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """A named set of SmoothedValues with a progress-printing iterator."""

    def __init__(self, delimiter: str = "\t"):
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs: Number) -> None:
        for k, v in kwargs.items():
            if v is None:
                continue
            self.meters[k].update(v)

    def __getattr__(self, attr: str):
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def totals(self) -> Dict[str, List[float]]:
        """meter -> [total, count] of this process (reads device values back), for a mid-epoch checkpoint."""
        return {name: [_to_float(m.total), m.count] for name, m in self.meters.items()}

    def load_totals(self, totals: Dict[str, List[float]]) -> None:
        """Continue the global averages from `totals()` of an earlier run."""
        for name, (total, count) in totals.items():
            self.meters[name].total, self.meters[name].count = float(total), int(count)

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "", start: int = 0) -> Iterator:
        """Yield from iterable, printing progress every print_freq items and at the end.

        `start`: items already done before this iterable (a resumed epoch), counted in the printed index.
        """
        start_time = time.time()
        end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        total = start + len(iterable)
        space_fmt = ":" + str(len(str(total))) + "d"
        parts = [header, "[{0" + space_fmt + "}/{1}]", "eta: {eta}", "{meters}", "time: {time}", "data: {data}"]
        if torch.cuda.is_available():
            parts.append("max mem: {memory:.0f}")
        log_msg = self.delimiter.join(parts)
        mb = 1024.0 * 1024.0
        i = start
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta_seconds = iter_time.global_avg * (total - i)
                eta = str(datetime.timedelta(seconds=int(eta_seconds)))
                log(log_msg.format(i, total, eta=eta, meters=str(self), time=str(iter_time),
                                   data=str(data_time),
                                   memory=torch.cuda.max_memory_allocated() / mb
                                   if torch.cuda.is_available() else 0))
            i += 1
            end = time.time()
        total_time = time.time() - start_time
        log(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
            f"({total_time / max(total - start, 1):.4f} s / it)")
