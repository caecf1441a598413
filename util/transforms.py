"""The torch backend of the stage recipes (util/recipes.py): torchvision / timm transforms, and the on-device
normalisation that finishes uint8 batches.

`torch_transform(recipe)` is what `--data_loader torch` runs in its worker processes. Without `normalize` the
transform ends in a uint8 tensor (a quarter of the bytes, no float maths in the workers) and
`normalize_images` finishes the batch on the device with the same numbers as ToTensor + Normalize. The
reference's names stay: `build_transform(is_train, args)` (fine-tuning), and `pretrain_transform`,
`linprobe_transform`, `eval_transform`.
"""
import re
from dataclasses import replace
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from util.compat import fix_timm_posterize
from util.crop import RandomResizedCrop
from util.errors import UserError
from util.recipes import (FINETUNE_SCALE, LINPROBE_SCALE, PRETRAIN_AUGS, PRETRAIN_SCALE, Recipe,  # noqa: F401
                          eval_crop_pct, eval_recipe, eval_resize, finetune_recipe, linprobe_recipe, linprobe_resize,
                          pretrain_recipe, pretrain_resize)

BICUBIC = transforms.InterpolationMode.BICUBIC


def check_auto_augment(policy: str) -> None:
    """Refuse the --aa sections timm would skip in silence: timm parses each '-'-separated section after the
    policy name as a key followed by a number (m9, n2, mstd0.5, inc1; RandAugment also t<set>) and ignores a
    section without a number, so 'rand-bogus' would run as plain RandAugment."""
    if not policy:
        return
    name, *sections = policy.split("-")
    for section in sections:
        if (name == "rand" and section.startswith("t") and len(section) > 1) or re.fullmatch(r"[a-z]+\d\S*", section):
            continue
        raise UserError(f"--aa {policy}: section '{section}' is not a setting timm reads (a key followed by a number, "
                        f"e.g. m9, n2, mstd0.5, inc1); use e.g. rand-m9-mstd0.5-inc1 (the default) or '' for none")


def _timm_finetune(recipe: Recipe) -> Callable:
    """The fine-tuning recipe as timm's RandAugment / erasing pipeline (normalised floats out)."""
    aa = recipe.auto_augment
    check_auto_augment(aa or "")
    if aa:
        fix_timm_posterize()  # RandAugment at magnitude 10 on Pillow >= 13 (util/compat.py); idempotent
    try:
        return create_transform(
            input_size=recipe.input_size,
            is_training=True,
            color_jitter=recipe.color_jitter,
            auto_augment=aa,
            interpolation="bicubic",
            scale=recipe.scale,
            hflip=recipe.hflip,
            re_prob=recipe.reprob,
            re_mode=recipe.remode,
            re_count=recipe.recount,
            mean=recipe.mean,
            std=recipe.std,
        )
    except (AssertionError, KeyError, ValueError) as e:  # timm's checks of the policy string
        if not aa:
            raise
        raise UserError(f"--aa {aa} is not an augmentation policy timm knows ({e or type(e).__name__}); "
                        f"use e.g. rand-m9-mstd0.5-inc1 (the default) or '' for none") from None


def _flip(p: float) -> list:
    """A horizontal flip with probability p, or nothing for p = 0."""
    return [transforms.RandomHorizontalFlip(p)] if p > 0 else []


def _crop_steps(recipe: Recipe) -> list:
    """The geometric steps of a recipe (and its colour jitter), on PIL images."""
    size = recipe.input_size
    if not recipe.train:
        return [transforms.Resize(recipe.resize, interpolation=BICUBIC), transforms.CenterCrop(size)]
    if recipe.crop_fixed:
        return [transforms.Resize(recipe.resize, interpolation=BICUBIC), transforms.RandomCrop(size),
                *_flip(recipe.hflip)]
    if recipe.attempts == 10:
        crop = transforms.RandomResizedCrop(size, scale=recipe.scale, ratio=recipe.ratio, interpolation=BICUBIC)
    elif recipe.attempts == 1:
        crop = RandomResizedCrop(size, scale=recipe.scale, ratio=recipe.ratio, interpolation=BICUBIC)
    else:
        raise ValueError(f"the torch loader draws a random resized crop 10 times or once, not {recipe.attempts}")
    jitter = [transforms.ColorJitter(*recipe.color_jitter)] if recipe.color_jitter else []
    return [crop, *_flip(recipe.hflip), *jitter]


def _float_pixels(recipe: Recipe) -> Callable:
    """A recipe as a transform of one float tensor [C, H, W] (util/pixels.py): the same geometric steps on the
    tensor, then the normalisation; for fine-tuning, timm's random erasing after it (mixup and cutmix work on
    batches of any channel count). RandAugment is timm's PIL operations: an error, as is colour jitter on
    other than 3 channels."""
    channels = len(recipe.mean)
    if recipe.auto_augment:
        raise UserError(f"--aa {recipe.auto_augment}: RandAugment runs on 8-bit RGB images (timm's PIL "
                        f"operations), these are {channels}-channel arrays; use --aa none (random erasing, mixup and "
                        f"cutmix still apply)")
    if recipe.color_jitter and channels != 3:
        raise UserError(f"colour jitter needs RGB images, these have {channels} channels; leave --color_jitter "
                        f"unset (pre-training: --pretrain_aug crop_rand)")
    if isinstance(recipe.color_jitter, (int, float)) and recipe.color_jitter:  # fine-tuning's one number, as timm
        recipe = replace(recipe, color_jitter=(float(recipe.color_jitter),) * 3)
    steps = [*_crop_steps(recipe), transforms.Normalize(recipe.mean, recipe.std)]
    if recipe.train and recipe.reprob > 0:
        steps.append(RandomErasing(recipe.reprob, mode=recipe.remode, max_count=recipe.recount, device="cpu"))
    return transforms.Compose(steps)


def torch_transform(recipe: Recipe, normalize: bool = False) -> Callable:
    """A recipe as a transform of one PIL image: a uint8 CHW tensor out (normalised floats with `normalize`,
    and always for fine-tuning's training recipe, see Recipe.normalized_by_workers); with recipe.float_pixels,
    of one float tensor [C, H, W], normalised floats out."""
    if recipe.float_pixels:
        return _float_pixels(recipe)
    if recipe.normalized_by_workers:
        return _timm_finetune(recipe)
    steps = _crop_steps(recipe)
    if normalize:
        steps = steps + [transforms.ToTensor(), transforms.Normalize(recipe.mean, recipe.std)]
    else:
        steps = steps + [transforms.PILToTensor()]
    return transforms.Compose(steps)


_MEAN_STD: Dict[Tuple[torch.device, Tuple[float, ...], Tuple[float, ...]], Tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device, mean: Sequence[float], std: Sequence[float]
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    # made once per device: a host-to-device copy every step would wait for the GPU
    key = (device, tuple(mean), tuple(std))
    if key not in _MEAN_STD:
        _MEAN_STD[key] = (torch.tensor(key[1], device=device).view(1, -1, 1, 1),
                          torch.tensor(key[2], device=device).view(1, -1, 1, 1))
    return _MEAN_STD[key]


def normalize_images(images: torch.Tensor, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                     std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """uint8 [N, C, H, W] images to floats in [0, 1] normalised with `mean` and `std` (ImageNet's), as
    ToTensor + Normalize compute them; float images are returned unchanged."""
    if images.dtype != torch.uint8:
        return images
    mean_t, std_t = _mean_std(images.device, mean, std)
    return images.float().div_(255).sub_(mean_t).div_(std_t)


# ----------------------------------------------------------------------------
# the reference's functions

def build_transform(is_train: bool, args: Any) -> Callable:
    """The reference's fine-tuning transforms from its flags (input_size, color_jitter, aa, reprob, remode,
    recount, and our --hflip and --crop_scale where the namespace has them): timm's RandAugment / erasing
    pipeline, or resize + center crop (normalised floats)."""
    if is_train:
        ours = vars(args)  # a namespace of the reference's parser has no --hflip / --crop_scale
        return torch_transform(finetune_recipe(args.input_size, args.aa, args.color_jitter, args.reprob,
                                               args.remode, args.recount, ours.get("hflip", 0.5),
                                               ours.get("crop_scale") or FINETUNE_SCALE))
    return eval_transform(args.input_size)


def eval_transform(input_size: int, normalize: bool = True) -> Callable:
    """Resize the short side to input_size/crop_pct (bicubic), center-crop, normalise (or uint8)."""
    return torch_transform(eval_recipe(input_size), normalize)


def pretrain_transform(input_size: int, normalize: bool = True, aug: str = "crop_rand", hflip: float = 0.5,
                       scale: Sequence[float] = PRETRAIN_SCALE) -> Callable:
    """MAE pre-training augmentation (util.recipes.pretrain_recipe), then normalise (or uint8)."""
    return torch_transform(pretrain_recipe(input_size, aug, hflip, scale), normalize)


def linprobe_transform(is_train: bool, input_size: int = 224, normalize: bool = True, hflip: float = 0.5,
                       scale: Sequence[float] = LINPROBE_SCALE) -> Callable:
    """Linear-probe transforms (util.recipes.linprobe_recipe), normalised, or uint8."""
    return torch_transform(linprobe_recipe(is_train, input_size, hflip, scale), normalize)
