"""Rank-aware console output: only the main process prints unless asked otherwise."""
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
