"""The transforms of each stage, and the on-device normalisation that finishes uint8 batches.

- pre-training: random resized crop (scale 0.2-1), flip (`pretrain_transform`);
- fine-tuning: timm's RandAugment / random-erasing pipeline (`build_transform`, the reference's);
- linear probing: single-draw random resized crop + flip (`linprobe_transform`);
- evaluation: resize the short side, center crop (`eval_transform`).

Transforms built with normalize=False end in a uint8 tensor; `normalize_images` turns a batch of
those into the same floats as ToTensor + Normalize, on the device.
"""
import re
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from util.compat import fix_timm_posterize
from util.errors import UserError
from util.crop import RandomResizedCrop

BICUBIC = transforms.InterpolationMode.BICUBIC


# the random-resized-crop area range of each stage when --crop_scale is not given
PRETRAIN_SCALE = (0.2, 1.0)
FINETUNE_SCALE = (0.08, 1.0)
LINPROBE_SCALE = (0.08, 1.0)


def crop_scale(args: Any, default: Tuple[float, float]) -> Tuple[float, float]:
    """The --crop_scale of a run (MIN MAX), or the stage's default when it is not given."""
    scale = getattr(args, "crop_scale", None)
    return tuple(scale) if scale else default


def _flip(p: float) -> list:
    """A horizontal flip with probability p, or nothing for p = 0."""
    return [transforms.RandomHorizontalFlip(p)] if p > 0 else []


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


def build_transform(is_train: bool, args: Any) -> Callable:
    """Fine-tuning transforms: timm RandAugment/erasing pipeline, or resize + center crop."""
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if is_train:
        check_auto_augment(args.aa)
        if args.aa:
            fix_timm_posterize()  # RandAugment at magnitude 10 on Pillow >= 13 (util/compat.py); idempotent
        try:
            return create_transform(
                input_size=args.input_size,
                is_training=True,
                color_jitter=args.color_jitter,
                auto_augment=args.aa,
                interpolation="bicubic",
                scale=crop_scale(args, FINETUNE_SCALE),
                hflip=getattr(args, "hflip", 0.5),
                re_prob=args.reprob,
                re_mode=args.remode,
                re_count=args.recount,
                mean=mean,
                std=std,
            )
        except (AssertionError, KeyError, ValueError) as e:  # timm's checks of the policy string
            if not args.aa:
                raise
            raise UserError(f"--aa {args.aa} is not an augmentation policy timm knows ({e or type(e).__name__}); "
                            f"use e.g. rand-m9-mstd0.5-inc1 (the default) or '' for none") from None
    return eval_transform(args.input_size)


def _to_tensor(steps: list, normalize: bool) -> Callable:
    """steps + ToTensor + Normalize, or steps + a uint8 tensor that `normalize_images` finishes on the
    device with bit-identical results (loader workers skip the float maths and move a quarter of the
    bytes)."""
    if normalize:
        steps = steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    else:
        steps = steps + [transforms.PILToTensor()]
    return transforms.Compose(steps)


_MEAN_STD: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    # made once per device: a host-to-device copy every step would wait for the GPU
    if device not in _MEAN_STD:
        _MEAN_STD[device] = (torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, -1, 1, 1),
                             torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, -1, 1, 1))
    return _MEAN_STD[device]


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] images to floats in [0, 1] normalised with the ImageNet mean and std, as
    ToTensor + Normalize compute them; float images are returned unchanged."""
    if images.dtype != torch.uint8:
        return images
    mean, std = _mean_std(images.device)
    return images.float().div_(255).sub_(mean).div_(std)


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


def eval_transform(input_size: int, normalize: bool = True) -> Callable:
    """Resize the short side to input_size/crop_pct (bicubic), center-crop, normalise (or uint8)."""
    return _to_tensor([
        transforms.Resize(eval_resize(input_size), interpolation=BICUBIC),  # to maintain the same ratio w.r.t. 224 images
        transforms.CenterCrop(input_size),
    ], normalize)


PRETRAIN_AUGS = ("none", "crop_fixed", "crop_rand", "crop_rand_color")


def pretrain_transform(input_size: int, normalize: bool = True, aug: str = "crop_rand", hflip: float = 0.5,
                       scale: Sequence[float] = PRETRAIN_SCALE) -> Callable:
    """MAE pre-training augmentation (paper Table 1e), then normalise (or uint8).

    crop_rand (the reference): random resized crop of `scale` of the area (0.2-1), bicubic, and horizontal
    flip with probability `hflip` (0.5);
    crop_rand_color: the same, then color jitter (brightness, contrast, saturation 0.4, hue 0.1);
    crop_fixed: resize the short side to input_size / 0.875 (bicubic), random crop of input_size, flip;
    none: resize the short side to input_size / 0.875 (bicubic), center crop of input_size.
    """
    if aug not in PRETRAIN_AUGS:
        raise ValueError(f"pre-training augmentation must be one of {', '.join(PRETRAIN_AUGS)}, got {aug}")
    resize = transforms.Resize(pretrain_resize(input_size), interpolation=BICUBIC)
    crop = transforms.RandomResizedCrop(input_size, scale=tuple(scale), interpolation=BICUBIC)
    steps = {
        "none": [resize, transforms.CenterCrop(input_size)],
        "crop_fixed": [resize, transforms.RandomCrop(input_size), *_flip(hflip)],
        "crop_rand": [crop, *_flip(hflip)],
        "crop_rand_color": [crop, *_flip(hflip), transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)],
    }[aug]
    return _to_tensor(steps, normalize)


def linprobe_transform(is_train: bool, input_size: int = 224, normalize: bool = True, hflip: float = 0.5,
                       scale: Sequence[float] = LINPROBE_SCALE) -> Callable:
    """Linear-probe transforms: single-draw random resized crop of `scale` of the area + flip with
    probability `hflip`, or resize 256/224 + crop; normalised, or uint8."""
    if is_train:
        return _to_tensor([RandomResizedCrop(input_size, scale=tuple(scale), interpolation=BICUBIC),
                           *_flip(hflip)], normalize)
    return _to_tensor([transforms.Resize(linprobe_resize(input_size), interpolation=BICUBIC),
                       transforms.CenterCrop(input_size)], normalize)
