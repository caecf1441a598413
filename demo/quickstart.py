"""Quickstart: MAE end to end on real images that ship with scikit-learn, on a laptop CPU.

    python demo/quickstart.py --output_dir quickstart

1. writes scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as an ImageFolder with a
   fixed stratified train/val split, upsampled to --input_size;
2. pre-trains a tiny MAE through main_pretrain.py;
3. linear-probes (main_linprobe.py) the MAE encoder and, as a baseline, a randomly initialised one;
4. fine-tunes (main_finetune.py) from the MAE checkpoint and, as a baseline, from scratch (same recipe);
5. writes DIR/summary.json, DIR/reconstruction.png and prints a table.

Every stage runs the real entry point in a subprocess, with the flags shown in DIR/commands.txt.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL = "tiny"  # mae_vit_tiny_patch16 / vit_tiny_patch16


def write_digits(root: str, input_size: int, val_fraction: float = 0.2, seed: int = 0) -> Dict[str, int]:
    """Write the digits as root/{train,val}/<digit>/<index>.png (RGB, bicubic upsampling); return counts.

    The split is stratified and fixed by `seed`; files that already exist are kept.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, labels = digits.images, digits.target  # [1797, 8, 8] in 0..16, [1797]
    idx_train, idx_val = train_test_split(np.arange(len(labels)), test_size=val_fraction, random_state=seed,
                                          stratify=labels)
    counts = {}
    for split, indices in (("train", idx_train), ("val", idx_val)):
        for i in sorted(indices):
            d = os.path.join(root, split, str(labels[i]))
            path = os.path.join(d, f"{i:04d}.png")
            if not os.path.exists(path):
                os.makedirs(d, exist_ok=True)
                pixels = (images[i] * (255.0 / 16.0)).round().astype(np.uint8)
                img = Image.fromarray(pixels, mode="L").resize((input_size, input_size), Image.BICUBIC)
                img.convert("RGB").save(path)
        counts[split] = len(indices)
    return counts


def run_stage(name: str, script: str, flags: List[str], log_file) -> float:
    """Run one entry point; return the seconds it took. Output goes to the stage log."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, flags)]
    log_file.write(f"# {name}\n{' '.join(shlex.quote(c) for c in cmd)}\n\n")
    log_file.flush()
    print(f"[{name}] {script} ...", flush=True)
    start = time.time()
    with open(os.path.join(os.path.dirname(log_file.name), f"{name}.log"), "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: stage {name} failed (exit {proc.returncode}); see "
                         f"{os.path.join(os.path.dirname(log_file.name), name + '.log')}")
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    return seconds


def read_log(output_dir: str) -> List[dict]:
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_reconstruction(checkpoint: str, data_dir: str, path: str, n: int = 6) -> None:
    """Reconstructions of n validation digits (one per row), enlarged 3x."""
    import torch
    from util.transforms import eval_transform
    from util.visualize import reconstruct, to_uint8
    sys.path.insert(0, os.path.join(ROOT, "demo"))
    from mae_visualize import load_mae

    model = load_mae(checkpoint, None, None, None)
    size = model.patch_embed.img_size[0]
    transform = eval_transform(size)
    files = [os.path.join(data_dir, "val", str(d), sorted(os.listdir(os.path.join(data_dir, "val", str(d))))[0])
             for d in range(n)]
    imgs = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    grid = Image.fromarray(to_uint8(reconstruct(model, imgs, mask_ratio=0.75, seed=0)))
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser("MAE quickstart on scikit-learn's digits")
    parser.add_argument("--output_dir", default="quickstart")
    parser.add_argument("--input_size", default=64, type=int)
    parser.add_argument("--pretrain_epochs", default=80, type=int)
    parser.add_argument("--linprobe_epochs", default=15, type=int)
    parser.add_argument("--finetune_epochs", default=8, type=int)
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    out = os.path.abspath(args.output_dir)
    data = os.path.join(out, "data")
    os.makedirs(out, exist_ok=True)
    counts = write_digits(data, args.input_size)
    print(f"digits written to {data}: {counts['train']} train / {counts['val']} val images, 10 classes")

    common = ["--data_path", data, "--input_size", args.input_size, "--num_workers", args.num_workers,
              "--device", args.device, "--print_freq", 50]
    cls = [*common, "--model", f"vit_{MODEL}_patch16", "--nb_classes", 10]
    pre_dir = os.path.join(out, "pretrain")
    stages = {
        "pretrain": ("main_pretrain.py", [
            *common, "--model", f"mae_vit_{MODEL}_patch16", "--mask_ratio", 0.75, "--norm_pix_loss",
            "--batch_size", 128, "--epochs", args.pretrain_epochs, "--warmup_epochs", 10, "--blr", 2e-3,
            "--weight_decay", 0.05, "--vis_freq", 10, "--output_dir", pre_dir, "--log_dir", pre_dir]),
    }
    ckpt = os.path.join(pre_dir, "checkpoint-last.pth")
    # LARS adapts each step to the weight norm: with ~700 steps instead of the reference's ~7000 it needs
    # small batches and a larger lr to move the head far enough; global pooling as the encoder is tiny
    linprobe = [*cls, "--global_pool", "--batch_size", 32, "--epochs", args.linprobe_epochs, "--warmup_epochs", 1,
                "--lr", 3.0, "--weight_decay", 0.0]
    finetune = [*cls, "--batch_size", 64, "--epochs", args.finetune_epochs, "--warmup_epochs", 1, "--blr", 1e-3,
                "--layer_decay", 0.75, "--drop_path", 0.1, "--weight_decay", 0.05]
    for name, script, flags in (("linprobe_mae", "main_linprobe.py", [*linprobe, "--finetune", ckpt]),
                                ("linprobe_random", "main_linprobe.py", linprobe),
                                ("finetune_mae", "main_finetune.py", [*finetune, "--finetune", ckpt]),
                                ("finetune_scratch", "main_finetune.py", finetune)):
        d = os.path.join(out, name)
        stages[name] = (script, [*flags, "--output_dir", d, "--log_dir", d])

    seconds = {}
    with open(os.path.join(out, "commands.txt"), "w") as log_file:
        for name, (script, flags) in stages.items():
            seconds[name] = round(run_stage(name, script, flags, log_file), 1)

    pre = read_log(pre_dir)
    summary = {
        "pretrain_loss_first": pre[0]["train_loss"],
        "pretrain_loss_last": pre[-1]["train_loss"],
        "linprobe_acc1_mae": read_log(os.path.join(out, "linprobe_mae"))[-1]["test_acc1"],
        "linprobe_acc1_random": read_log(os.path.join(out, "linprobe_random"))[-1]["test_acc1"],
        "finetune_acc1_mae": read_log(os.path.join(out, "finetune_mae"))[-1]["test_acc1"],
        "finetune_acc1_scratch": read_log(os.path.join(out, "finetune_scratch"))[-1]["test_acc1"],
        "seconds": seconds,
        "seconds_total": round(sum(seconds.values()), 1),
        "images": counts,
        "input_size": args.input_size,
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    save_reconstruction(ckpt, data, os.path.join(out, "reconstruction.png"))

    print()
    print(f"{'stage':<18}{'result':>22}{'seconds':>10}")
    print(f"{'pretrain':<18}{'loss %.3f -> %.3f' % (summary['pretrain_loss_first'], summary['pretrain_loss_last']):>22}"
          f"{seconds['pretrain']:>10.0f}")
    for name in ("linprobe_mae", "linprobe_random", "finetune_mae", "finetune_scratch"):
        key = name.replace("linprobe_", "linprobe_acc1_").replace("finetune_", "finetune_acc1_")
        print(f"{name:<18}{'top-1 %.1f%%' % summary[key]:>22}{seconds[name]:>10.0f}")
    print(f"{'total':<18}{'':>22}{summary['seconds_total']:>10.0f}")
    print(f"\nwrote {os.path.join(out, 'summary.json')} and {os.path.join(out, 'reconstruction.png')}")


if __name__ == "__main__":
    main()
