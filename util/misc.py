"""Distributed setup, metric logging, the loss scaler and checkpoint entry points.

References:
    DeiT: https://github.com/facebookresearch/deit
    MoCo v3: https://github.com/facebookresearch/moco-v3
"""
import datetime
import os
import random
import time
from collections import defaultdict, deque
from typing import Any, Dict, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from util.checkpoint import load_model, save_model  # noqa: F401  (re-exported, reference names)
from util.logger import log

Number = Union[int, float, torch.Tensor]


# ----------------------------------------------------------------------------
# distributed helpers

def is_dist_avail_and_initialized() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0."""
    return get_rank() == 0


def save_on_master(*args, **kwargs) -> None:
    """torch.save, atomically, on rank 0 only."""
    if is_main_process():
        from util.checkpoint import atomic_save
        atomic_save(*args, **kwargs)


def dist_device() -> torch.device:
    """Device on which collectives of this process group run (cuda for nccl, else cpu)."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_for(device_type: str) -> str:
    """Process-group backend for a device type: nccl for cuda, gloo otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed_mode(args: Any) -> None:
    """Join the process group described by torchrun, SLURM or OpenMPI variables, if any.

    Sets args.rank, args.world_size, args.gpu, args.distributed (and args.dist_backend).
    """
    env = os.environ
    if getattr(args, "dist_on_itp", False):
        args.rank = int(env["OMPI_COMM_WORLD_RANK"])
        args.world_size = int(env["OMPI_COMM_WORLD_SIZE"])
        args.gpu = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        args.dist_url = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        env["LOCAL_RANK"], env["RANK"], env["WORLD_SIZE"] = str(args.gpu), str(args.rank), str(args.world_size)
    elif "RANK" in env and "WORLD_SIZE" in env:
        args.rank = int(env["RANK"])
        args.world_size = int(env["WORLD_SIZE"])
        args.gpu = int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        args.rank = int(env["SLURM_PROCID"])
        args.world_size = int(env["SLURM_NTASKS"])
        args.gpu = int(env.get("SLURM_LOCALID", 0))
    else:
        log("Not using distributed mode")
        args.distributed = False
        args.rank, args.world_size = 0, 1
        args.gpu = getattr(args, "gpu", None)
        return

    args.distributed = True
    device_type = torch.device(getattr(args, "device", None) or "cpu").type
    if device_type == "cuda":
        torch.cuda.set_device(args.gpu)
    args.dist_backend = backend_for(device_type)
    timeout = datetime.timedelta(minutes=float(getattr(args, "dist_timeout", 30)))
    log(f"| distributed init (rank {args.rank}): {args.dist_url}, gpu {args.gpu}, "
        f"backend {args.dist_backend}", force=True)
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank, timeout=timeout)
    dist.barrier()


def all_reduce_mean(x: Number) -> Number:
    """Mean of x over processes; a float in gives a float out, a tensor in a tensor out."""
    world_size = get_world_size()
    if world_size == 1:
        return x
    if torch.is_tensor(x):
        t = x.detach().clone()
        dist.all_reduce(t)
        return t / world_size
    t = torch.tensor(float(x), device=dist_device())
    dist.all_reduce(t)
    return t.item() / world_size


# ----------------------------------------------------------------------------
# metric logging

def _to_float(v: Number) -> float:
    return v.item() if torch.is_tensor(v) else float(v)


class SmoothedValue:
    """Track a series of values; smoothed over a window and globally averaged.

    Values may be device tensors: they are only read back when printed, so updating a meter
    every step does not synchronise the host with the device.
    """

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total: Number = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: Number, n: int = 1) -> None:
        if torch.is_tensor(value):
            value = value.detach()
        self.deque.append(value)
        self.count += n
        self.total = self.total + value * n

    def synchronize_between_processes(self) -> None:
        """All-reduce count and total (the window stays local)."""
        if get_world_size() == 1:
            return
        t = torch.tensor([self.count, _to_float(self.total)], dtype=torch.float64, device=dist_device())
        dist.barrier()
        dist.all_reduce(t)
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

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "") -> Iterator:
        """Yield from iterable, printing progress every print_freq items and at the end."""
        start_time = time.time()
        end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        total = len(iterable)
        space_fmt = ":" + str(len(str(total))) + "d"
        parts = [header, "[{0" + space_fmt + "}/{1}]", "eta: {eta}", "{meters}", "time: {time}", "data: {data}"]
        if torch.cuda.is_available():
            parts.append("max mem: {memory:.0f}")
        log_msg = self.delimiter.join(parts)
        mb = 1024.0 * 1024.0
        i = 0
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
            f"({total_time / max(total, 1):.4f} s / it)")


# ----------------------------------------------------------------------------
# mixed precision and gradients

class NativeScalerWithGradNormCount:
    """Backward, optional unscale + clip, and optimizer step; a GradScaler only when enabled (fp16).

    Args:
        device_type: device the loss lives on ('cuda', 'cpu').
        enabled: use a torch.amp.GradScaler (fp16); otherwise plain backward/step.
    """

    state_dict_key = "amp_scaler"

    def __init__(self, device_type: str = "cuda", enabled: bool = True):
        if enabled and device_type == "cuda" and not torch.cuda.is_available():
            enabled = False
        self._scaler = torch.amp.GradScaler(device_type) if enabled else None

    @property
    def enabled(self) -> bool:
        return self._scaler is not None

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                 clip_grad: Optional[float] = None, parameters: Optional[Iterable] = None,
                 create_graph: bool = False, update_grad: bool = True) -> Optional[torch.Tensor]:
        if self._scaler is not None:
            self._scaler.scale(loss).backward(create_graph=create_graph)
        else:
            loss.backward(create_graph=create_graph)
        if not update_grad:
            return None
        norm = None
        if clip_grad is not None or parameters is not None:
            if self._scaler is not None:
                self._scaler.unscale_(optimizer)  # unscale the gradients in place
            if clip_grad is not None:
                if parameters is None:
                    raise ValueError("clip_grad needs the parameters to clip")
                norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
            else:
                norm = get_grad_norm_(parameters)
        if self._scaler is not None:
            self._scaler.step(optimizer)
            self._scaler.update()
        else:
            optimizer.step()
        return norm

    def state_dict(self) -> Dict:
        return self._scaler.state_dict() if self._scaler is not None else {}

    def load_state_dict(self, state_dict: Dict) -> None:
        if self._scaler is not None and state_dict:
            self._scaler.load_state_dict(state_dict)


def get_grad_norm_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
                   norm_type: float = 2.0) -> torch.Tensor:
    """Total gradient norm over parameters (without clipping)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = [p for p in parameters if p.grad is not None]
    if len(parameters) == 0:
        return torch.tensor(0.0)
    device = parameters[0].grad.device
    if norm_type == float("inf"):
        return max(p.grad.detach().abs().max().to(device) for p in parameters)
    return torch.norm(torch.stack([torch.norm(p.grad.detach(), norm_type).to(device)
                                   for p in parameters]), norm_type)


# ----------------------------------------------------------------------------
# random state, for exact resumption

def get_rng_state() -> Dict[str, Any]:
    """Torch (CPU and CUDA), numpy and python RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what get_rng_state returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
