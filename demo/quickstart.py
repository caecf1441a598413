"""Quickstart: MAE end to end on real images that ship with scikit-learn, on a laptop CPU.

    python demo/quickstart.py --output_dir quickstart

1. writes scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as an ImageFolder with a
   fixed stratified train/val split, upsampled to 32 px;
2. pre-trains a small MAE (mae_vit_micro_patch4: 4-px patches, an 8x8 grid) through main_pretrain.py;
3. evaluates the MAE encoder and, as a baseline, a randomly initialised one with a linear probe
   (main_linprobe.py) and k-NN (main_knn.py);
4. fine-tunes (main_finetune.py) from the MAE checkpoint and, as a baseline, from scratch (same recipe);
5. writes DIR/summary.json, DIR/loss.png, DIR/reconstruction.png and prints a table.

Every stage runs the real entry point in a subprocess, with the flags shown in DIR/commands.txt. The
recipe is the same for every compared run and suits 8x8 digits rather than ImageNet photos: no
horizontal flips (a flipped 2 is not a 2), mild crops instead of RandAugment, mixup, cutmix and random
erasing, and epochs and learning rates that converge on 1,437 training images.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mae_visualize import load_mae  # noqa: E402 (this folder)
from util.cli import command_line_parser  # noqa: E402
from util.transforms import eval_transform  # noqa: E402
from util.visualize import draw_reconstructions, reconstruct  # noqa: E402

# what each number of summary.json measures
MEANING = {
    "pretrain_loss": "MAE pre-training loss per epoch (mean squared error of the per-patch normalised pixels "
                     "of the masked patches; 1.0 is predicting each patch's mean)",
    "linprobe_acc1": "top-1 of a linear classifier (BatchNorm + linear, LARS) trained on the frozen encoder's "
                     "mean-pooled features",
    "knn_acc1": "top-1 of a 20-nearest-neighbour vote (cosine similarity) over the frozen encoder's "
                "mean-pooled features of the training images",
    "finetune_acc1": "top-1 after training the whole network (encoder and head) with labels",
}


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


def read_log(output_dir: str, name: str = "log.txt") -> List[dict]:
    """The JSON lines of a stage's log.txt (main_knn.py: knn_log.txt; [] before its first epoch ends)."""
    try:
        with open(os.path.join(output_dir, name)) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def progress_line(name: str, done: int, total: int, elapsed: float) -> str:
    """'[name] epoch i/N, elapsed s, ETA s' (the ETA from the mean epoch time so far)."""
    eta = f"ETA {elapsed / done * (total - done):.0f} s" if done else "ETA -"
    return f"[{name}] epoch {done}/{total}, {elapsed:.0f} s elapsed, {eta}"


def run_stage(name: str, script: str, flags: List[str], out_dir: str, epochs: Optional[int], log_file) -> float:
    """Run one entry point, printing its progress (epochs done, elapsed, ETA); return the seconds it took.

    The entry point's own output goes to DIR/<name>.log; its command line to DIR/commands.txt.
    """
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, flags)]
    log_file.write(f"# {name}\n{' '.join(shlex.quote(c) for c in cmd)}\n\n")
    log_file.flush()
    stage_log = os.path.join(os.path.dirname(log_file.name), f"{name}.log")
    tty = sys.stdout.isatty()
    start = time.time()
    shown = -1
    with open(stage_log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        running = True
        while running:
            running = proc.poll() is None  # one more look at the log after the process ends
            done = len(read_log(out_dir)) if epochs else 0
            if epochs and done != shown:  # one line per epoch; rewritten in place on a terminal
                shown = done
                line = progress_line(name, done, epochs, time.time() - start)
                print(f"\r{line}   " if tty else line, end="" if tty else "\n", flush=True)
            if running:
                time.sleep(0.5)
    seconds = time.time() - start
    if tty and epochs:
        print()
    if proc.returncode != 0:
        raise SystemExit(f"error: stage {name} failed (exit {proc.returncode}); see {stage_log}")
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    return seconds


def plot_loss(losses: List[float], path: str, size=(480, 300), dpi: int = 100) -> None:
    """The loss per epoch (epochs counted from 1) as a line plot, `size` pixels, drawn with matplotlib (Agg)."""
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, facecolor="white", layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = np.arange(1, len(losses) + 1)
    ax.plot(epochs, losses, color="tab:blue", linewidth=2, marker="o" if len(losses) == 1 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("MAE pre-training loss per epoch")
    ax.set_ylim(0, max(max(losses), 1e-8) * 1.08)  # from 0, with room above the first epoch's loss
    ax.set_xlim(*((1, len(losses)) if len(losses) > 1 else (0.5, 1.5)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are whole numbers
    ax.grid(True, color="0.9")
    canvas.draw()
    Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).save(path)  # RGB, as the reconstruction figure


def save_reconstruction(checkpoint: str, data_dir: str, path: str, n: int = 10, scale: int = 4) -> None:
    """Reconstructions of the first validation digit of each class (one per row, 0 to n-1), each panel
    enlarged `scale` times, as a titled figure (util/visualize.py, draw_reconstructions)."""
    model = load_mae(checkpoint, None, None, None)
    transform = eval_transform(model.patch_embed.img_size[0])
    files = [os.path.join(data_dir, "val", str(d), sorted(os.listdir(os.path.join(data_dir, "val", str(d))))[0])
             for d in range(n)]
    imgs = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    draw_reconstructions(reconstruct(model, imgs, mask_ratio=0.75, seed=0), 0.75, scale=scale).save(path)


def build_stages(args: argparse.Namespace, data: str, out: str) -> Dict[str, tuple]:
    """name -> (script, flags, output folder, epochs) for every stage, in running order."""
    common = ["--data_path", data, "--input_size", args.input_size, "--num_workers", args.num_workers,
              "--device", args.device, "--seed", args.seed]
    encoder = [*common, "--model", "vit_micro_patch4", "--global_pool"]  # mean-pooled features everywhere
    # every stage that trains: the digits' augmentation, crops of 70-100% of the area
    # (shifts and small zooms of the stroke), no flips
    training = ["--hflip", 0, "--crop_scale", 0.7, 1.0, "--print_freq", 1000]
    d = {name: os.path.join(out, name) for name in
         ("pretrain", "linprobe_mae", "linprobe_random", "knn_mae", "knn_random", "finetune_mae", "finetune_scratch")}
    ckpt = os.path.join(d["pretrain"], "checkpoint-last.pth")
    random_ckpt = os.path.join(d["linprobe_random"], "checkpoint-last.pth")  # its encoder is never trained
    cls = [*encoder, "--nb_classes", 10]
    # LARS scales each weight step by 0.001 x |w| / |g|: with ~330 steps instead of the reference's ~7,000 at
    # batch 16,384 it needs a far larger lr (here 50) to move the head to where it converges
    linprobe = [*cls, *training, "--batch_size", 64, "--epochs", args.linprobe_epochs, "--warmup_epochs", 2,
                "--blr", 200, "--weight_decay", 0.0]
    # small batches for more steps; no layer-wise decay, which would leave the lower blocks and the
    # position table of the from-scratch run almost untrained; no RandAugment, erasing, mixup or cutmix
    finetune = [*cls, *training, "--batch_size", 32, "--epochs", args.finetune_epochs, "--warmup_epochs", 2,
                "--blr", 4e-3, "--layer_decay", 1.0, "--drop_path", 0.0, "--weight_decay", 0.05,
                "--aa", "", "--reprob", 0.0, "--mixup", 0.0, "--cutmix", 0.0, "--smoothing", 0.1]
    knn = [*encoder, "--batch_size", 256, "--nb_knn", 20]
    stages = {
        "pretrain": ("main_pretrain.py", [
            *common, *training, "--model", "mae_vit_micro_patch4", "--mask_ratio", 0.75, "--norm_pix_loss",
            "--batch_size", 128, "--epochs", args.pretrain_epochs, "--warmup_epochs", 5, "--blr", 2e-3,
            "--weight_decay", 0.05, "--vis_freq", 0], args.pretrain_epochs),
        "linprobe_mae": ("main_linprobe.py", [*linprobe, "--finetune", ckpt], args.linprobe_epochs),
        "linprobe_random": ("main_linprobe.py", linprobe, args.linprobe_epochs),
        "knn_mae": ("main_knn.py", [*knn, "--finetune", ckpt], None),
        "knn_random": ("main_knn.py", [*knn, "--finetune", random_ckpt], None),
        "finetune_mae": ("main_finetune.py", [*finetune, "--finetune", ckpt], args.finetune_epochs),
        "finetune_scratch": ("main_finetune.py", finetune, args.finetune_epochs),
    }
    return {name: (script, [*flags, "--output_dir", d[name], *(["--log_dir", d[name]] if epochs else [])],
                   d[name], epochs)
            for name, (script, flags, epochs) in stages.items()}


def summarize(out: str, seconds: Dict[str, float], counts: Dict[str, int], input_size: int) -> dict:
    """summary.json's content, read from the stages' log.txt files."""
    pre = read_log(os.path.join(out, "pretrain"))
    last = {name: read_log(os.path.join(out, name), "knn_log.txt" if name.startswith("knn") else "log.txt")[-1]
            for name in ("linprobe_mae", "linprobe_random", "finetune_mae", "finetune_scratch", "knn_mae", "knn_random")}
    losses = [round(e["train_loss"], 4) for e in pre]
    return {
        "pretrain_loss_first": pre[0]["train_loss"],
        "pretrain_loss_last": pre[-1]["train_loss"],
        "pretrain_loss": losses,
        "linprobe_acc1_mae": last["linprobe_mae"]["test_acc1"],
        "linprobe_acc1_random": last["linprobe_random"]["test_acc1"],
        "knn_acc1_mae": last["knn_mae"]["20nn_top1"],
        "knn_acc1_random": last["knn_random"]["20nn_top1"],
        "finetune_acc1_mae": last["finetune_mae"]["test_acc1"],
        "finetune_acc1_scratch": last["finetune_scratch"]["test_acc1"],
        "meaning": MEANING,
        "seconds": seconds,
        "images": counts,
        "input_size": input_size,
    }


def print_table(summary: dict) -> None:
    """The stages' results and times as a table."""
    seconds = summary["seconds"]
    print(f"\n{'stage':<18}{'result':>24}{'seconds':>10}")
    loss = "loss %.3f -> %.3f" % (summary["pretrain_loss_first"], summary["pretrain_loss_last"])
    print(f"{'pretrain':<18}{loss:>24}{seconds['pretrain']:>10.0f}")
    for name in ("linprobe_mae", "linprobe_random", "knn_mae", "knn_random", "finetune_mae", "finetune_scratch"):
        stage, init = name.split("_")
        print(f"{name:<18}{'top-1 %.1f%%' % summary[f'{stage}_acc1_{init}']:>24}{seconds[name]:>10.0f}")
    print(f"{'total':<18}{'':>24}{summary['seconds_total']:>10.0f}")


def finish(out: str, data: str, seconds: Dict[str, float], counts: Dict[str, int], input_size: int,
           start: float) -> dict:
    """After the stages: write summary.json, reconstruction.png and loss.png, print the table."""
    summary = summarize(out, seconds, counts, input_size)
    save_reconstruction(os.path.join(out, "pretrain", "checkpoint-last.pth"), data,
                        os.path.join(out, "reconstruction.png"))
    plot_loss(summary["pretrain_loss"], os.path.join(out, "loss.png"))
    summary["seconds_total"] = round(time.time() - start, 1)  # everything, writing the digits included
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print_table(summary)
    print(f"\nwrote {os.path.join(out, 'summary.json')}, loss.png and reconstruction.png")
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    """The quickstart's flags (each stage's own flags are in build_stages); a parent parser, as the entry points'."""
    parser = argparse.ArgumentParser("MAE quickstart on scikit-learn's digits", add_help=False,
                                     description="MAE end to end on scikit-learn's handwritten digits, on a CPU: "
                                                 "pre-training, linear probing, k-NN and fine-tuning, each against "
                                                 "a baseline (see demo/quickstart.py).")
    out = parser.add_argument_group("output parameters")
    out.add_argument("--output_dir", default="quickstart",
                     help="folder for the digits (data/), every stage's run and log, commands.txt, summary.json, "
                          "loss.png and reconstruction.png")
    data = parser.add_argument_group("data parameters")
    data.add_argument("--input_size", default=32, type=int,
                      help="input size of every stage: the 8x8 digits are upsampled to it (bicubic) when written "
                           "(files already in --output_dir are kept)")
    data.add_argument("--num_workers", default=1, type=int, help="data loading worker processes of every stage")
    schedule = parser.add_argument_group("schedule parameters", "epochs of each stage (the README's numbers use the "
                                                               "defaults)")
    schedule.add_argument("--pretrain_epochs", default=50, type=int, help="epochs of MAE pre-training")
    schedule.add_argument("--linprobe_epochs", default=15, type=int,
                          help="epochs of each linear probe (MAE encoder and random encoder)")
    schedule.add_argument("--finetune_epochs", default=20, type=int,
                          help="epochs of each fine-tuning run (from the MAE checkpoint and from scratch)")
    run = parser.add_argument_group("run parameters")
    run.add_argument("--seed", default=0, type=int,
                     help="random seed of every stage (the train/val split of the digits is fixed)")
    run.add_argument("--device", default="cpu", help="device of every stage: cpu, cuda or cuda:N")
    return parser


def main() -> None:
    args = command_line_parser(get_args_parser()).parse_args()

    start = time.time()
    out = os.path.abspath(args.output_dir)
    data = os.path.join(out, "data")
    os.makedirs(out, exist_ok=True)
    counts = write_digits(data, args.input_size)
    print(f"digits written to {data}: {counts['train']} train / {counts['val']} val images, 10 classes")
    seconds = {"write_digits": round(time.time() - start, 1)}

    with open(os.path.join(out, "commands.txt"), "w") as log_file:
        for name, (script, flags, stage_dir, epochs) in build_stages(args, data, out).items():
            seconds[name] = round(run_stage(name, script, flags, stage_dir, epochs, log_file), 1)

    finish(out, data, seconds, counts, args.input_size, start)

if __name__ == "__main__":
    main()
