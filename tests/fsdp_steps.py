"""Training steps under DDP and under FSDP (--fsdp), run by tests/test_sharding.py under torchrun.

Every configuration starts from the same weights and sees the same global batches, split over the
processes; masks come from each image's content (tests/ddp_pretrain_step.ContentMaskedMAE), so they do not
depend on how the batch is split. Rank 0 writes what it saw to argv[1]:

- initial_mae / initial_vit: the full state dicts right after sharding (before any step) of an MAE and of a
  fine-tuning ViT (encoder loaded from a checkpoint, head initialised afterwards), each built after seeding
  with SEED + rank as util/runner.py does, so that every rank first builds different weights;
- step_grads_*: for every configuration, the full gradients that each optimizer step of epoch 0 (both
  epochs for *_odd) applied, after clipping, before the update;
- ddp / fsdp / fsdp_accum / fsdp_ckpt: per-step losses (averaged over ranks) and the final full weights of
  three steps with gradient clipping; fsdp_accum takes twice as many half batches with --accum_iter 2,
  fsdp_ckpt adds activation checkpointing;
- grad_norm_ddp / grad_norm_fsdp: the total gradient norm of the first batch;
- optimizer_ddp / optimizer_fsdp: the saved optimizer state (torch's layout in both);
- resumed / continued: weights after one more epoch, from a checkpoint reloaded into a new FSDP model and
  from the model that never stopped;
- ddp_odd / fsdp_odd: two epochs of three batches with --accum_iter 2, so each epoch ends on a micro-step
  that does not update (its gradients must not reach the next epoch's first update);
- bf16_loss: the first loss with FSDP's bf16 policy; bf16_block_inputs_fsdp / _plain: the dtypes every
  block received in that forward and in the same forward under plain autocast; local_bytes: every rank's
  shard sizes.
The checkpoints (the pre-trained one the ViT loads, and the saved FSDP run) go to the folder argv[2].
"""
import argparse
import copy
import os
import sys
from typing import Dict, List, Optional

import torch
from timm.layers import trunc_normal_
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import models_vit  # noqa: E402
import util.misc as misc  # noqa: E402
from ddp_pretrain_step import ContentMaskedMAE  # noqa: E402
from util.checkpoint import load_pretrained  # noqa: E402
from util.distributed import all_gather_objects, all_reduce_mean  # noqa: E402
from util.engine_loop import train_epoch  # noqa: E402
from util.precision import NativeScalerWithGradNormCount, autocast, get_grad_norm_  # noqa: E402
from util.resume import load_model, save_model  # noqa: E402
from util.runner import wrap_model  # noqa: E402
from util.sharding import full_state_dicts, local_state_bytes, shard_model  # noqa: E402

GLOBAL_BATCH, STEPS, CLIP = 8, 3, 0.5
SEED = 3  # --seed of the initial-weights check
DEVICE = torch.device("cpu")
PRETRAINED = "pretrained.pth"  # in argv[2]: tiny_mae()'s weights, the encoder finetune_vit loads


def tiny_mae(seed: int = 0) -> ContentMaskedMAE:
    """A two-block MAE (one decoder block) at 32 px with 8 px patches, seeded."""
    torch.manual_seed(seed)
    return ContentMaskedMAE(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                            decoder_depth=1, decoder_num_heads=2)


def pretrain_mae(seed: int) -> ContentMaskedMAE:
    """What main_pretrain.py builds after util/runner.py seeded with `seed`, plus a random buffer (the models
    have none, and a buffer must start from rank 0's too)."""
    torch.manual_seed(seed)
    model = ContentMaskedMAE(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                             decoder_depth=1, decoder_num_heads=2)
    model.register_buffer("drawn", torch.randn(5))
    return model


def finetune_vit(seed: int, pretrained: str) -> models_vit.VisionTransformer:
    """What main_finetune.py builds after util/runner.py seeded with `seed`: a ViT with the encoder of
    `pretrained` loaded (--finetune), then its head initialised, as main_finetune does."""
    torch.manual_seed(seed)
    model = models_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                         num_classes=3, global_pool=True, qkv_bias=True)
    load_pretrained(model, pretrained, global_pool=True)
    trunc_normal_(model.head.weight, std=2e-5)
    return model


def full_state(model: torch.nn.Module) -> dict:
    """A sharded model's full state dict (parameters and buffers), on rank 0's CPU (a collective)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def batches(epoch: int, split: int = 1):
    """This rank's part of STEPS global batches (each cut into `split` micro-batches)."""
    world, rank = misc.get_world_size(), misc.get_rank()
    g = torch.Generator().manual_seed(100 + epoch)
    out = []
    for _ in range(STEPS):
        images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
        n = GLOBAL_BATCH // world
        local = images[rank * n:(rank + 1) * n]
        out += [(chunk, torch.zeros(len(chunk))) for chunk in local.chunk(split)]
    return out


def train(model, optimizer, epoch: int, accum_iter: int = 1, amp: str = "none", split: Optional[int] = None):
    """One 'epoch' of STEPS global batches, each cut into `split` (default accum_iter) micro-batches, with
    clipping; returns the per-global-batch losses averaged over ranks."""
    split = accum_iter if split is None else split
    losses = []

    def compute_loss(samples, _targets):
        loss = model(samples, mask_ratio=0.75)[0]
        losses.append(loss.detach())
        return loss

    args = argparse.Namespace(accum_iter=accum_iter, lr=1e-3, min_lr=0.0, warmup_epochs=0, epochs=2, amp=amp,
                              print_freq=100)
    train_epoch(model, batches(epoch, split), optimizer, DEVICE, epoch,
                NativeScalerWithGradNormCount("cpu", enabled=False), compute_loss, args=args, clip_grad=CLIP)
    per_step = torch.stack(losses).reshape(STEPS, split).mean(1)
    return [float(all_reduce_mean(x)) for x in per_step]


def build(fsdp: bool, checkpointing: bool = False, amp: str = "none"):
    model = tiny_mae()
    if checkpointing:
        model.set_grad_checkpointing(True)
    wrapped = wrap_model(model, DEVICE, True, compile=False, fsdp=fsdp, amp=amp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    return wrapped, model, optimizer


def first_grad_norm(model) -> float:
    images, _ = batches(0)[0]
    model(images, mask_ratio=0.75)[0].backward()
    norm = float(get_grad_norm_([p for p in model.parameters() if p.requires_grad]))
    model.zero_grad(set_to_none=True)
    return norm


def record_step_gradients(plain, optimizer) -> List[Dict[str, torch.Tensor]]:
    """A list that gets, at every optimizer step (after clipping, before the update), the full gradient of every
    parameter (gathered from the shards under FSDP: a collective that every rank runs in the same step)."""
    steps: List[Dict[str, torch.Tensor]] = []
    named = [(n, p) for n, p in plain.named_parameters() if p.requires_grad]

    def keep(_optimizer, _args, _kwargs):
        steps.append({n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
                      for n, p in named})

    optimizer.register_step_pre_hook(keep)
    return steps


def block_input_dtypes(model, images: torch.Tensor) -> List[str]:
    """The dtype of every block's input in one bf16 autocast forward (after FSDP's own pre-forward hooks)."""
    seen: List[str] = []
    hooks = [blk.register_forward_pre_hook(lambda _m, args: seen.append(str(args[0].dtype)))
             for blk in [*model.blocks, *model.decoder_blocks]]
    with torch.no_grad(), autocast(DEVICE, "bf16"):
        model(images, mask_ratio=0.75)
    for hook in hooks:
        hook.remove()
    return seen


def main(out_path: str, checkpoint_dir: str) -> None:
    run_args = argparse.Namespace(device="cpu", dist_url="env://", dist_on_itp=False, dist_timeout=5)
    misc.init_distributed_mode(run_args)
    results = {}
    # every rank builds its own random weights (seed + rank, as util/runner.py), then shards them
    pretrained = os.path.join(checkpoint_dir, PRETRAINED)
    if misc.get_rank() == 0:
        torch.save({"model": tiny_mae().state_dict()}, pretrained)
    torch.distributed.barrier()
    seed = SEED + misc.get_rank()
    results["initial_mae"] = full_state(shard_model(pretrain_mae(seed), DEVICE, "none"))
    results["initial_vit"] = full_state(shard_model(finetune_vit(seed, pretrained), DEVICE, "none"))
    for name, fsdp, accum, ckpt in [("ddp", False, 1, False), ("fsdp", True, 1, False),
                                    ("fsdp_accum", True, 2, False), ("fsdp_ckpt", True, 1, True)]:
        model, plain, optimizer = build(fsdp, ckpt)
        if name in ("ddp", "fsdp"):
            results[f"grad_norm_{name}"] = first_grad_norm(model)
        step_grads = record_step_gradients(plain, optimizer)
        results[f"losses_{name}"] = train(model, optimizer, 0, accum)
        results[f"step_grads_{name}"] = list(step_grads)  # epoch 0 only (fsdp trains on below)
        weights, optim_state = copy.deepcopy(full_state_dicts(plain, optimizer))  # not views of live tensors
        results[f"weights_{name}"] = weights
        if name in ("ddp", "fsdp"):
            results[f"optimizer_{name}"] = optim_state
        if name == "fsdp":
            grads_model, _, grads_opt = build(True)
            images, _ = batches(0)[0]
            grads_model(images, mask_ratio=0.75)[0].backward()
            results["local_bytes"] = all_gather_objects({**local_state_bytes(plain, optimizer),
                                                          "grads": local_state_bytes(grads_model, grads_opt)["grads"]})
            # save (gathered), reload into a new sharded model, and continue: as if never stopped
            ckpt_args = argparse.Namespace(output_dir=checkpoint_dir, input_size=32,
                                           resume=os.path.join(checkpoint_dir, "checkpoint-0.pth"), eval=False)
            save_model(ckpt_args, 0, model, plain, optimizer, None)
            torch.distributed.barrier()
            model2, plain2, optimizer2 = build(True)
            load_model(ckpt_args, plain2, optimizer2, None)
            train(model2, optimizer2, 1)
            train(model, optimizer, 1)
            results["resumed"] = full_state_dicts(plain2, optimizer2)[0]
            results["continued"] = full_state_dicts(plain, optimizer)[0]
    for name, fsdp in [("ddp_odd", False), ("fsdp_odd", True)]:
        model, plain, optimizer = build(fsdp)
        results[f"step_grads_{name}"] = record_step_gradients(plain, optimizer)
        results[f"losses_{name}"] = [x for epoch in range(2) for x in train(model, optimizer, epoch, 2, split=1)]
        results[f"weights_{name}"] = copy.deepcopy(full_state_dicts(plain, optimizer)[0])
    model, plain, optimizer = build(True, amp="bf16")
    with autocast(DEVICE, "bf16"):
        results["bf16_loss"] = float(all_reduce_mean(model(batches(0)[0][0], mask_ratio=0.75)[0].detach().float()))
    with autocast(DEVICE, "bf16"):
        plain_loss = tiny_mae()(batches(0)[0][0], mask_ratio=0.75)[0].detach().float()
    results["bf16_loss_plain"] = float(all_reduce_mean(plain_loss))
    results["bf16_block_inputs_fsdp"] = block_input_dtypes(plain, batches(0)[0][0])
    results["bf16_block_inputs_plain"] = block_input_dtypes(tiny_mae(), batches(0)[0][0])
    if misc.get_rank() == 0:
        torch.save(results, out_path)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
