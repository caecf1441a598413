"""The command line: the flags every entry point shares, --help, and running main() with clear exits.

`get_args_parser()` of each entry point is built with add_help=False (the reference's API, so that the
launchers can use it as a parent); `command_line_parser` adds -h/--help for running it as a script.
`launch` turns user mistakes into one `error:` line and exit code 2, a non-finite loss into exit code 1,
and anything else into its traceback and exit code 1.
"""
import argparse
import sys
import traceback
from typing import Any, Callable, Dict, Optional, Sequence

from util.loaders import LOADERS
from util.distributed import destroy_process_group
from util.engine_loop import NAN_POLICIES
from util.errors import NonFiniteLossError, Preempted, UserError
from util.layers import ATTN_IMPLS, PATCH_EMBED_IMPLS
from util.precision import AMP_DTYPES
from util.tracking import WANDB_MODES

Groups = Dict[str, Any]  # group title -> argparse argument group


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default to its help, except for on/off switches (their help says what they
    change) and helps that already state the default in words."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        text = action.help or ""
        if action.nargs == 0 or "default" in text.lower() or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: {repr('') if action.default == '' else '%(default)s'})"


def command_line_parser(parent: argparse.ArgumentParser, description: Optional[str] = None
                        ) -> argparse.ArgumentParser:
    """`parent`'s flags and groups, plus -h/--help, for running an entry point or a launcher."""
    return argparse.ArgumentParser(description=description or parent.description, parents=[parent],
                                   formatter_class=HelpFormatter)


def add_common_args(parser: argparse.ArgumentParser, *, batch_size: int, model: str, model_help: str,
                    epochs: int = 1, weight_decay: float = 0.0, blr: float = 0.0, min_lr: float = 0.0,
                    warmup_epochs: int = 0, extra_groups: Sequence[str] = (), training: bool = True) -> Groups:
    """Add the flags every entry point has, with that entry point's reference defaults.

    Returns the argument groups by name ('training', 'model', 'optimizer', the `extra_groups`, 'data',
    'distributed', 'ours'), in the order --help prints them, for the entry point to add its own flags.
    training=False (tools that only evaluate, such as main_knn.py) leaves out the training and optimizer
    groups and the resume / schedule flags, fixing their values so the run settings resolve as usual.
    """
    titles = [*(["training", "model", "optimizer"] if training else ["model"]), *extra_groups, "data",
              "distributed", "ours"]
    descriptions = {"ours": "not in the reference code"}
    g = {t: parser.add_argument_group(f"{t} parameters" if t != "ours" else "ours",
                                      descriptions.get(t)) for t in titles}

    g["training" if training else "data"].add_argument(
        "--batch_size", default=batch_size, type=int,
        help="batch size per process (effective batch size is batch_size * accum_iter * number of processes)"
        if training else "images per forward pass, per process")
    if not training:  # evaluation only (eval=True): it resumes nothing and writes no run files
        parser.set_defaults(epochs=1, accum_iter=1, weight_decay=0.0, lr=None, blr=0.0, min_lr=0.0, warmup_epochs=0,
                            log_dir="", resume="", start_epoch=0, compile=False, print_freq=20, auto_resume=False,
                            overwrite=False, eval=True, stop_epoch=None, save_every_minutes=None)
    if training:
        _add_training_args(g["training"], epochs)
    g["model"].add_argument("--model", default=model, type=str, metavar="MODEL", help=model_help)
    g["model"].add_argument("--input_size", default=224, type=int, help="image input size (pixels, square)")
    if training:
        _add_optimizer_args(g["optimizer"], weight_decay, blr, min_lr, warmup_epochs)
    _add_data_args(parser, g["data"], training)
    _add_distributed_args(g["distributed"])
    _add_our_args(parser, g["ours"], training)
    return g


def _add_training_args(group: Any, epochs: int) -> None:
    group.add_argument("--epochs", default=epochs, type=int, help="epochs of the schedule")
    group.add_argument("--accum_iter", default=1, type=int,
                       help="accumulate gradients over this many iterations per optimizer step (a larger effective "
                            "batch size under memory constraints)")


def _add_optimizer_args(group: Any, weight_decay: float, blr: float, min_lr: float, warmup_epochs: int) -> None:
    group.add_argument("--weight_decay", type=float, default=weight_decay, help="weight decay")
    group.add_argument("--lr", type=float, default=None, metavar="LR",
                       help="learning rate (absolute lr); when absent, computed from --blr")
    group.add_argument("--blr", type=float, default=blr, metavar="LR",
                       help="base learning rate: absolute_lr = base_lr * total_batch_size / 256")
    group.add_argument("--min_lr", type=float, default=min_lr, metavar="LR",
                       help="lower lr bound for cyclic schedulers that hit 0")
    group.add_argument("--warmup_epochs", type=int, default=warmup_epochs, metavar="N",
                       help="epochs to warm up the lr linearly from 0")


def _add_data_args(parser: argparse.ArgumentParser, group: Any, training: bool) -> None:
    group.add_argument("--data_path", default=None, type=str,
                       help="dataset path (required): a folder with train/ (and val/) ImageFolder sub-folders, or "
                            "with train/ (and val/) WebDataset .tar shards, or a Hugging Face save_to_disk folder; "
                            "for pre-training also any folder of images (no labels)")
    group.add_argument("--output_dir", default="./output_dir",
                       help="where to save checkpoints, log.txt and args.json; empty for no saving" if training else
                       "where to append the results to knn_log.txt (a training run's folder is fine: nothing else "
                       "is written); empty for none")
    if training:
        group.add_argument("--log_dir", default="./output_dir", help="where to write TensorBoard events; empty for none")
    group.add_argument("--device", default=None,
                       help="device to train / test on: cpu, cuda or cuda:N (default: cuda if available, "
                                "else cpu)")
    group.add_argument("--image_column", default="image",
                       help="the image column of a Hugging Face dataset in --data_path (a save_to_disk folder)")
    group.add_argument("--label_column", default="label",
                       help="the label column of a Hugging Face dataset in --data_path")
    group.add_argument("--in_chans", default=3, type=int, metavar="N",
                       help="channels per image: 3 reads 8-bit RGB as the reference; any other N (and any folder "
                            "holding .npy arrays) reads each image at full precision with N channels: .npy, TIFF, "
                            "16-bit PNG (util/pixels.py)")
    group.add_argument("--mean", default=None, type=float, nargs="+", metavar="M",
                       help="per-channel mean the images are normalised with, --in_chans numbers (default: "
                            "ImageNet's for 3 channels; required for other N: compute_stats.py prints them)")
    group.add_argument("--std", default=None, type=float, nargs="+", metavar="S",
                       help="per-channel standard deviation, --in_chans numbers (as --mean)")
    group.add_argument("--seed", default=0, type=int, help="random seed (each process adds its rank)")
    if training:
        group.add_argument("--resume", default="", help="resume from this checkpoint (a path or an https URL)")
        group.add_argument("--start_epoch", default=0, type=int, metavar="N",
                           help="first epoch (set from the checkpoint when resuming)")
    group.add_argument("--num_workers", default=10, type=int, help="data loading worker processes")
    group.add_argument("--pin_mem", action="store_true",
                       help="pin CPU memory in the DataLoader for faster transfer to the GPU (on by default)")
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin CPU memory")
    parser.set_defaults(pin_mem=True)


def _add_distributed_args(group: Any) -> None:
    group.add_argument("--world_size", default=1, type=int,
                       help="number of distributed processes (torchrun / SLURM set it)")
    group.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                       help="local rank, as python -m torch.distributed.launch passes it (ignored: read from the "
                            "LOCAL_RANK variable)")
    group.add_argument("--dist_on_itp", action="store_true",
                       help="take ranks from OpenMPI variables (OMPI_COMM_WORLD_*)")
    group.add_argument("--dist_url", default="env://", help="url used to set up distributed training")


def _add_our_args(parser: argparse.ArgumentParser, ours: Any, training: bool) -> None:
    ours.add_argument("--amp", default=None, choices=sorted(AMP_DTYPES),
                      help="mixed precision (default: on CUDA bf16 where the GPU supports it natively, else fp16; "
                           "bf16 on CPUs with native bf16; else none)")
    ours.add_argument("--attn", default="auto", choices=["auto", *ATTN_IMPLS],
                      help="attention kernel: fused sdpa or explicit math (auto: the faster one measured for the "
                           "device and --amp)")
    ours.add_argument("--patch_embed", default="auto", choices=["auto", *PATCH_EMBED_IMPLS],
                      help="patch embedding as a convolution or as patchify + one matmul (auto: linear)")
    if training:
        ours.add_argument("--data_loader", default="torch", choices=LOADERS,
                          help="torch: DataLoader worker processes decode and augment with PIL; dali: NVIDIA DALI "
                               "decodes JPEGs on the GPU (on the CPU with --device cpu) with --num_workers threads "
                               "(pip install -r requirements-dali.txt)")
    ours.add_argument("--strict_data", action="store_true",
                      help="stop at the first unreadable image instead of skipping it with a warning")
    ours.add_argument("--dist_timeout", default=30, type=float, metavar="MIN",
                      help="minutes a process waits for the others before the job fails")
    if not training:
        return
    ours.add_argument("--hflip", default=0.5, type=float, metavar="P",
                      help="probability of a horizontal flip in the training augmentation (0 for data whose "
                           "orientation matters, such as digits or text)")
    ours.add_argument("--crop_scale", default=None, type=float, nargs=2, metavar=("MIN", "MAX"),
                      help="area range of the training random-resized crop (default: the stage's own, 0.2 1 "
                           "for pre-training, 0.08 1 for fine-tuning and linear probing)")
    ours.add_argument("--compile", action="store_true", default=None,
                      help="torch.compile the model (default: on for CUDA without --fsdp, off for CPU)")
    ours.add_argument("--no_compile", action="store_false", dest="compile", help="do not torch.compile the model")
    ours.add_argument("--print_freq", default=20, type=int, help="console line every N iterations")
    ours.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                      help="do not resume the run in --output_dir when --resume is empty (an error if the folder "
                           "holds a run, unless --overwrite)")
    parser.set_defaults(auto_resume=True)
    ours.add_argument("--overwrite", action="store_true",
                      help="delete the run in --output_dir (its checkpoints, log.txt, args.json, and its TensorBoard "
                           "events when --log_dir is the same folder) when training starts, and start afresh; without "
                           "it a folder holding another run is an error")
    ours.add_argument("--stop_epoch", default=None, type=int, metavar="N",
                      help="end this run before epoch N while keeping the --epochs schedule; the same command "
                           "without it resumes (for time-limited jobs)")
    ours.add_argument("--save_every_minutes", default=None, type=float, metavar="M",
                      help="also write checkpoint-last.pth inside an epoch every M minutes of training, so a hard "
                           "kill loses at most M minutes (default: off; a stop signal always saves the position)")
    ours.add_argument("--nan_policy", default="stop", choices=NAN_POLICIES,
                      help="a step with a non-finite loss (or gradients): stop the run (the reference's); skip that "
                           "update and go on, stopping after --nan_max_skips in a row; or rollback: restore "
                           "checkpoint-last.pth and go on with the next batch, stopping after --nan_max_rollbacks "
                           "(skip and rollback: one host sync per step)")
    ours.add_argument("--nan_max_skips", default=5, type=int, metavar="K",
                      help="--nan_policy skip: stop after K skipped updates in a row")
    ours.add_argument("--nan_max_rollbacks", default=3, type=int, metavar="R",
                      help="--nan_policy rollback: stop at the non-finite step after R rollbacks")
    ours.add_argument("--wandb", action="store_true",
                      help="also log to Weights & Biases (pip install -r requirements-wandb.txt): per-update "
                           "scalars, each epoch's log.txt row, the pictures; a resumed run continues its W&B run")
    ours.add_argument("--wandb_project", default="mae", help="the W&B project (with --wandb)")
    ours.add_argument("--wandb_name", default=None,
                      help="the W&B run name (default: the --output_dir folder's name)")
    ours.add_argument("--wandb_mode", default=None, choices=WANDB_MODES,
                      help="online, or offline: written under --output_dir/wandb for `wandb sync` later, no network "
                           "needed (default: WANDB_MODE, else online)")
    ours.add_argument("--log_grad_blocks", action="store_true",
                      help="also write each block's gradient norm to TensorBoard (grad_norm/blocks.N) at every "
                           "--print_freq step; the total norm is always logged")


def add_scaling_args(group: Any) -> None:
    """--fsdp and --grad_checkpointing (pre-training and fine-tuning), into the 'ours' group."""
    group.add_argument("--fsdp", action="store_true",
                       help="shard parameters, gradients and AdamW state over the processes (PyTorch FSDP2: each "
                            "block, then the model) instead of replicating them with DDP; checkpoints stay single "
                            "full files. Runs in one process too (sharding nothing). Needs --amp bf16 or none "
                            "(default on CUDA: bf16)")
    group.add_argument("--grad_checkpointing", action="store_true",
                       help="activation checkpointing: keep only each transformer block's input and recompute the "
                            "rest in the backward pass (less memory, about a third more compute, same results)")


def add_classification_args(g: Groups, *, global_pool: bool) -> None:
    """Flags fine-tuning and linear probing share (reference names and defaults), into the
    'classification' group (name it in add_common_args' extra_groups)."""
    group = g["classification"]
    group.add_argument("--finetune", default="", help="initialise the encoder from this pre-training checkpoint")
    group.add_argument("--global_pool", action="store_true",
                       help="classify the mean of the patch tokens, then fc_norm "
                            f"({'the default' if global_pool else 'default: the class token'})")
    group.add_argument("--cls_token", action="store_false", dest="global_pool",
                       help="classify the class token instead of the global pool")
    group.set_defaults(global_pool=global_pool)
    group.add_argument("--nb_classes", default=1000, type=int, help="number of classes")
    group.add_argument("--eval", action="store_true",
                       help="evaluate the --resume checkpoint (or the classifier in --finetune) and exit; writes nothing")
    group.add_argument("--dist_eval", action="store_true", default=False,
                       help="shard evaluation over the processes (every image counted exactly once)")


# ----------------------------------------------------------------------------
# running main

def _one_line(e: BaseException) -> str:
    """The user-facing line of an exception (also when re-raised from a loader worker)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    msg = lines[-1] if lines else type(e).__name__
    prefix = f"{type(e).__module__}.{type(e).__name__}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def launch(main: Callable[[Any], Any], args: Any) -> int:
    """Run main(args) and return the exit code; the process group is always left.

    0 on success; 2 with one `error:` line for user mistakes; 1 with one line for a non-finite loss;
    128 + the signal number with one `stopped` line when a stop signal ended training after saving its
    position (rerun to continue); 130 on Ctrl-C; 1 with the full traceback for anything else (a bug must
    look like a bug).
    """
    code = 0
    try:
        main(args)
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        code = e.exit_code
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        code = e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        code = 130
    except Exception:  # noqa: BLE001 - reported in full, with a non-zero exit
        traceback.print_exc()
        sys.stderr.flush()
        code = 1
    finally:
        destroy_process_group()
    return code
