"""Checkpoint files: atomic writes, safe (weights-only) loading, key checks, finding the newest one.

A checkpoint is a dict with `model`, `optimizer`, `epoch`, `scaler` and `args` (a plain dict),
the reference's format; ours may add `rng` (random states for exact resumption, see util/resume.py).
"""
import argparse
import os
import pickle
import re
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from util.distributed import is_main_process
from util.errors import CheckpointError, CheckpointWriteError
from util.formats import detect_format, hf_to_ours, read_weights, weights_file
from util.logger import log
from util.pos_embed import interpolate_pos_embed
from util.sharding import load_model_state

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+|last)\.pth$")


def atomic_save(obj: Any, path: os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    The file gets the permissions of a plain torch.save (0666 less the umask: readable by colleagues where
    the umask allows), not a temporary file's 0600. A failed write (full disk, file-size limit,
    permissions) leaves `path` as it was and raises a CheckpointWriteError naming it.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        os_error = next((x for x in (e, e.__cause__, e.__context__) if isinstance(x, OSError)), None)
        if os_error is not None:  # torch.save reports a failed write as a RuntimeError over the OSError
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {os_error}; free space on that disk (or raise its limit) or "
                f"point --output_dir elsewhere, then rerun: the checkpoints already written are unchanged") from None
        raise


def save_on_master(obj: Any, path: os.PathLike) -> None:
    """atomic_save on rank 0 only."""
    if is_main_process():
        atomic_save(obj, path)


def to_plain(value: Any) -> Any:
    """Convert args values to types that weights_only loading accepts (str for anything exotic)."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def load_checkpoint(path: str, map_location: Any = "cpu", mmap: bool = False) -> Dict[str, Any]:
    """Load a checkpoint without executing code (weights_only=True); local path or https URL.

    mmap=True maps a local file instead of reading it (cheap when only a few entries are needed).

    Reference checkpoints (whose `args` is a pickled argparse.Namespace) load through torch's
    safe-globals allow-list. Anything else that would need unpickling code is refused.
    """
    path = str(path)
    is_url = path.startswith("https://") or path.startswith("http://")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            if is_url:
                ckpt = torch.hub.load_state_dict_from_url(
                    path, map_location=map_location, check_hash=True, weights_only=True)
            else:
                if not os.path.exists(path):
                    raise CheckpointError(f"checkpoint file not found: {path}; check the path")
                if os.path.isdir(path):
                    raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
                ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "global" in line), None)
        if detail is None:  # damaged bytes rather than a foreign object
            raise CheckpointError(f"cannot read checkpoint {path}: not a complete PyTorch checkpoint "
                                  f"(its data is damaged); use another copy or an older checkpoint") from None
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled objects that could run code "
            f"({detail}); only plain tensors and containers are accepted") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse the file means "not a checkpoint"
        if is_url:
            raise CheckpointError(f"cannot fetch checkpoint {path}: {e}; check the URL and the network, "
                                  f"or download it and pass the local file") from None
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a complete PyTorch checkpoint "
            f"(truncated or another format: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint dict (got {type(ckpt).__name__})")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def state_dict_mismatch(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str], List[str]]:
    """(missing keys, unexpected keys, 'key: checkpoint shape vs model shape') of a state dict."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state_dict and hasattr(state_dict[k], "shape")
              and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, shapes


def describe_mismatch(missing: List[str], unexpected: List[str], shapes: List[str], limit: int = 8) -> str:
    """One-line summary of a state-dict mismatch."""
    def head(xs):
        return ", ".join(xs[:limit]) + (f", ... ({len(xs)} in all)" if len(xs) > limit else "")
    parts = []
    if missing:
        parts.append(f"missing keys: {head(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {head(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch (checkpoint vs model): {head(shapes)}")
    return "; ".join(parts)


def load_state_dict_strict(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with an error naming the mismatched keys and shapes (a sharded model
    takes its slice of each tensor)."""
    missing, unexpected, shapes = state_dict_mismatch(model, state_dict)
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {source} does not fit the model ({describe_mismatch(missing, unexpected, shapes)}); "
            f"check --model and --input_size")
    load_model_state(model, state_dict)


def find_checkpoints(output_dir: os.PathLike) -> List[Path]:
    """Checkpoints in output_dir, newest first (checkpoint-last before numbered ones)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_file():
            found.append((float("inf") if m.group(1) == "last" else int(m.group(1)), p))
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def find_latest_checkpoint(output_dir: os.PathLike) -> Optional[Path]:
    """The newest loadable checkpoint in output_dir by its stored epoch, or None."""
    best: Optional[Tuple[int, Path]] = None
    for p in find_checkpoints(output_dir):
        try:
            epoch = int(load_checkpoint(str(p), mmap=True).get("epoch", -1))
        except (CheckpointError, TypeError, ValueError):  # unreadable: skipped, an older one may be good
            log(f"skipping unreadable checkpoint {p}")
            continue
        if best is None or epoch > best[0]:
            best = (epoch, p)
    return best[1] if best else None


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A patch embedding's filters [D, C, p, p] for `in_chans` input channels, keeping each filter's sum over the
    input channels (so an image equal in every channel embeds as before).

    Channel j of the checkpoint goes to the new channels c with c % C == j (more channels: its filter split evenly
    over its copies, e.g. RGB -> 4: R/2, G, B, R/2), or new channel c takes the sum of the old channels j with
    j % in_chans == c (fewer: RGB -> 1 is R + G + B, as timm's adapt_input_conv; RGB -> 2: R + B, G). For
    in_chans a multiple of C this is timm's repeat-and-rescale.
    """
    c = weight.shape[1]
    if in_chans == c:
        return weight
    w = weight.float()
    if in_chans < c:
        out = torch.zeros(w.shape[0], in_chans, *w.shape[2:], dtype=w.dtype)
        for j in range(c):
            out[:, j % in_chans] += w[:, j]
    else:
        copies = torch.tensor([len(range(j, in_chans, c)) for j in range(c)], dtype=w.dtype)
        index = torch.arange(in_chans) % c
        out = w[:, index] / copies[index].view(1, -1, 1, 1)
    return out.to(weight.dtype)


def load_pretrained(model: torch.nn.Module, path: str, global_pool: bool, with_head: bool = False) -> None:
    """Load an encoder from a pre-training (or fine-tuning) checkpoint for --finetune.

    `path` is ours or the reference's .pth, or timm / Hugging Face weights (util/formats.py), told apart
    by content.
    Drops a head of another shape, resizes the position table to the model's grid, loads
    non-strictly and checks that only the head (and fc_norm with global_pool) may be absent;
    any other missing key or a shape mismatch raises a CheckpointError naming them.
    with_head=True (--eval --finetune): the whole classifier, its trained head included, must be there.
    """
    fmt = detect_format(path)
    if fmt == "torch":
        checkpoint = load_checkpoint(path)
        checkpoint_model = checkpoint.get("model", checkpoint)
    else:
        weights = weights_file(path)
        if weights.endswith(".bin"):  # a Hugging Face folder saved without safetensors: read weights-only
            checkpoint_model = hf_to_ours(load_checkpoint(weights))
        else:
            checkpoint_model = read_weights(weights, fmt)
    log("Load pre-trained checkpoint from: %s%s" % (path, "" if fmt == "torch" else f" ({fmt} weights)"))
    if not isinstance(checkpoint_model, dict) or not all(torch.is_tensor(v) for v in checkpoint_model.values()):
        raise CheckpointError(f"{path} holds no model weights (no 'model' state dict)")
    checkpoint_model = dict(checkpoint_model)
    state_dict = model.state_dict()
    head = [k for k in state_dict if k.startswith("head.")]
    if with_head:
        absent = [k for k in head if k not in checkpoint_model]
        if absent:
            raise CheckpointError(f"--finetune {path} has no trained classifier head ({', '.join(absent)} missing; a "
                                  f"pre-training checkpoint has none): --eval evaluates a fine-tuned or linear-probe "
                                  f"classifier; fine-tune or probe it first")
        wrong = [f"{k}: {tuple(checkpoint_model[k].shape)} vs {tuple(state_dict[k].shape)}" for k in head
                 if hasattr(checkpoint_model[k], "shape") and checkpoint_model[k].shape != state_dict[k].shape]
        if wrong:
            raise CheckpointError(f"the head of --finetune {path} does not fit this model (checkpoint vs model: "
                                  f"{', '.join(wrong)}); check --nb_classes and --model")
    for k in ["head.weight", "head.bias"]:
        if k in checkpoint_model and k in state_dict and checkpoint_model[k].shape != state_dict[k].shape:
            log(f"Removing key {k} from pretrained checkpoint")
            del checkpoint_model[k]

    # interpolate position embedding
    if "pos_embed" in checkpoint_model and hasattr(model, "patch_embed"):
        interpolate_pos_embed(model, checkpoint_model)
    key = "patch_embed.proj.weight"
    if key in checkpoint_model and key in state_dict and checkpoint_model[key].dim() == 4 and \
            checkpoint_model[key].shape[1] != state_dict[key].shape[1]:
        have, want = checkpoint_model[key].shape[1], state_dict[key].shape[1]
        checkpoint_model[key] = adapt_input_channels(checkpoint_model[key], want)
        log(f"Adapted {key} from {have} to {want} input channels (filters summed or split: each output's sum over "
            f"the input channels is the checkpoint's)")

    missing, unexpected, shapes = state_dict_mismatch(model, checkpoint_model)
    allowed_missing = set() if with_head else \
        {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if global_pool else set())
    bad_missing = [k for k in missing if k not in allowed_missing]
    bad_unexpected = [k for k in unexpected if k.startswith(("blocks.", "patch_embed."))]
    if bad_missing or bad_unexpected or shapes:
        raise CheckpointError(
            f"--finetune checkpoint {path} does not fit the model "
            f"({describe_mismatch(bad_missing, bad_unexpected, shapes)}); " + (
                "is it a classifier of --model, with the same --global_pool / --cls_token?" if with_head else
                "is it an MAE checkpoint of the same architecture as --model?"))
    msg = model.load_state_dict(checkpoint_model, strict=False)
    log(msg)
