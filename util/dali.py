"""NVIDIA DALI loaders (`--data_loader dali`): JPEG decoding and augmentation on the GPU.

The same ImageFolder, the same samplers and so the same images in the same order as the torch
loaders of util/datasets.py; only decoding and augmentation move into a DALI pipeline:

- training: the fused random-crop decoder (`decoders.image_random_crop`, which decodes only the crop
  window; on CUDA `device="mixed"`, the GPU's hardware JPEG decoder where it has one), bicubic resize,
  flip with p 0.5, ImageNet mean/std, NCHW float32 on the device; fine-tuning adds RandAugment (timm's
  `rand-mM-nN-mstdS-inc1` ops from DALI's augmentation library) and random erasing with per-pixel noise;
- validation: resize the shorter side (bicubic), centre crop, normalise; every image exactly once.

A pipeline is built per epoch over that epoch's file list (this rank's shard of the epoch's shuffle)
with a seed drawn from (--seed, rank, epoch), so an epoch's augmentation depends on nothing before it.
DALI stops at an unreadable file, so the file list is checked once before the first epoch
(`scan_images`) and the bad files it finds are handled as the torch loader handles them; a file that
passes the check but that DALI cannot decode stops the run with one line naming it. On CPU (`--device cpu`) the
pipelines run DALI's CPU operators. NVIDIA DALI is optional (requirements-dali.txt) and is imported only
when a DALI loader is built.

References:
    DALI: https://docs.nvidia.com/deeplearning/dali/
    RandAugment: https://arxiv.org/abs/1909.13719
    timm: https://github.com/huggingface/pytorch-image-models
"""
import importlib.util
import math
import os
import re
import shutil
import tempfile
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import PIL
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Sampler, SequentialSampler

from util.distributed import all_gather_objects, get_rank, get_world_size
from util.datasets import ImageFolder, ResumableSampler, ShardSampler, check_one_batch, eval_loader, train_loader
from util.errors import DataError, UserError
from util.transforms import (FINETUNE_SCALE, LINPROBE_SCALE, PRETRAIN_SCALE, crop_scale, eval_resize,
                             linprobe_resize, pretrain_resize)
from util.logger import log, warn

__all__ = ["LOADERS", "DaliAug", "DaliLoader", "dali_available", "dali_eval_loader", "dali_train_loader", "eval_aug",
           "finetune_aug", "install_command", "linprobe_aug", "make_eval_loader", "make_train_loader", "pretrain_aug",
           "require_dali", "scan_images"]

LOADERS = ("torch", "dali")
PREFETCH = 2  # batches a pipeline runs ahead


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def install_command() -> str:
    """The pip command for the DALI build that matches torch's CUDA (cuda130 for a CPU-only torch)."""
    major = (torch.version.cuda or "13").split(".")[0]
    return f"pip install nvidia-dali-cuda{major}0"


def require_dali() -> None:
    """Raise a one-line UserError naming the install command when DALI is missing."""
    if not dali_available():
        raise UserError(f"--data_loader dali needs NVIDIA DALI, which is not installed: run `{install_command()}` "
                        f"(or pip install -r requirements-dali.txt), or use --data_loader torch")


# ----------------------------------------------------------------------------
# what each stage's pipeline does

@dataclass(frozen=True)
class DaliAug:
    """One stage's augmentation, as DALI runs it.

    train=True: random resized crop (`scale`, `ratio`, `attempts` draws) to input_size, flip, then the
    optional RandAugment (`rand_augment` = (ops per image, magnitude 0-10, magnitude std)) and random
    erasing (`reprob`, `erase_noise`: per-pixel normal noise, else zeros). crop_fixed=True: resize the
    shorter side to `resize`, a random input_size crop, flip. train=False: resize the shorter side to
    `resize`, centre crop.
    """

    input_size: int
    train: bool
    scale: Tuple[float, float] = FINETUNE_SCALE
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    attempts: int = 10
    resize: int = 0
    crop_fixed: bool = False
    rand_augment: Optional[Tuple[int, int, float]] = None
    reprob: float = 0.0
    erase_noise: bool = True
    hflip: float = 0.5


def pretrain_aug(input_size: int, aug: str = "crop_rand", hflip: float = 0.5,
                 scale: Sequence[float] = PRETRAIN_SCALE) -> DaliAug:
    """pretrain_transform's augmentation (util/transforms.py) for DALI; crop_rand_color is torch-only."""
    resize = pretrain_resize(input_size)
    if aug == "crop_rand":
        return DaliAug(input_size, True, scale=tuple(scale), hflip=hflip)
    if aug == "crop_fixed":
        return DaliAug(input_size, True, resize=resize, crop_fixed=True, hflip=hflip)
    if aug == "none":
        return DaliAug(input_size, False, resize=resize)
    raise UserError(f"--pretrain_aug {aug} is not available with --data_loader dali; use --data_loader torch "
                    f"or --pretrain_aug crop_rand, crop_fixed or none")


def linprobe_aug(is_train: bool, input_size: int, hflip: float = 0.5,
                 scale: Sequence[float] = LINPROBE_SCALE) -> DaliAug:
    """linprobe_transform for DALI: one crop draw (no retries; a draw too large for the image falls back to
    the whole image, its aspect clamped to the ratio range), or resize input_size * 256 / 224 and centre crop."""
    if is_train:
        return DaliAug(input_size, True, scale=tuple(scale), attempts=1, hflip=hflip)
    return DaliAug(input_size, False, resize=linprobe_resize(input_size))


def eval_aug(input_size: int) -> DaliAug:
    """eval_transform for DALI: resize the shorter side to input_size / crop_pct, centre crop."""
    return DaliAug(input_size, False, resize=eval_resize(input_size))


_RAND_RE = re.compile(r"^rand(-[a-z]+\d*(?:\.\d+)?)*$")


def parse_rand_augment(aa: str) -> Tuple[int, int, float]:
    """(ops per image, magnitude, magnitude std) of a timm 'rand-m9-mstd0.5-inc1' string; UserError when
    DALI cannot run it (other policies, inc0, mmax, probabilities or weights)."""
    fix = "use --data_loader torch, or an --aa of the form rand-mM-nN-mstdS-inc1"
    if not aa.startswith("rand") or not _RAND_RE.match(aa):
        raise UserError(f"--aa {aa} is not available with --data_loader dali; {fix}")
    n, m, mstd, inc = 2, 10, 0.0, 0
    for part in aa.split("-")[1:]:
        key = re.match(r"[a-z]+", part).group(0)
        value = part[len(key):]
        if key == "m":
            m = int(float(value))
        elif key == "n":
            n = int(value)
        elif key == "mstd":
            mstd = float(value)
        elif key == "inc":
            inc = int(value)
        else:
            raise UserError(f"--aa {aa}: '{key}' is not available with --data_loader dali; {fix}")
    if not inc:
        raise UserError(f"--aa {aa}: only the increasing ops (inc1) are available with --data_loader dali; {fix}")
    if not 0 <= m <= 10:
        raise UserError(f"--aa {aa}: the magnitude must be 0-10 with --data_loader dali; {fix}")
    return n, m, mstd


def finetune_aug(args: Any) -> DaliAug:
    """build_transform(True, args)'s augmentation for DALI: crop 0.08-1, flip, RandAugment, erasing."""
    fix = "use --data_loader torch"
    aa = args.aa if args.aa and args.aa.lower() != "none" else None
    if aa is None and args.color_jitter:
        raise UserError(f"--color_jitter without --aa is not available with --data_loader dali; {fix}")
    if args.reprob > 0 and args.remode not in ("pixel", "const"):
        raise UserError(f"--remode {args.remode} is not available with --data_loader dali; {fix} or --remode pixel")
    if args.reprob > 0 and args.recount != 1:
        raise UserError(f"--recount {args.recount} is not available with --data_loader dali; {fix} or --recount 1")
    return DaliAug(args.input_size, True, scale=crop_scale(args, FINETUNE_SCALE), hflip=getattr(args, "hflip", 0.5),
                   rand_augment=parse_rand_augment(aa) if aa else None,
                   reprob=args.reprob, erase_noise=args.remode == "pixel")


# ----------------------------------------------------------------------------
# unreadable files

_READ_ERRORS = (OSError, ValueError, PIL.UnidentifiedImageError, Image.DecompressionBombError, SyntaxError)


def check_image(path: str) -> Optional[str]:
    """None when `path` reads as an image, else why not.

    A JPEG is checked by its header and its end-of-image marker (no decoding: a truncated copy, the
    usual damage, lacks the marker); any other file, or a JPEG without the marker, is decoded in full.
    """
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                with open(path, "rb") as f:
                    f.seek(-2, os.SEEK_END)
                    if f.read(2) == b"\xff\xd9":
                        return None
            img.load()
        return None
    except _READ_ERRORS as e:
        return str(e) or type(e).__name__


def decode_error(path: str) -> Optional[str]:
    """None when PIL decodes `path` in full, else why not."""
    try:
        with Image.open(path) as img:
            img.load()
        return None
    except _READ_ERRORS as e:
        return str(e) or type(e).__name__


def scan_images(dataset: ImageFolder, num_threads: int) -> List[int]:
    """Indices of `dataset`'s unreadable files, each process checking a share (a collective when
    distributed); with dataset.strict the first one raises DataError, else each gets one warning (on rank
    0) and is flagged in the dataset of every rank (so `skipped` counts it)."""
    world, rank = get_world_size(), get_rank()
    mine = list(range(rank, len(dataset.samples), world))
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        found = [(i, err) for i, err in zip(mine, pool.map(lambda i: check_image(dataset.samples[i][0]), mine))
                 if err is not None]
    bad = sorted(x for share in (all_gather_objects(found)) for x in share)
    for i, err in bad:
        path = dataset.samples[i][0]
        if dataset.strict:
            raise DataError(f"cannot read image {path}: {err}; remove or replace the file, "
                            f"or drop --strict_data to skip bad files")
        if not dataset._bad[i]:
            dataset._bad[i] = 1
            warn(f"skipping unreadable image {path}: {err}")  # every rank has every bad file: rank 0 says so
    if len(bad) == len(dataset.samples):
        raise DataError(f"no readable image in {dataset.root}")
    return [i for i, _ in bad]


def substitutes(n: int, bad: Sequence[int]) -> np.ndarray:
    """For each index, itself, or for an unreadable one the next readable index (cyclically), as
    ImageFolder.load replaces it."""
    readable = np.ones(n, dtype=bool)
    readable[list(bad)] = False
    good = np.flatnonzero(readable)
    nxt = np.searchsorted(good, np.arange(n))  # first readable index >= i
    return good[nxt % len(good)]


# ----------------------------------------------------------------------------
# the pipeline

def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The DALI seed of one rank's epoch: a function of (seed, rank, epoch) only."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


def _rand_augment_ops() -> List[Any]:
    """timm's increasing RandAugment ops (rand-...-inc1) with timm's magnitude ranges, from DALI's library.

    Magnitude bins 0..100 stand for timm's levels 0..10 in steps of 0.1.
    """
    import nvidia.dali.fn as fn
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import augmentation

    # equalize and sharpness as DALI's library defines them, on the operators' current (non-deprecated) names
    equalize = augmentation(lambda data, _: fn.equalize(data), name="equalize")
    sharpness = augmentation(lambda data, kernel: fn.filter(data, kernel), mag_range=(0, 0.9), randomly_negate=True,
                             mag_to_param=a.sharpness_kernel, param_device="auto", name="sharpness")
    return [
        a.auto_contrast, equalize, a.invert,
        a.rotate.augmentation((0, 30), True),
        a.posterize.augmentation((4, 0), False, a.poster_mask_uint8),  # bits kept, 4 at level 0 to 0 at 10
        a.solarize.augmentation((256, 0)),  # threshold 256 at level 0 to 0 at 10
        a.solarize_add.augmentation((0, 110)),
        a.color.augmentation((0, 0.9), True, a.shift_enhance_range),
        a.contrast.augmentation((0, 0.9), True, a.shift_enhance_range),
        a.brightness.augmentation((0, 0.9), True, a.shift_enhance_range),
        sharpness,
        a.shear_x.augmentation((0, 0.3), True),
        a.shear_y.augmentation((0, 0.3), True),
        a.translate_x.augmentation((0, 0.45), True),  # a fraction of the width, as timm's translate_pct
        a.translate_y.augmentation((0, 0.45), True),
    ]


def _rand_augment(images: Any, n: int, m: int, mstd: float) -> Any:
    """n ops per image, each picked uniformly and applied with probability 0.5 (as timm's), at a
    magnitude drawn from N(m, mstd) clipped to 0-10 per op, with a random sign where the op has one."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import select, signed_bin

    ops = _rand_augment_ops() + [a.identity]  # the last one: "not applied"
    k = len(ops) - 1
    for _ in range(n):
        op = fn.random.uniform(values=list(range(k)), dtype=types.INT32)
        apply = fn.random.coin_flip(probability=0.5, dtype=types.INT32)
        op = op * apply + k * (1 - apply)
        if mstd > 0:
            level = dmath.clamp(fn.random.normal(mean=float(m), stddev=float(mstd)), 0.0, 10.0)
            mag_bin = fn.cast(dmath.floor(level * 10.0 + 0.5), dtype=types.INT32)
        else:
            mag_bin = 10 * m
        images = select(ops, op, data=images, magnitude_bin=signed_bin(mag_bin), num_magnitude_bins=101,
                        shape=images.shape()[:2], fill_value=128)
    return images


def _erase(images: Any, reprob: float, noise: bool) -> Any:
    """timm-style random erasing on normalised CHW floats: with probability reprob one rectangle of 2-33%
    of the area, log-uniform aspect 0.3-3.3 (clipped to the image), filled with N(0, 1) noise per pixel
    (or zeros)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath

    area = fn.random.uniform(range=[0.02, 1 / 3])
    aspect = dmath.exp(fn.random.uniform(range=[math.log(0.3), math.log(1 / 0.3)]))
    h = dmath.min(dmath.sqrt(area * aspect), 1.0) * fn.random.coin_flip(probability=reprob)
    w = dmath.min(dmath.sqrt(area / aspect), 1.0)
    top = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - h)
    left = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - w)
    keep = fn.erase(images * 0.0 + 1.0, anchor=fn.stack(top, left), shape=fn.stack(h, w), axis_names="HW",
                    normalized_anchor=True, normalized_shape=True, fill_value=0.0)
    if not noise:
        return images * keep
    return images * keep + fn.random.normal(images) * (1.0 - keep)


def define_pipeline(file_list: str, aug: DaliAug, batch_size: int, num_threads: int, device_id: Optional[int],
                    seed: int) -> Any:
    """A built DALI pipeline over the files of `file_list` ("path label" lines) in that order: outputs
    (images [N, 3, S, S] float32, labels [N, 1]).

    device_id None: CPU operators only; otherwise decoding on that GPU ("mixed") and the rest there too.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device_id is not None
    size = aug.input_size
    mean = [255 * v for v in IMAGENET_DEFAULT_MEAN]
    std = [255 * v for v in IMAGENET_DEFAULT_STD]

    @pipeline_def(enable_conditionals=aug.rand_augment is not None)
    def pipeline():
        encoded, label = fn.readers.file(file_list=file_list, random_shuffle=False, name="reader")
        decoder = "mixed" if gpu else "cpu"
        mirror = fn.random.coin_flip(probability=aug.hflip) if aug.train and aug.hflip > 0 else 0
        crop: Dict[str, Any] = {}
        # adjust_orientation=False: both decoders ignore the EXIF orientation, as the torch loader (PIL) does
        if aug.train and not aug.crop_fixed:
            images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                                   adjust_orientation=False, random_area=list(aug.scale),
                                                   random_aspect_ratio=list(aug.ratio), num_attempts=aug.attempts)
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, adjust_orientation=False)
            images = fn.resize(images, resize_shorter=aug.resize, interp_type=types.INTERP_CUBIC, antialias=True)
            crop = dict(crop=[size, size], crop_pos_x=0.5, crop_pos_y=0.5)
            if aug.crop_fixed:
                crop.update(crop_pos_x=fn.random.uniform(range=[0.0, 1.0]),
                            crop_pos_y=fn.random.uniform(range=[0.0, 1.0]))
        if aug.rand_augment is not None:
            if crop:  # the crop first: RandAugment works on the final image
                images = fn.crop(images, **crop)
                crop = {}
            images = _rand_augment(images, *aug.rand_augment)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std,
                                          mirror=mirror, **crop)
        if aug.reprob > 0:
            images = _erase(images, aug.reprob, aug.erase_noise)
        return images, (label.gpu() if gpu else label)

    with warnings.catch_warnings():  # DALI's own augmentation library still calls its deprecated aliases
        warnings.simplefilter("ignore", DeprecationWarning)
        pipe = pipeline(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=seed,
                        prefetch_queue_depth=PREFETCH)
        pipe.build()
    return pipe


class PipelineFactory:
    """One stage's pipeline, defined once and rebuilt per pass with a new file list and seed.

    Defining a pipeline runs its Python graph code (seconds for RandAugment's branches); rebuilding it from
    its serialized form takes milliseconds. The pass's files go into a "path label" list in a private
    temporary folder, which the reader loads when the pipeline is built.
    """

    def __init__(self, aug: DaliAug, batch_size: int, num_threads: int, device_id: Optional[int]):
        self.aug, self.batch_size, self.num_threads, self.device_id = aug, batch_size, num_threads, device_id
        self._dir = tempfile.mkdtemp(prefix="dali-files-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self.file_list = os.path.join(self._dir, "files.txt")
        self._serialized: Optional[bytes] = None
        self._executor: Dict[str, bool] = {}

    def build(self, files: Sequence[str], labels: Sequence[int], seed: int) -> Any:
        """A built pipeline over `files` (in this order) with this seed."""
        # absolute paths: DALI resolves the list's entries relative to the list's own (temporary) folder
        with open(self.file_list, "w", encoding="utf-8") as f:
            f.writelines(f"{os.path.abspath(path)} {label}\n" for path, label in zip(files, labels))
        if self._serialized is None:
            pipe = define_pipeline(self.file_list, self.aug, self.batch_size, self.num_threads, self.device_id,
                                   seed)
            self._serialized = pipe.serialize()
            # deserialize falls back to the synchronous executor unless told otherwise: keep the first build's
            self._executor = {k: bool(getattr(pipe, k)) for k in ("exec_pipelined", "exec_async", "exec_dynamic")}
            return pipe
        from nvidia.dali import Pipeline

        pipe = Pipeline.deserialize(serialized_pipeline=self._serialized, batch_size=self.batch_size,
                                    num_threads=max(1, self.num_threads), device_id=self.device_id, seed=seed,
                                    prefetch_queue_depth=PREFETCH, **self._executor)
        pipe.build()
        return pipe


# ----------------------------------------------------------------------------
# the loader

_DECODE_ERROR = re.compile(r"Failed to decode|fn\.decoders\.image")
_DALI_NAMED = re.compile(r"Failed to decode sample #\d+ : (.+)")


def is_decode_error(e: BaseException) -> bool:
    """Whether a DALI pipeline error comes from its image decoder (and not, say, a lack of memory)."""
    text = str(e)
    return bool(_DECODE_ERROR.search(text)) and "out of memory" not in text.lower()


def decode_failure(e: BaseException, files: Sequence[str], step: int, batch_size: int) -> str:
    """One line naming the file DALI could not decode at batch `step`: found by decoding that batch's files
    (and the prefetched ones) in full with PIL, else the one DALI names, else the batch's first few."""
    window = files[step * batch_size:(step + 1 + PREFETCH) * batch_size]
    for path in window:
        err = decode_error(path)
        if err is not None:
            return f"DALI could not decode {path} ({err[:200]}); remove or replace the file, or use --data_loader torch"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = next((m.group(1) for m in map(_DALI_NAMED.search, lines) if m), None)
    batch = files[step * batch_size:(step + 1) * batch_size]
    where = named or f"one of {', '.join(batch[:4])}{', ...' if len(batch) > 4 else ''}"
    reason = next((line for line in lines if "Failed to decode" in line), lines[-1] if lines else type(e).__name__)
    return f"DALI could not decode {where} ({reason[:200]}); remove or replace the file, or use --data_loader torch"


class DaliLoader:
    """(images, labels) batches from a DALI pipeline, with the DataLoader attributes the training loop uses.

    `dataset` (the ImageFolder: its files, labels and skipped count), `sampler` (the torch loader's: the
    same per-epoch order, set_epoch / order / resume_from), `batch_size`, `len()`. Images come out
    normalised, float32, NCHW, on `device`; labels int64 [N].
    """

    def __init__(self, dataset: ImageFolder, sampler: Sampler, aug: DaliAug, batch_size: int, num_threads: int,
                 device: torch.device, seed: int, drop_last: bool, bad: Sequence[int] = ()):
        self.dataset, self.sampler, self.aug = dataset, sampler, aug
        self.batch_size, self.num_threads, self.seed, self.drop_last = batch_size, num_threads, seed, drop_last
        self.device = device
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        self._substitute = substitutes(len(dataset.samples), bad)
        self._factory = PipelineFactory(aug, batch_size, num_threads, self.device_id)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def files(self) -> Tuple[List[str], List[int]]:
        """This pass's files and labels, in order (unreadable ones replaced as ImageFolder.load does)."""
        order = list(iter(self.sampler))
        if self.drop_last:
            order = order[:len(order) // self.batch_size * self.batch_size]
        samples = self.dataset.samples
        picked = [samples[int(self._substitute[i])] for i in order]
        return [p for p, _ in picked], [t for _, t in picked]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        files, labels = self.files()
        if not files:
            return
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        epoch = getattr(self.sampler, "epoch", 0)
        pipe = self._factory.build(files, labels, epoch_seed(self.seed, get_rank(), epoch))
        batches = None
        step = 0
        try:
            while True:
                try:
                    if batches is None:  # inside the try: the constructor already runs the first batch
                        batches = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                                                      auto_reset=False, last_batch_policy=LastBatchPolicy.PARTIAL)
                    out = next(batches)[0]
                except StopIteration:
                    return
                except RuntimeError as e:
                    if not is_decode_error(e):
                        raise
                    raise DataError(decode_failure(e, files, step, self.batch_size)) from None
                step += 1
                yield out["images"], out["labels"].view(-1).long()
        finally:
            del batches, pipe

def dali_train_loader(dataset: ImageFolder, aug: DaliAug, batch_size: int, num_threads: int, seed: int,
                      device: torch.device) -> DaliLoader:
    """The DALI counterpart of util.datasets.train_loader: same sampler, drop_last, files checked first."""
    require_dali()
    world = get_world_size()
    check_one_batch(len(dataset), batch_size, world)
    bad = scan_images(dataset, num_threads)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=get_rank(), seed=seed)
    log(f"Sampler_train = {sampler}; DALI loader ({'GPU' if device.type == 'cuda' else 'CPU'} decoding, "
        f"{max(1, num_threads)} threads)")
    return DaliLoader(dataset, sampler, aug, batch_size, num_threads, device, seed, drop_last=True, bad=bad)


def dali_eval_loader(dataset: ImageFolder, aug: DaliAug, batch_size: int, num_threads: int, dist_eval: bool,
                     device: torch.device) -> DaliLoader:
    """The DALI counterpart of util.datasets.eval_loader: sequential, or every image once across ranks."""
    require_dali()
    world = get_world_size()
    bad = scan_images(dataset, num_threads)
    if dist_eval and world > 1:
        sampler: Sampler = ShardSampler(dataset, world, get_rank())
    else:
        sampler = SequentialSampler(dataset)
    return DaliLoader(dataset, sampler, aug, batch_size, num_threads, device, seed=0, drop_last=False, bad=bad)


def make_train_loader(kind: str, dataset: ImageFolder, aug: Optional[DaliAug], batch_size: int, num_workers: int,
                      pin_mem: bool, seed: int, device: torch.device) -> Any:
    """The --data_loader's training loader: torch's DataLoader (the dataset's transform, num_workers
    processes) or DALI's (`aug`, num_workers threads)."""
    if kind == "dali":
        return dali_train_loader(dataset, aug, batch_size, num_workers, seed, device)
    return train_loader(dataset, batch_size, num_workers, pin_mem, seed)


def make_eval_loader(kind: str, dataset: ImageFolder, aug: Optional[DaliAug], batch_size: int, num_workers: int,
                     pin_mem: bool, dist_eval: bool, device: torch.device) -> Any:
    """The --data_loader's validation loader (every image once; sharded with dist_eval)."""
    if kind == "dali":
        return dali_eval_loader(dataset, aug, batch_size, num_workers, dist_eval, device)
    return eval_loader(dataset, batch_size, num_workers, pin_mem, dist_eval)
