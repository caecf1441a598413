"""What benchmark.py measures with: analytic FLOPs, the matmul peak, peak memory, the timed training step, and
generated JPEGs. The step's configuration is resolved by util/settings.py, as the training scripts resolve it.
"""
import argparse
import gc
import os
import resource
import sys
import time
from multiprocessing import Pool
from typing import Dict, Iterator, Optional

import numpy as np
import torch
from PIL import Image

import models_mae
import models_vit
import util.perf as perf
from util.distributed import all_gather_objects, get_world_size
from util.flag_checks import available_cpus
from util.precision import NativeScalerWithGradNormCount, autocast, cpu_has_native_bf16
from util.settings import resolve_precision
from util.sharding import local_state_bytes, shard_model
from util.transforms import normalize_images


# ----------------------------------------------------------------------------
# analytic FLOPs (multiply-adds x 2), forward pass, per image

def _block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim)  # qkv, proj, fc1 + fc2
    attention = 2 * 2 * tokens * tokens * dim  # q @ k^T and attn @ v
    return linear + attention


def _mlp_ratio(blocks) -> float:
    """Hidden / width of the blocks' MLP (4, or 48/11 for ViT-g)."""
    fc1 = blocks[0].mlp.fc1
    return fc1.out_features / fc1.in_features


def mae_flops(model: models_mae.MaskedAutoencoderViT, mask_ratio: float) -> float:
    """Patch embedding on all patches, encoder on visible + cls, decoder on all tokens + cls."""
    L = model.patch_embed.num_patches
    keep = int(L * (1 - mask_ratio))
    D = model.pos_embed.shape[-1]
    Dd = model.decoder_pos_embed.shape[-1]
    patch_dim = model.patch_embed.proj.weight[0].numel()
    flops = 2 * L * patch_dim * D
    flops += len(model.blocks) * _block_flops(1 + keep, D, _mlp_ratio(model.blocks))
    flops += 2 * (1 + keep) * D * Dd
    flops += len(model.decoder_blocks) * _block_flops(1 + L, Dd, _mlp_ratio(model.decoder_blocks))
    flops += 2 * (1 + L) * Dd * model.decoder_pred.out_features
    return flops


def vit_flops(model: models_vit.VisionTransformer) -> float:
    L = model.patch_embed.num_patches
    D = model.embed_dim
    patch_dim = model.patch_embed.proj.weight[0].numel()
    return (2 * L * patch_dim * D + len(model.blocks) * _block_flops(1 + L, D, _mlp_ratio(model.blocks))
            + 2 * D * model.head.out_features)


# ----------------------------------------------------------------------------

def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of a square matmul on this device."""
    # CPUs without native bf16 emulate it slowly: keep their measurement short
    if device.type == "cuda":
        n = 8192
    elif dtype == torch.float32 or cpu_has_native_bf16():
        n = 2048
    else:
        n = 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def reset_cpu_peak_memory() -> None:
    """Start a new resident-set high-water mark (Linux), so each configuration reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def cpu_peak_memory_gib() -> float:
    """Peak resident set size of this process since the last reset (Linux), else since it started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, kB elsewhere
    return peak / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace, baseline: bool, batches: Optional[Iterator] = None) -> Dict[str, float]:
    """Time `args.steps` training steps of one configuration; return its numbers.

    batches: an endless stream of (images, labels) from a training loader (images normalised on the
    device here when uint8), as the engines take them; None for one synthetic batch on the device.
    """
    device = torch.device(args.device)
    torch.manual_seed(0)
    if baseline:
        amp = "fp16" if device.type == "cuda" else "none"
        attn, patch_embed, opt_impl, host_sync = "math", "conv", "default", True
    else:
        # what "auto" stands for, resolved as the training scripts resolve it, so the report names what ran
        chosen = resolve_precision(device, None if args.amp == "auto" else args.amp, args.compile, args.fsdp,
                                   args.attn, args.patch_embed)
        amp, attn, patch_embed = chosen["amp"], chosen["attn"], chosen["patch_embed"]
        opt_impl, host_sync = perf.adamw_impl(args.optimizer, device), False

    layers = dict(attn=attn, patch_embed=patch_embed)
    fsdp = args.fsdp and not baseline
    if args.mode == "pretrain":
        model = models_mae.create_model(args.model, img_size=args.input_size, norm_pix_loss=True, **layers)
        flops = mae_flops(model, args.mask_ratio)
    else:
        model = models_vit.create_model(args.model, img_size=args.input_size, num_classes=1000,
                                        drop_path_rate=0.1, global_pool=True, **layers)
        flops = vit_flops(model)
    if args.grad_checkpointing and not baseline:
        model.set_grad_checkpointing(True)
    if fsdp:
        shard_model(model, device, amp)  # moves each process's shards to the device
    model.to(device).train()
    optimizer = perf.adamw(model.parameters(), 1e-4, device, betas=(0.9, 0.95), impl=opt_impl)
    scaler = NativeScalerWithGradNormCount(device.type, enabled=amp == "fp16")
    step_fn = model
    compiled = not baseline and chosen["compile"]
    if compiled:
        step_fn = torch.compile(model, mode=args.compile_mode)

    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    def step(keep_grads: bool = False) -> torch.Tensor:
        nonlocal x, y
        if batches is not None:
            images, labels = next(batches)
            x = normalize_images(images.to(device, non_blocking=True))
            y = labels.to(device, non_blocking=True)
        with autocast(device, amp):
            if args.mode == "pretrain":
                loss = step_fn(x, mask_ratio=args.mask_ratio)[0]
            else:
                loss = torch.nn.functional.cross_entropy(step_fn(x), y)
        scaler(loss, optimizer)
        if not keep_grads:
            optimizer.zero_grad(set_to_none=True)
        if host_sync:
            loss.item()
        return loss

    for _ in range(args.warmup):
        step()
    sync(device)
    # peak memory of the timed steps (model, optimizer state and activations), as on CUDA
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        gc.collect()
        reset_cpu_peak_memory()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    img_s = args.batch_size * args.steps / seconds
    tflops = 3 * flops * img_s / 1e12
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else cpu_peak_memory_gib()
    step(keep_grads=True)  # one more step, to count the gradients this process holds
    held = local_state_bytes(model, optimizer)
    optimizer.zero_grad(set_to_none=True)
    per_process = all_gather_objects({"mem_gib": mem, **{f"{k}_gib": v / 2 ** 30 for k, v in held.items()}})
    n_params = sum(p.numel() for p in model.parameters())
    return {"config": "baseline" if baseline else "default", "amp": amp, "attn": attn, "patch_embed": patch_embed,
            "optimizer": opt_impl, "compile": bool(compiled), "fsdp": fsdp,
            "grad_checkpointing": bool(args.grad_checkpointing and not baseline), "processes": get_world_size(),
            "params_m": n_params / 1e6, "img_s": img_s * get_world_size(), "tflops": tflops * get_world_size(),
            "gflops_per_img": 3 * flops / 1e9, "mem_gib": max(p["mem_gib"] for p in per_process),
            "per_process": per_process}


# ----------------------------------------------------------------------------
# input pipeline

def _write_jpeg(job) -> None:
    """One ImageNet-like JPEG: 500x375, smooth content plus grain, ~105 kB at quality 90."""
    path, seed = job
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    arr = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 22, (375, 500, 3)).astype(np.int16)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpeg_folder(root: str, images: int, classes: int = 10) -> str:
    """root/train/<class>/<i>.jpg with `images` generated JPEGs; return root."""
    jobs = []
    for i in range(images):
        d = os.path.join(root, "train", f"class{i % classes}")
        os.makedirs(d, exist_ok=True)
        jobs.append((os.path.join(d, f"{i}.jpg"), i))
    with Pool(max(1, min(len(jobs), available_cpus()))) as pool:
        pool.map(_write_jpeg, jobs)
    return root
