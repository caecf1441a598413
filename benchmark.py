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
import itertools
import json
import os
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch

import main_finetune
import make_shards
import util.cli as cli
import util.loaders as loaders
import util.perf as perf
from util.bench import make_jpeg_folder, matmul_peak, run, sync
from util.config import settings_from_flags
from util.datasets import ImageFolder, train_loader
from util.distributed import get_world_size, is_main_process
from util.errors import UserError
from util.flag_checks import check_fsdp_flags
from util.layers import ATTN_IMPLS, PATCH_EMBED_IMPLS
from util.optional import require_dali
from util.recipes import pretrain_recipe
from util.sources import open_split
from util.settings import join
from util.transforms import pretrain_transform


def finetune_recipe_of_defaults(input_size: int):
    """main_finetune.py's training recipe with its default flags."""
    defaults = main_finetune.get_args_parser().parse_args([])
    return main_finetune.train_recipe(settings_from_flags({**vars(defaults), "input_size": input_size,
                                                           "entry": "main_finetune"}))


def loader_stream(args: argparse.Namespace, kind: str) -> Tuple[Iterator, Dict[str, float]]:
    """An endless stream of training batches from the `kind` loader ('torch' or 'dali') over
    args.data_path/train with the --transform's recipe, as the training scripts build it (util/loaders.py);
    and facts about it (images, set-up seconds)."""
    root = os.path.join(args.data_path, "train")
    device = torch.device(args.device)
    start = time.perf_counter()
    if args.transform == "pretrain-float":  # as the reference: normalised floats out of the workers, on the host
        if kind == "dali":
            raise UserError("--transform pretrain-float is the torch loader's reference output; use --transform "
                            "pretrain with --data_loader dali")
        dataset = ImageFolder(root, transform=pretrain_transform(args.input_size))
        loader = train_loader(dataset, args.batch_size, args.num_workers, pin_mem=True, seed=0)
    else:
        recipe = finetune_recipe_of_defaults(args.input_size) if args.transform == "finetune" \
            else pretrain_recipe(args.input_size)
        dataset = open_split(args.data_path, "train", unlabeled_ok=True, in_chans=args.in_chans)  # any source
        if args.in_chans != 3:  # the throughput does not depend on the statistics
            recipe = recipe.normalized((0.5,) * args.in_chans, (0.25,) * args.in_chans)
        # DALI checks every file first (util/dali.py): part of the set-up time
        loader = loaders.train_loader(kind, dataset, recipe, args.batch_size, args.num_workers, True, 0, device)
    setup_s = time.perf_counter() - start

    def batches():
        for epoch in itertools.count():
            loader.sampler.set_epoch(epoch)
            yield from loader

    return batches(), {"images": len(dataset), "setup_s": setup_s, "source": SOURCE_NAMES.get(type(dataset).__name__,
                                                                                           type(dataset).__name__)}


SOURCE_NAMES = {"ImageFolder": "files", "UnlabeledFolder": "files", "ShardDataset": "shards",
                "HFImages": "hf dataset"}


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


def _with_shards(args: argparse.Namespace) -> List[Dict[str, float]]:
    """data_throughput of each loader on --data_path; with --shards, then of each loader on the same images
    written as WebDataset shards (make_shards.py) in a temporary folder."""
    results = [data_throughput(args, k) for k in args.data_loader]
    if args.shards:
        with tempfile.TemporaryDirectory() as tmp:
            make_shards.write_split(os.path.join(args.data_path, "train"), os.path.join(tmp, "train"), "train",
                                    args.shard_size, 1e9)
            on_shards = argparse.Namespace(**{**vars(args), "data_path": tmp})
            results += [data_throughput(on_shards, k) for k in args.data_loader]
    return results


def main_data(args: argparse.Namespace) -> int:
    source, results = with_jpeg_folder(args, _with_shards)
    print(f"input pipeline: {source}, {args.transform} transform, {args.input_size}px, "
          f"batch {args.batch_size}, {args.num_workers} workers (dali: threads), device {args.device}")
    for r in results:
        print(f"  {r['loader']:>5} ({r['source']}): {r['img_s']:8.1f} img/s ({r['img_s_per_worker']:.1f} per "
              f"worker), set-up {r['setup_s']:.2f} s for {r['images']} images")
    sources = list(dict.fromkeys(r["source"] for r in results))
    for name in sources:
        line = _ratio_line([r for r in results if r["source"] == name])
        if line:
            print(f"  {line} ({name})")
    if len(sources) == 2:  # --shards: the same images from the folder and from its shards
        for kind in args.data_loader:
            a, b = ([r["img_s"] for r in results if r["source"] == name and r["loader"] == kind] for name in sources)
            print(f"  {kind}, {sources[1]} / {sources[0]}: {b[0] / a[0]:.2f}x")
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

    source, results = with_jpeg_folder(args, body)
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
    """Run the benchmark the command line (or `argv`) asks for; return the exit code (cli.launch: one `error:`
    line for a mistake, and the process group --fsdp or torchrun made is left)."""
    return cli.launch(benchmark, cli.command_line_parser(get_args_parser()).parse_args(argv))


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
    data.add_argument("--shards", action="store_true",
                      help="data mode: also write the training images as WebDataset shards (make_shards.py) in a "
                           "temporary folder and time each --data_loader on them, next to the files")
    data.add_argument("--shard_size", type=int, default=1000, help="images per shard for --shards")
    data.add_argument("--in_chans", type=int, default=3,
                      help="data mode: channels per image of --data_path (other than 3: read at full precision, "
                           "util/pixels.py)")
    data.add_argument("--data_loader", nargs="+", choices=loaders.LOADERS, default=["torch"],
                      help="the loader(s) to time, one after the other in this process (dali: NVIDIA DALI with "
                           "--num_workers threads)")
    return parser


def benchmark(args: argparse.Namespace) -> int:
    """The measurement the flags ask for, printed (and written to --json)."""
    if args.mode in ("data", "e2e"):
        if args.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(f"--mode {args.mode} runs in one process without --fsdp; time sharded steps with "
                            f"--mode pretrain or finetune")
        if "dali" in args.data_loader:
            require_dali()
        return main_data(args) if args.mode == "data" else main_e2e(args)
    if args.model is None:
        args.model = "mae_vit_base_patch16" if args.mode == "pretrain" else "vit_base_patch16"
    # the training scripts' checks of --fsdp with --amp and --compile
    check_fsdp_flags(settings_from_flags({"fsdp": args.fsdp, "amp": None if args.amp == "auto" else args.amp,
                                          "compile": args.compile}))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (not args.fsdp or args.baseline or args.compare):
        # without --fsdp the processes would train independently (no DDP here), not as one data-parallel run
        raise UserError("several processes need --fsdp (and no --baseline / --compare): there is no DDP here")
    # joined as the training scripts join: torchrun's group (one process per GPU), or with --fsdp a group of one
    device, _ = join(args.device, "env://", False, 30, args.fsdp)
    args.device = str(device)
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
