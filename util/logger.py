"""Rank-aware console output: only the main process prints unless asked otherwise.

`log` / `warn` are what this code uses; `setup_for_distributed` is the reference's name for silencing the
builtin print on other ranks, kept for scripts written against the reference (this code never calls it).
"""
import builtins
import datetime
import os
import sys

import torch.distributed as dist


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)) or 0)


def log(*args, force: bool = False, file=None, **kwargs) -> None:
    """Print on rank 0 only (any rank with force=True); flushes so logs survive a crash."""
    if not force and _rank() != 0:
        return
    kwargs.setdefault("flush", True)
    print(*args, file=file if file is not None else sys.stdout, **kwargs)


def warn(message: str, force: bool = False) -> None:
    """Print a warning line to stderr (rank 0 only unless force)."""
    log(f"WARNING: {message}", force=force, file=sys.stderr)


_builtin_print = builtins.print


def setup_for_distributed(is_master: bool) -> None:
    """The reference's util.misc.setup_for_distributed: replace builtins.print so that only the master process
    prints, each line prefixed with the time; print(..., force=True) prints on any process, and every
    process prints when there are more than 8 (as the reference). Calling it again replaces the earlier one."""
    def print_from_master(*args, **kwargs) -> None:
        force = kwargs.pop("force", False) or _world_size() > 8
        if is_master or force:
            _builtin_print(f"[{datetime.datetime.now().time()}] ", end="")
            _builtin_print(*args, **kwargs)

    builtins.print = print_from_master


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
