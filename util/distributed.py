"""Process-group helpers: rank, world size, joining the group, and the collectives the code uses.

References:
    DeiT: https://github.com/facebookresearch/deit
"""
import datetime
import os
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist

from util.logger import log

Number = Union[int, float, torch.Tensor]


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


def dist_device() -> torch.device:
    """Device on which collectives of this process group run (cuda for nccl, else cpu)."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_for(device_type: str) -> str:
    """Process-group backend for a device type: nccl for cuda, gloo otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def join_process_group(device_type: str, dist_url: str = "env://", dist_on_itp: bool = False,
                       timeout_minutes: float = 30, gpu: Optional[int] = None) -> Dict[str, Any]:
    """Join the process group described by torchrun, SLURM or OpenMPI variables, if any.

    Returns rank, world_size, gpu and distributed (plus dist_backend and dist_url when it joined one);
    outside a launcher rank 0 of 1, `gpu` unchanged.
    """
    env = os.environ
    if dist_on_itp:
        rank, world_size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        gpu = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        dist_url = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        env["LOCAL_RANK"], env["RANK"], env["WORLD_SIZE"] = str(gpu), str(rank), str(world_size)
    elif "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size, gpu = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world_size, gpu = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        log("Not using distributed mode")
        return {"distributed": False, "rank": 0, "world_size": 1, "gpu": gpu}

    if device_type == "cuda":
        torch.cuda.set_device(gpu)
    backend = backend_for(device_type)
    log(f"| distributed init (rank {rank}): {dist_url}, gpu {gpu}, backend {backend}", force=True)
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size, rank=rank,
                            timeout=datetime.timedelta(minutes=float(timeout_minutes)))
    dist.barrier()
    return {"distributed": True, "rank": rank, "world_size": world_size, "gpu": gpu, "dist_backend": backend,
            "dist_url": dist_url}


def init_distributed_mode(args: Any) -> None:
    """The reference's: join_process_group from args.device, dist_url, dist_on_itp (and our dist_timeout) and
    set args.rank, args.world_size, args.gpu, args.distributed (and args.dist_backend)."""
    flags = vars(args)
    vars(args).update(join_process_group(torch.device(flags.get("device") or "cpu").type, args.dist_url,
                                         flags.get("dist_on_itp", False), flags.get("dist_timeout", 30),
                                         flags.get("gpu")))


def init_single_process_group(device_type: str) -> None:
    """A process group of this process alone (no network: an in-memory store), for code that needs one even
    without torchrun, such as FSDP on one GPU."""
    if is_dist_avail_and_initialized():
        return
    dist.init_process_group(backend=backend_for(device_type), store=dist.HashStore(), rank=0, world_size=1)


def destroy_process_group() -> None:
    """Leave the process group, if this process is in one."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


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


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum t over processes in place (a no-op in one process); returns t."""
    if get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order (a collective in distributed runs)."""
    if get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a collective in distributed runs)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
