"""Training-step throughput of MAE pre-training and ViT fine-tuning on synthetic data.

    python benchmark.py --mode pretrain --model mae_vit_base_patch16 --batch_size 8 --compare

Reports images/s, achieved TFLOP/s from an analytic FLOP count, the matmul peak measured on the same
device in the same run (fp32 and bf16), utilisation, and peak memory. `--baseline` runs the reference
configuration (fp32 on CPU / fp16 + grad scaler on CUDA, default AdamW, a host sync every step,
convolutional patch embedding, explicit attention); `--compare` runs the baseline and the defaults of
the training scripts one after the other and prints the ratio.

    torchrun --nproc_per_node 8 benchmark.py --model mae_vit_giant_patch14 --batch_size 64 --fsdp --grad_checkpointing

shards the model with FSDP2 (`--fsdp`, also in one process) and/or recomputes activations per block
(`--grad_checkpointing`), and reports every process's peak memory and the bytes of parameters, gradients and
AdamW state it holds (its shards), for memory planning.

    python benchmark.py --mode data --num_workers 10 --batch_size 256 --data_loader torch dali

measures the input pipeline instead: JPEG decoding and the training augmentation through the training
loader (torch's DataLoader or DALI's), on `--data_path` (an ImageFolder root with train/) or on generated
ImageNet-sized JPEGs, to compare with the model's img/s.

    python benchmark.py --mode e2e --batch_size 256 --amp bf16 --data_loader torch dali

runs the real training step fed by the real loader(s) and prints each rate next to the synthetic-data
rate of the same model, batch and precision, measured in the same run.
"""
import argparse
import gc
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from multiprocessing import Pool
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

import models_mae
import models_vit
import util.cli as cli
import util.perf as perf
import util.dali as dali
from util.datasets import ImageFolder, train_loader
from util.distributed import (all_gather_objects, destroy_process_group, get_world_size, init_distributed_mode,
                              init_single_process_group, is_main_process)
from util.errors import UserError
from util.layers import ATTN_IMPLS, PATCH_EMBED_IMPLS
from util.precision import NativeScalerWithGradNormCount, autocast, cpu_has_native_bf16, resolve_amp
from util.sharding import local_state_bytes, shard_model
from util.transforms import build_transform, normalize_images, pretrain_transform


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
        amp = resolve_amp(None if args.amp == "auto" else args.amp, device)
        # what "auto" stands for (as in the training scripts), so the report names the choices that ran
        attn, patch_embed = perf.resolve_layers(device.type, amp, args.attn, args.patch_embed)
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
    if args.compile and not baseline and not fsdp:
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
            "optimizer": opt_impl, "compile": bool(args.compile and not baseline and not fsdp), "fsdp": fsdp,
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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with Pool(max(1, min(len(jobs), cores))) as pool:
        pool.map(_write_jpeg, jobs)
    return root


FINETUNE_DEFAULTS = dict(color_jitter=None, aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1)


def loader_stream(args: argparse.Namespace, kind: str) -> Tuple[Iterator, Dict[str, float]]:
    """An endless stream of training batches from the `kind` loader ('torch' or 'dali') over
    args.data_path/train with the --transform's augmentation; and facts about it (images, set-up seconds)."""
    root = os.path.join(args.data_path, "train")
    start = time.perf_counter()
    if kind == "dali":
        dataset = ImageFolder(root)
        aug = dali.finetune_aug(argparse.Namespace(input_size=args.input_size, **FINETUNE_DEFAULTS)) \
            if args.transform == "finetune" else dali.pretrain_aug(args.input_size)
        # checks every file first (util/dali.py): part of the set-up time
        loader = dali.dali_train_loader(dataset, aug, args.batch_size, args.num_workers, 0, torch.device(args.device))
    else:
        if args.transform == "pretrain":  # as main_pretrain.py: uint8 out, normalised on the device
            transform = pretrain_transform(args.input_size, normalize=False)
        elif args.transform == "pretrain-float":  # as the reference: normalised floats out of the workers
            transform = pretrain_transform(args.input_size)
        else:  # the fine-tuning defaults: RandAugment, random erasing
            transform = build_transform(True, argparse.Namespace(input_size=args.input_size, **FINETUNE_DEFAULTS))
        dataset = ImageFolder(root, transform=transform)
        loader = train_loader(dataset, args.batch_size, args.num_workers, pin_mem=True, seed=0)
    setup_s = time.perf_counter() - start

    def batches():
        for epoch in itertools.count():
            loader.sampler.set_epoch(epoch)
            yield from loader

    return batches(), {"images": len(dataset), "setup_s": setup_s}


def data_throughput(args: argparse.Namespace, kind: str = "torch") -> Dict[str, float]:
    """Images/s delivered by the training loader (decode + augmentation + collate), torch's or DALI's."""
    stream, info = loader_stream(args, kind)
    device = torch.device(args.device)
    for _ in range(args.warmup):  # worker start-up, pipeline definition
        next(stream)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(stream)
    sync(device)
    img_s = args.batch_size * args.steps / (time.perf_counter() - start)
    return {"loader": kind, "img_s": img_s, "img_s_per_worker": img_s / max(1, args.num_workers), **info}


def with_jpeg_folder(args: argparse.Namespace, body) -> Tuple[str, object]:
    """body(args) on --data_path, or on --data_images generated JPEGs in a temporary folder."""
    if args.data_path is not None:
        return args.data_path, body(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpeg_folder(tmp, args.data_images)
        return f"{args.data_images} generated 500x375 JPEGs", body(argparse.Namespace(**{**vars(args),
                                                                                        "data_path": folder}))


def _ratio_line(results: List[Dict[str, float]]) -> Optional[str]:
    rates = {r["loader"]: r["img_s"] for r in results}
    if "torch" in rates and "dali" in rates:
        return f"dali / torch: {rates['dali'] / rates['torch']:.2f}x"
    return None


def main_data(args: argparse.Namespace) -> int:
    try:
        source, results = with_jpeg_folder(args, lambda a: [data_throughput(a, k) for k in args.data_loader])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"input pipeline: {source}, {args.transform} transform, {args.input_size}px, "
          f"batch {args.batch_size}, {args.num_workers} workers (dali: threads), device {args.device}")
    for r in results:
        print(f"  {r['loader']:>5}: {r['img_s']:8.1f} img/s ({r['img_s_per_worker']:.1f} per worker), "
              f"set-up {r['setup_s']:.2f} s for {r['images']} images")
    if _ratio_line(results):
        print(f"  {_ratio_line(results)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "source": source, "results": results}, f, indent=2)
    return 0


def main_e2e(args: argparse.Namespace) -> int:
    """The training step fed by the real loader(s), next to the synthetic-data rate of the same step."""
    args.mode = "finetune" if args.transform == "finetune" else "pretrain"  # the step that takes these images
    if args.model is None:
        args.model = "mae_vit_base_patch16" if args.mode == "pretrain" else "vit_base_patch16"

    def body(a: argparse.Namespace) -> List[Dict[str, float]]:
        results = [{"loader": "synthetic", **run(a, baseline=False)}]
        for kind in a.data_loader:
            stream, info = loader_stream(a, kind)
            results.append({"loader": kind, **run(a, baseline=False, batches=stream), **info})
        return results

    try:
        source, results = with_jpeg_folder(args, body)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    synthetic = results[0]["img_s"]
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    print(f"end to end: {name}, {args.mode} {args.model}, batch {args.batch_size}, {args.input_size}px, "
          f"amp {results[0]['amp']}, compile {results[0]['compile']}; {source}, {args.transform} transform, "
          f"{args.num_workers} workers (dali: threads), {os.cpu_count()} cores")
    for r in results:
        print(f"  {r['loader']:>9}: {r['img_s']:8.1f} img/s, {r['img_s'] / synthetic:6.1%} of synthetic")
    if _ratio_line(results[1:]):
        print(f"  {_ratio_line(results[1:])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, "source": source, "results": results}, f, indent=2)
    return 0


def main(argv=None) -> int:
    """Run the benchmark the command line (or `argv`) asks for; return the exit code."""
    try:
        return _main(argv)
    finally:
        destroy_process_group()  # the one --fsdp or torchrun made, if any


def get_args_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (a parent parser, as the entry points': command_line_parser adds -h/--help)."""
    parser = argparse.ArgumentParser("MAE / ViT training-step benchmark", add_help=False,
                                     description="Throughput of the training step (synthetic data), of the input "
                                                 "pipeline, or of both together; see the top of benchmark.py.")
    bench = parser.add_argument_group("benchmark parameters", "what is measured and how long")
    bench.add_argument("--mode", choices=["pretrain", "finetune", "data", "e2e"], default="pretrain",
                       help="time a training step on synthetic data, (data) the input pipeline, or (e2e) the "
                            "training step fed by the input pipeline next to its synthetic-data rate")
    bench.add_argument("--steps", type=int, default=10, help="timed steps (training steps; data mode: batches)")
    bench.add_argument("--warmup", type=int, default=3,
                       help="untimed steps before them (compilation, autotuning, loader workers starting)")
    bench.add_argument("--baseline", action="store_true",
                       help="only the reference configuration: fp32 on CPU / fp16 + grad scaler on CUDA, torch's "
                            "plain AdamW, a host sync every step, convolutional patch embedding, explicit attention")
    bench.add_argument("--compare", action="store_true",
                       help="the reference configuration, then the one the step flags choose (as the training "
                            "scripts by default), and their ratio")
    bench.add_argument("--no_peak", action="store_true",
                       help="skip the matmul peak measurement (fp32 and bf16), and with it the utilisation")
    bench.add_argument("--json", default=None, help="also write the flags and results to this file (default: none)")
    model = parser.add_argument_group("model parameters")
    model.add_argument("--model", default=None,
                       help="model name (default: mae_vit_base_patch16 for pretrain, vit_base_patch16 for finetune; "
                            "e2e mode: the one that --transform trains)")
    model.add_argument("--batch_size", type=int, default=8, help="images per step (and per loader batch), per process")
    model.add_argument("--input_size", type=int, default=224, help="image size in pixels (square)")
    model.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of the patches removed (MAE steps)")
    step = parser.add_argument_group("step parameters", "the configuration measured (auto: as the training scripts "
                                                        "choose); --baseline fixes its own")
    step.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    step.add_argument("--amp", default="auto", choices=["auto", "fp16", "bf16", "none"],
                      help="mixed precision (auto: as the training scripts choose for the device; bf16 on CUDA "
                           "with --fsdp)")
    step.add_argument("--attn", default="auto", choices=["auto", *ATTN_IMPLS],
                      help="attention kernel (auto: the faster one measured for the device and precision)")
    step.add_argument("--patch_embed", default="auto", choices=["auto", *PATCH_EMBED_IMPLS],
                      help="patch embedding as a convolution or as patchify + one matmul (auto: linear)")
    step.add_argument("--optimizer", default="auto", choices=["auto", *perf.ADAMW_IMPLS],
                      help="AdamW implementation (auto: fused where torch has it for the device)")
    step.add_argument("--compile", action="store_true", default=None,
                      help="torch.compile the model (default: as the training scripts, on for CUDA; never with "
                           "--fsdp)")
    step.add_argument("--no_compile", action="store_false", dest="compile", help="do not torch.compile the model")
    step.add_argument("--compile_mode", default=None,
                      help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: torch's default)")
    scaling = parser.add_argument_group("scaling parameters")
    scaling.add_argument("--fsdp", action="store_true",
                         help="shard with FSDP2 as main_pretrain.py --fsdp (torchrun for several processes); "
                              "--amp auto is bf16 on CUDA then")
    scaling.add_argument("--grad_checkpointing", action="store_true", help="activation checkpointing per block")
    data = parser.add_argument_group("data parameters", "data and e2e modes")
    data.add_argument("--data_path", default=None, help="ImageFolder root with train/ "
                      "(default: generate --data_images JPEGs in a temporary folder)")
    data.add_argument("--data_images", type=int, default=1024,
                      help="how many 500x375 JPEGs to generate when --data_path is not given")
    data.add_argument("--num_workers", type=int, default=10, help="DataLoader worker processes (dali: threads)")
    data.add_argument("--transform", choices=["pretrain", "pretrain-float", "finetune"], default="pretrain",
                      help="the augmentation to time (pretrain-float: the reference's float output); e2e times MAE "
                           "pre-training for pretrain, ViT fine-tuning for finetune")
    data.add_argument("--data_loader", nargs="+", choices=dali.LOADERS, default=["torch"],
                      help="the loader(s) to time, one after the other in this process (dali: NVIDIA DALI with "
                           "--num_workers threads)")
    return parser


def _main(argv=None) -> int:
    parser = cli.command_line_parser(get_args_parser())
    args = parser.parse_args(argv)
    if args.mode in ("data", "e2e"):
        if args.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print(f"error: --mode {args.mode} runs in one process without --fsdp; time sharded steps with "
                  f"--mode pretrain or finetune", file=sys.stderr)
            return 2
        if "dali" in args.data_loader and not dali.dali_available():
            print(f"error: --data_loader dali needs NVIDIA DALI: {dali.install_command()}", file=sys.stderr)
            return 2
        if args.compile is None:
            args.compile = args.device.startswith("cuda")
        return main_data(args) if args.mode == "data" else main_e2e(args)
    if args.model is None:
        args.model = "mae_vit_base_patch16" if args.mode == "pretrain" else "vit_base_patch16"
    device = torch.device(args.device)
    if args.compile is None:
        args.compile = device.type == "cuda" and not args.fsdp
    if args.fsdp:
        if args.amp == "fp16":
            print("error: --fsdp does not support --amp fp16; use --amp bf16 or none", file=sys.stderr)
            return 2
        if args.amp == "auto" and device.type == "cuda":
            args.amp = "bf16"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (not args.fsdp or args.baseline or args.compare):
        # without --fsdp the processes would train independently (no DDP here), not as one data-parallel run
        if os.environ.get("RANK", "0") == "0":
            print("error: several processes need --fsdp (and no --baseline / --compare): there is no DDP here",
                  file=sys.stderr)
        return 2
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: one process per GPU
        dist_args = argparse.Namespace(device=args.device, dist_url="env://", dist_on_itp=False)
        init_distributed_mode(dist_args)
        if device.type == "cuda":
            device = torch.device("cuda", dist_args.gpu)
            args.device = str(device)
    elif args.fsdp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        init_single_process_group(device.type)
    torch.set_float32_matmul_precision("highest")

    configs = [True, False] if args.compare else [args.baseline]
    results = [run(args, baseline) for baseline in configs]
    peaks = {}
    if not args.no_peak:
        peaks = {"peak_fp32_tflops": matmul_peak(device, torch.float32),
                 "peak_bf16_tflops": matmul_peak(device, torch.bfloat16)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if not is_main_process():
        return 0
    print(f"device: {name}, {args.mode} {args.model} ({results[-1]['params_m']:.1f}M parameters), batch "
          f"{args.batch_size} per process, {args.input_size}px, {get_world_size()} process(es)")
    if peaks:
        print(f"measured matmul peak: fp32 {peaks['peak_fp32_tflops']:.2f} TFLOP/s, "
              f"bf16 {peaks['peak_bf16_tflops']:.2f} TFLOP/s")
    for r in results:
        # fp16 runs are set against the bf16 matmul peak: the same 16-bit tensor-core rate
        peak = peaks.get("peak_fp32_tflops" if r["amp"] == "none" else "peak_bf16_tflops")
        # tflops sums every process's; the peak is one device's
        r["utilisation"] = r["tflops"] / (peak * r["processes"]) if peak else None
        kind = "fp32" if r["amp"] == "none" else "16-bit"
        per = f" x {r['processes']}" if r["processes"] > 1 else ""
        util_s = f", {100 * r['utilisation']:.0f}% of the {kind} peak{per}" if peak else ""
        print(f"{r['config']:>8}: {r['img_s']:8.1f} img/s, {r['tflops']:7.2f} TFLOP/s{util_s}, "
              f"peak mem {r['mem_gib']:.2f} GiB  (amp {r['amp']}, attn {r['attn']}, patch_embed "
              f"{r['patch_embed']}, optimizer {r['optimizer']}, compile {r['compile']}, fsdp {r['fsdp']}, "
              f"grad_checkpointing {r['grad_checkpointing']})")
        for rank, p in enumerate(r["per_process"]):
            print(f"          process {rank}: peak mem {p['mem_gib']:.3f} GiB; holds parameters {p['params_gib']:.3f}, "
                  f"gradients {p['grads_gib']:.3f}, AdamW state {p['optimizer_gib']:.3f} GiB")
    if len(results) == 2:
        print(f"speed-up over baseline: {results[1]['img_s'] / results[0]['img_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, **peaks, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
