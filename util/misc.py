"""The reference's `util.misc` names, re-exported from the modules that hold them.

Scripts written for the reference code keep working (`import util.misc as misc`, `misc.MetricLogger`,
`misc.save_model`, ...). Code in this repository imports from the defining modules instead:

- util/distributed.py: ranks, `init_distributed_mode`, `all_reduce_mean`;
- util/logger.py: `setup_for_distributed` (replaces print on other ranks, as the reference; unused here);
- util/metrics.py: `SmoothedValue`, `MetricLogger`;
- util/precision.py: `NativeScalerWithGradNormCount`, `get_grad_norm_`;
- util/checkpoint.py: `save_on_master` (atomic);
- util/resume.py: `save_model`, `load_model`, random states.
"""
from util.checkpoint import save_on_master
from util.distributed import (all_reduce_mean, backend_for, dist_device, get_rank, get_world_size,
                              init_distributed_mode, is_dist_avail_and_initialized, is_main_process)
from util.logger import setup_for_distributed
from util.metrics import MetricLogger, SmoothedValue
from util.precision import NativeScalerWithGradNormCount, get_grad_norm_
from util.resume import load_model, save_model
from util.rng import get_rng_state, set_rng_state

__all__ = [
    "MetricLogger", "NativeScalerWithGradNormCount", "SmoothedValue", "all_reduce_mean", "backend_for",
    "dist_device", "get_grad_norm_", "get_rank", "get_rng_state", "get_world_size", "init_distributed_mode",
    "is_dist_avail_and_initialized", "is_main_process", "load_model", "save_model", "save_on_master",
    "set_rng_state", "setup_for_distributed",
]
