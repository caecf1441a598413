"""The DALI backend of the stage recipes (util/recipes.py): a recipe as a DALI pipeline graph.

- training: the fused random-crop decoder (`decoders.image_random_crop`, which decodes only the crop
  window; on CUDA `device="mixed"`, the GPU's hardware JPEG decoder where it has one), bicubic resize,
  flip, ImageNet mean/std, NCHW float32 on the device; fine-tuning adds RandAugment (timm's
  `rand-mM-nN-mstdS-inc1` ops from DALI's augmentation library) and random erasing with per-pixel noise;
- validation: resize the shorter side (bicubic), centre crop, normalise.

`dali_plan` says what of a recipe DALI cannot run (colour jitter, other augmentation policies, other erasing
modes), as a one-line error naming `--data_loader torch`. NVIDIA DALI is imported only inside the
functions that build a graph.

References:
    DALI: https://docs.nvidia.com/deeplearning/dali/
    RandAugment: https://arxiv.org/abs/1909.13719
    timm: https://github.com/huggingface/pytorch-image-models
"""
import functools
import math
import os
import re
import shutil
import tempfile
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from util.errors import UserError
from util.recipes import Recipe

PREFETCH = 2  # batches a pipeline runs ahead


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




def dali_plan(recipe: Recipe) -> Optional[Tuple[int, int, float]]:
    """The RandAugment of a recipe as DALI runs it ((ops, magnitude, std), or None); a UserError naming
    --data_loader torch for what DALI cannot run."""
    fix = "use --data_loader torch"
    if recipe.color_jitter and not (recipe.stage == "finetune" and recipe.auto_augment):  # timm: jitter only without aa
        what = "--pretrain_aug crop_rand_color" if recipe.stage == "pretrain" else "--color_jitter without --aa"
        alternative = " or --pretrain_aug crop_rand, crop_fixed or none" if recipe.stage == "pretrain" else ""
        raise UserError(f"{what} is not available with --data_loader dali; {fix}{alternative}")
    if recipe.reprob > 0 and recipe.remode not in ("pixel", "const"):
        raise UserError(f"--remode {recipe.remode} is not available with --data_loader dali; {fix} or --remode pixel")
    if recipe.reprob > 0 and recipe.recount != 1:
        raise UserError(f"--recount {recipe.recount} is not available with --data_loader dali; {fix} or --recount 1")
    return parse_rand_augment(recipe.auto_augment) if recipe.auto_augment else None


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


FED_INPUT = "encoded"  # the fed pipeline's input: each sample's encoded bytes (uint8 [B])


def define_pipeline(file_list: Optional[str], aug: Recipe, batch_size: int, num_threads: int,
                    device_id: Optional[int], seed: int, feed: Optional[Callable[[Any], None]] = None) -> Any:
    """A built DALI pipeline over the files of `file_list` ("path label" lines) in that order, or, with
    file_list None, over what `feed(pipeline)` gives the input FED_INPUT before each batch (it raises
    StopIteration at the end of the pass); outputs (images [N, 3, S, S] float32, labels [N, 1]), or, fed,
    (a placeholder, images): the feed keeps the labels.

    device_id None: CPU operators only; otherwise decoding on that GPU ("mixed") and the rest there too.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    rand_augment = dali_plan(aug)
    gpu = device_id is not None
    size = aug.input_size
    mean = [255 * v for v in aug.mean]
    std = [255 * v for v in aug.std]

    @pipeline_def(enable_conditionals=rand_augment is not None)
    def pipeline():
        if file_list is not None:
            encoded, label = fn.readers.file(file_list=file_list, random_shuffle=False, name="reader")
        else:
            # the labels stay with the feed; the file reader draws one of the pipeline's operator seeds and an
            # external source none, so a throwaway coin flip, first in the graph (the first output), draws it:
            # the random operators after it draw the seeds they draw over files, and a shard's crops equal its file's
            seed_pad = fn.random.coin_flip(probability=0.0)
            encoded, label = fn.external_source(name=FED_INPUT, dtype=types.UINT8, ndim=1), None
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
        if rand_augment is not None:
            if crop:  # the crop first: RandAugment works on the final image
                images = fn.crop(images, **crop)
                crop = {}
            images = _rand_augment(images, *rand_augment)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std,
                                          mirror=mirror, **crop)
        if aug.reprob > 0:
            images = _erase(images, aug.reprob, aug.erase_noise)
        if label is None:
            return seed_pad, images
        return images, (label.gpu() if gpu else label)

    with warnings.catch_warnings():  # DALI's own augmentation library still calls its deprecated aliases
        warnings.simplefilter("ignore", DeprecationWarning)
        pipe = pipeline(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=seed,
                        prefetch_queue_depth=PREFETCH)
        if feed is not None:
            pipe.iter_setup = functools.partial(feed, pipe)  # called before each batch is scheduled (prefetch too)
        pipe.build()
    return pipe


class PipelineFactory:
    """One stage's pipeline, defined once and rebuilt per pass with a new file list and seed.

    Defining a pipeline runs its Python graph code (seconds for RandAugment's branches); rebuilding it from
    its serialized form takes milliseconds. The pass's files go into a "path label" list in a private
    temporary folder, which the reader loads when the pipeline is built.
    """

    def __init__(self, aug: Recipe, batch_size: int, num_threads: int, device_id: Optional[int]):
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
        return self._build(self.file_list, seed, None)

    def build_fed(self, seed: int, feed: Callable[[Any], None]) -> Any:
        """A built pipeline whose input (FED_INPUT) `feed(pipeline)` fills before each batch, with this seed."""
        return self._build(None, seed, feed)

    def _build(self, file_list: Optional[str], seed: int, feed: Optional[Callable[[Any], None]]) -> Any:
        if self._serialized is None:
            pipe = define_pipeline(file_list, self.aug, self.batch_size, self.num_threads, self.device_id, seed,
                                   feed)
            self._serialized = pipe.serialize()
            # deserialize falls back to the synchronous executor unless told otherwise: keep the first build's
            self._executor = {k: bool(getattr(pipe, k)) for k in ("exec_pipelined", "exec_async", "exec_dynamic")}
            return pipe
        from nvidia.dali import Pipeline

        pipe = Pipeline.deserialize(serialized_pipeline=self._serialized, batch_size=self.batch_size,
                                    num_threads=max(1, self.num_threads), device_id=self.device_id, seed=seed,
                                    prefetch_queue_depth=PREFETCH, **self._executor)
        if feed is not None:
            pipe.iter_setup = functools.partial(feed, pipe)
        pipe.build()
        return pipe
