"""Sharded data parallelism (--fsdp, PyTorch's FSDP2) and the full state dicts that keep checkpoints as they were.

With `--fsdp` every transformer block, then the whole model, is wrapped with
`torch.distributed.fsdp.fully_shard` on a 1-D device mesh over all processes: each process keeps 1/N of
every parameter, of its gradient and of the AdamW moments, and a block's full parameters exist only while
that block runs (all-gathered before, freed after). Mixed precision goes through FSDP's own policy: the
blocks' parameters are all-gathered in the --amp dtype, their LayerNorms' and the root's (embeddings,
tokens, position tables, norms, head: few parameters) in fp32; gradients are reduced in fp32 and the
sharded master weights stay fp32. Nobody casts forward inputs but autocast, so the residual stream stays
fp32 as without --fsdp.

Checkpoints keep the usual single-file format: the model as a full (unsharded) state dict, and the
optimizer as the full state dict in torch's own layout (integer parameter ids, as `optimizer.state_dict()`
writes it), gathered through `torch.distributed.checkpoint.state_dict` onto rank 0's CPU. A checkpoint
written with --fsdp therefore loads anywhere a DDP one does (fine-tuning, --eval, export, the reference),
and resumes with --fsdp or without, on any number of processes.

References:
    FSDP2: https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html
"""
from contextlib import contextmanager, nullcontext
from typing import Any, Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from util.distributed import dist_device, get_world_size
from util.errors import CheckpointError
from util.precision import AMP_DTYPES


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model wrapped with fully_shard (--fsdp)."""
    return isinstance(model, FSDPModule)


def transformer_blocks(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The blocks that become their own FSDP units: `blocks`, then `decoder_blocks` where there are some."""
    return [*getattr(model, "blocks", []), *getattr(model, "decoder_blocks", [])]


def layer_norms(block: torch.nn.Module) -> List[torch.nn.Module]:
    """A block's LayerNorms with parameters: fp32 units of their own inside the block's unit (see shard_model)."""
    return [m for m in block.modules() if isinstance(m, torch.nn.LayerNorm) and m.weight is not None]


def broadcast_module_state(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, in place, one tensor at a time (a collective).

    What DDP does when it wraps a model. Every rank seeds with `seed + rank` (util/runner.py, as the reference),
    so each builds its own random initialisation, and fully_shard keeps each rank's own slice of it: without
    this, a sharded model would start from a patchwork of every rank's weights. Each tensor goes through the
    process group's device (dist_device: nccl takes no CPU tensor), so device memory grows by one tensor.
    """
    if get_world_size() == 1:
        return
    device = dist_device()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device == device and tensor.is_contiguous():
                dist.broadcast(tensor, src=0)
            else:
                staged = tensor.to(device, memory_format=torch.contiguous_format)
                dist.broadcast(staged, src=0)
                tensor.copy_(staged)


def shard_model(model: torch.nn.Module, device: torch.device, amp: str) -> torch.nn.Module:
    """fully_shard every transformer block, then the root, on a 1-D mesh over all processes; returns `model`.

    First every rank takes rank 0's weights and buffers (broadcast_module_state), so a sharded run starts from
    the model that one process or DDP would build with the same --seed.

    Blocks gather their parameters in the --amp dtype, except their LayerNorms, which are fp32 units of
    their own (a LayerNorm takes the fp32 residual stream: CPU autocast does not cast its weights, and
    under CUDA autocast it runs in fp32 anyway). The root unit, which holds what is left (patch embedding,
    tokens, position tables, final norms, decoder embedding and prediction, head), keeps fp32 too, so
    `patch_embed(x) + pos_embed` is fp32 as under plain autocast. Forward inputs are not cast by FSDP
    (cast_forward_inputs=False): autocast does the casting, as without --fsdp, so the residual stream,
    the loss and its pixel targets stay fp32, and the matmuls run in the --amp dtype either way.
    """
    broadcast_module_state(model)
    mesh = init_device_mesh(device.type, (get_world_size(),))
    block_policy = MixedPrecisionPolicy(param_dtype=AMP_DTYPES[amp], reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)
    root_policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in transformer_blocks(model):
        for norm in layer_norms(block):
            fully_shard(norm, mesh=mesh, mp_policy=root_policy)
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    return model


@contextmanager
def _fsdp_no_sync(model: FSDPModule) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Context for one micro-step: with `enabled` False, gradients are only accumulated locally (DDP's
    no_sync(), FSDP's set_requires_gradient_sync(False)) and reduced at the step that updates."""
    if enabled:
        return nullcontext()
    if is_sharded(model):
        return _fsdp_no_sync(model)
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


# ----------------------------------------------------------------------------
# full state dicts

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> List[List[str]]:
    """For each optimizer group, the model's name of each of its parameters, in the group's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not the model's") from None


def optimizer_state_to_ids(state: Dict[str, Any], names: List[List[str]]) -> Dict[str, Any]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint's layout) in torch's own layout:
    parameters numbered 0, 1, ... through the groups in order, as `Optimizer.state_dict()` numbers them."""
    ids = {name: i for i, name in enumerate(n for group in names for n in group)}
    groups = []
    for group, group_names in zip(state["param_groups"], names):
        if list(group["params"]) != group_names:
            raise ValueError("the gathered optimizer groups do not list the optimizer's parameters in order")
        groups.append({**group, "params": [ids[n] for n in group_names]})
    return {"state": {ids[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def optimizer_state_to_names(state: Dict[str, Any], names: List[List[str]]) -> Dict[str, Any]:
    """The inverse of optimizer_state_to_ids for this optimizer's groups (a ValueError when they differ)."""
    if len(state["param_groups"]) != len(names):
        raise ValueError(f"{len(state['param_groups'])} parameter groups saved, the optimizer has {len(names)}")
    by_id: Dict[int, str] = {}
    groups = []
    for i, (group, group_names) in enumerate(zip(state["param_groups"], names)):
        if len(group["params"]) != len(group_names):
            raise ValueError(f"group {i} holds {len(group['params'])} parameters saved, {len(group_names)} here")
        by_id.update(zip(group["params"], group_names))
        groups.append({**group, "params": list(group_names)})
    return {"state": {by_id[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                     ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model state dict, optimizer state dict), unsharded, in the usual formats.

    For a sharded model this is a collective (every rank must call it): each tensor is all-gathered in
    turn and copied to rank 0's CPU memory, so device memory grows by one tensor at a time, rank 0's host
    memory by the whole model and optimizer (16 bytes per parameter), and other ranks get empty dicts.
    """
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    model_state = get_model_state_dict(model, options=_FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not optim_state:  # not rank 0
        return model_state, {}
    return model_state, optimizer_state_to_ids(optim_state, _param_names(model, optimizer))


def load_model_state(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load a full state dict strictly; a sharded model takes its own slice of every tensor (any world size)."""
    if is_sharded(model):
        set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        model.load_state_dict(state_dict, strict=True)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any],
                         source: str) -> None:
    """Load a full optimizer state dict (torch's layout); a sharded optimizer takes its slices."""
    try:
        if is_sharded(model):
            named = optimizer_state_to_names(state, _param_names(model, optimizer))
            set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"optimizer state in {source} does not fit: {e}") from None


# ----------------------------------------------------------------------------
# memory accounting

def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """Bytes this process holds of parameters, gradients and optimizer state (its shards under --fsdp)."""
    params = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    grads = sum(_local(p.grad).numel() * _local(p.grad).element_size()
                for p in model.parameters() if p.grad is not None)
    optim = sum(_local(v).numel() * _local(v).element_size()
                for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"params": params, "grads": grads, "optimizer": optim}
