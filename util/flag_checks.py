"""Flag values that cannot work, refused before anything runs, each with a one-line error naming the flag.

The checks read the typed view of the parsed flags (util/config.py), so an entry point without a flag is
checked against that group's default. util/settings.py runs them while resolving; the launchers run them
before submitting a job (util/submit.py).
"""
import os
import warnings

from util.config import Settings
from util.errors import UserError
from util.logger import warn
from util.optional import require_dali


def check_common_flags(s: Settings) -> None:
    """Reject flag values that cannot work, with a message naming the flag."""
    for flag, value in (("batch_size", s.data.batch_size), ("accum_iter", s.optim.accum_iter),
                        ("epochs", s.optim.epochs), ("print_freq", s.ckpt.print_freq)):
        if value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if s.data.input_size < 1:
        raise UserError(f"--input_size must be at least 1 pixel, got {s.data.input_size}")
    if not 0 <= s.model.drop_path < 1:
        raise UserError(f"--drop_path is a probability, from 0 to less than 1, got {s.model.drop_path}")
    if s.data.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {s.data.num_workers}")
    if s.ckpt.save_every_minutes is not None and s.ckpt.save_every_minutes <= 0:
        raise UserError(f"--save_every_minutes must be more than 0, got {s.ckpt.save_every_minutes}")
    if s.knn.probe_lr <= 0:
        raise UserError(f"--probe_lr must be positive, got {s.knn.probe_lr}")
    if s.optim.nan_max_rollbacks < 1:
        raise UserError(f"--nan_max_rollbacks is a number of rollbacks, at least 1, got {s.optim.nan_max_rollbacks}")
    if s.optim.nan_max_skips < 1:
        raise UserError(f"--nan_max_skips is a number of updates in a row, at least 1, got {s.optim.nan_max_skips}")
    if s.data.in_chans < 1:
        raise UserError(f"--in_chans is a number of channels, at least 1, got {s.data.in_chans}")
    if not 0 <= s.data.hflip <= 1:
        raise UserError(f"--hflip is a probability, from 0 to 1, got {s.data.hflip}")
    scale = s.data.crop_scale
    if scale and not 0 < scale[0] <= scale[1] <= 1:
        raise UserError(f"--crop_scale MIN MAX needs 0 < MIN <= MAX <= 1, got {scale[0]} {scale[1]}")
    if not s.data.data_path:
        raise UserError("--data_path is required: a folder with train/ (and val/) sub-folders of class folders")
    if s.ckpt.eval and not s.ckpt.resume and not s.model.finetune:
        raise UserError("--eval needs the weights to evaluate: --resume CKPT (a checkpoint of this script) or "
                        "--finetune CKPT (a fine-tuned classifier: ours, the reference's, timm's or Hugging Face's)")
    if s.data.data_loader == "dali":
        require_dali()


def check_fsdp_flags(s: Settings) -> None:
    """--fsdp combinations that are not supported, each a one-line error naming the fix."""
    if not s.dist.fsdp:
        return
    if s.precision.amp == "fp16":
        raise UserError("--fsdp does not support --amp fp16 (its loss scaler would check only each process's shard "
                        "for overflows); use --amp bf16 (the default with --fsdp on CUDA) or --amp none")
    if s.precision.compile:
        raise UserError("--fsdp with --compile is not supported; drop --compile (the default is off with --fsdp)")
    if s.data.dist_eval:
        raise UserError("--fsdp with --dist_eval is not supported: shards of unequal length would leave processes "
                        "waiting for each other's parameters; drop --dist_eval (each process evaluates the whole set)")


def check_pretrain_flags(s: Settings) -> None:
    """Pre-training flag values that cannot work."""
    m = s.model
    if not 0.0 <= m.mask_ratio < 1.0:
        raise UserError(f"--mask_ratio must be in [0, 1), got {m.mask_ratio}")
    if s.ckpt.save_freq < 1:
        raise UserError(f"--save_freq must be at least 1, got {s.ckpt.save_freq}")
    if s.knn.knn_freq < 0 or s.knn.knn_max_train < 1:
        raise UserError(f"--knn_freq must be 0 (off) or more and --knn_max_train at least 1, got "
                        f"{s.knn.knn_freq} and {s.knn.knn_max_train}")
    if s.ckpt.vis_freq < 0:
        raise UserError(f"--vis_freq must be 0 (off) or more, got {s.ckpt.vis_freq}")
    if s.dist.fsdp and s.knn.knn_freq:
        raise UserError("--knn_freq is not supported with --fsdp (the encoder is sharded); drop --knn_freq and run "
                        "main_knn.py on a checkpoint instead")
    for flag, value in (("decoder_embed_dim", m.decoder_embed_dim), ("decoder_depth", m.decoder_depth),
                        ("decoder_num_heads", m.decoder_num_heads)):
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if m.decoder_embed_dim and m.decoder_num_heads and m.decoder_embed_dim % m.decoder_num_heads:
        raise UserError(f"--decoder_embed_dim {m.decoder_embed_dim} is not divisible by --decoder_num_heads "
                        f"{m.decoder_num_heads}")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def note_num_workers(num_workers: int) -> None:
    """One line when --num_workers exceeds the CPUs (the reference's default of 10 on a small machine), in place
    of the DataLoader's own warning, which it repeats for every loader it builds."""
    cpus = available_cpus()
    if num_workers > cpus:
        warn(f"--num_workers {num_workers} is more than the {cpus} CPUs this process can use: loading works, "
             f"but --num_workers {cpus} or fewer avoids oversubscribing them")
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
