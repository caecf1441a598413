"""One recipe per stage: what a loader does to each image, written once for both backends.

A `Recipe` says what happens to an image (crop, flip, colour, RandAugment, erasing); util/transforms.py
renders it as torchvision / timm transforms for `--data_loader torch`, util/dali_graph.py as a DALI graph
for `--data_loader dali`. The builders below are the only place a stage's augmentation is defined:

- pre-training (`pretrain_recipe`, paper Table 1e): random resized crop (0.2-1) + flip, the reference's;
- fine-tuning (`finetune_recipe`): timm's random resized crop (0.08-1), flip, RandAugment, random erasing;
- linear probing (`linprobe_recipe`): one random-resized-crop draw + flip, or resize 256/224 + centre crop;
- evaluation (`eval_recipe`): resize the short side to input_size / crop_pct, centre crop.

Every loader hands out the same batch for a recipe: float32 images normalised with the ImageNet mean and std,
NCHW, on the training device, and int64 labels (util/loaders.py).
"""
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple, Union

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# the random-resized-crop area range of each stage when --crop_scale is not given
PRETRAIN_SCALE = (0.2, 1.0)
FINETUNE_SCALE = (0.08, 1.0)
LINPROBE_SCALE = (0.08, 1.0)
STAGE_SCALE = {"main_pretrain": PRETRAIN_SCALE, "main_finetune": FINETUNE_SCALE, "main_linprobe": LINPROBE_SCALE}

PRETRAIN_AUGS = ("none", "crop_fixed", "crop_rand", "crop_rand_color")
STAGES = ("pretrain", "finetune", "linprobe", "eval")


@dataclass(frozen=True)
class Recipe:
    """One stage's image pipeline, for either backend.

    train=True: a random resized crop of `scale` of the area and `ratio` aspect (`attempts` draws: 10 as
    torchvision, 1 for linear probing's single draw) to input_size, or with crop_fixed=True a resize of the
    shorter side to `resize` and a random input_size crop; then a flip with probability `hflip`, then
    `color_jitter` or the `auto_augment` policy (a timm string), then random erasing (`reprob`, `remode`,
    `recount`). train=False: resize the shorter side to `resize`, centre crop. `stage` names the recipe's
    stage; the torch backend renders the fine-tuning recipe with timm's create_transform, as the reference.
    Images are normalised with `mean` and `std` (one number per channel; ImageNet's by default). `float_pixels`:
    the images are float tensors of any channel count (util/pixels.py) instead of 8-bit RGB PIL images; set by
    the loader from its dataset (`for_dataset`).
    """

    stage: str
    input_size: int
    train: bool
    scale: Tuple[float, float] = FINETUNE_SCALE
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    attempts: int = 10
    resize: int = 0
    crop_fixed: bool = False
    hflip: float = 0.5
    color_jitter: Union[None, float, Tuple[float, float, float, float]] = None
    auto_augment: Optional[str] = None
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    mean: Tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
    std: Tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)
    float_pixels: bool = False

    @property
    def erase_noise(self) -> bool:
        """Erased rectangles filled with per-pixel normal noise (remode 'pixel'), else zeros."""
        return self.remode == "pixel"

    @property
    def normalized_by_workers(self) -> bool:
        """Whether torch's loader workers already normalise (timm's fine-tuning pipeline, whose random erasing
        works on normalised values) or of float images; otherwise they hand out uint8 and the loader normalises
        on the device."""
        return (self.stage == "finetune" and self.train) or self.float_pixels

    def normalized(self, mean: Sequence[float], std: Sequence[float]) -> "Recipe":
        """This recipe with the data's normalisation (--mean / --std as resolved)."""
        return replace(self, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))

    def for_dataset(self, dataset: object) -> "Recipe":
        """This recipe for the images `dataset` gives: float tensors where it reads pixels (util/pixels.py)."""
        base = getattr(dataset, "dataset", dataset)  # a Subset reads its dataset
        return replace(self, float_pixels=bool(getattr(base, "float_pixels", False)))


def eval_crop_pct(input_size: int) -> float:
    """The share of the resized short side that evaluation keeps: 224/256 up to 224 px, else all of it."""
    return 224 / 256 if input_size <= 224 else 1.0


def eval_resize(input_size: int) -> int:
    """The short side evaluation resizes to before its center crop: input_size / eval_crop_pct."""
    return int(input_size / eval_crop_pct(input_size))


def pretrain_resize(input_size: int) -> int:
    """The short side of the crop_fixed / none pre-training augmentations: input_size / 0.875."""
    return int(input_size / 0.875)


def linprobe_resize(input_size: int) -> int:
    """The short side of linear probing's evaluation: input_size * 256 / 224."""
    return int(input_size * 256 / 224)


def pretrain_recipe(input_size: int, aug: str = "crop_rand", hflip: float = 0.5,
                    scale: Sequence[float] = PRETRAIN_SCALE) -> Recipe:
    """MAE pre-training augmentation (paper Table 1e).

    crop_rand (the reference): random resized crop of `scale` of the area (0.2-1), bicubic, and horizontal
    flip with probability `hflip` (0.5); crop_rand_color: the same, then color jitter (brightness, contrast,
    saturation 0.4, hue 0.1); crop_fixed: resize the short side to input_size / 0.875 (bicubic), random crop
    of input_size, flip; none: resize the short side to input_size / 0.875 (bicubic), center crop.
    """
    if aug not in PRETRAIN_AUGS:
        raise ValueError(f"pre-training augmentation must be one of {', '.join(PRETRAIN_AUGS)}, got {aug}")
    if aug == "none":
        return Recipe("pretrain", input_size, False, resize=pretrain_resize(input_size))
    if aug == "crop_fixed":
        return Recipe("pretrain", input_size, True, resize=pretrain_resize(input_size), crop_fixed=True, hflip=hflip)
    jitter = (0.4, 0.4, 0.4, 0.1) if aug == "crop_rand_color" else None
    return Recipe("pretrain", input_size, True, scale=tuple(scale), hflip=hflip, color_jitter=jitter)


def finetune_recipe(input_size: int, aa: Optional[str] = "rand-m9-mstd0.5-inc1", color_jitter: Optional[float] = None,
                    reprob: float = 0.25, remode: str = "pixel", recount: int = 1, hflip: float = 0.5,
                    scale: Sequence[float] = FINETUNE_SCALE) -> Recipe:
    """The fine-tuning training augmentation (the reference's timm pipeline; defaults: its flags')."""
    aa = aa if aa and aa.lower() != "none" else None
    return Recipe("finetune", input_size, True, scale=tuple(scale), hflip=hflip, color_jitter=color_jitter,
                  auto_augment=aa, reprob=reprob, remode=remode, recount=recount)


def linprobe_recipe(train: bool, input_size: int, hflip: float = 0.5,
                    scale: Sequence[float] = LINPROBE_SCALE) -> Recipe:
    """Linear probing: one random-resized-crop draw (a draw too large for the image falls back to the whole
    image, its aspect clamped to the ratio range) + flip, or resize input_size * 256 / 224 and centre crop."""
    if train:
        return Recipe("linprobe", input_size, True, scale=tuple(scale), attempts=1, hflip=hflip)
    return Recipe("linprobe", input_size, False, resize=linprobe_resize(input_size))


def eval_recipe(input_size: int) -> Recipe:
    """Evaluation: resize the shorter side to input_size / crop_pct (bicubic), centre crop."""
    return Recipe("eval", input_size, False, resize=eval_resize(input_size))
