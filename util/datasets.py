"""ImageFolder datasets and the transforms of pre-training, fine-tuning and linear probing."""
import multiprocessing
import os
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import datasets, transforms

from util.errors import DataError
from util.logger import warn

BICUBIC = transforms.InterpolationMode.BICUBIC


class ImageFolder(datasets.ImageFolder):
    """torchvision ImageFolder that survives unreadable images.

    By default a sample whose file cannot be decoded is replaced by the next readable one and a
    warning names the file once; `skipped` counts the distinct bad files seen by any loader
    worker (a flag per file in shared memory). With strict=True the first bad file raises a
    DataError naming it.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, strict: bool = False):
        if not os.path.isdir(root):
            raise DataError(f"image folder not found: {root}; --data_path must contain "
                            f"train/ and val/ folders of class sub-folders")
        try:
            super().__init__(root, transform=transform)
        except FileNotFoundError as e:
            raise DataError(f"no images in {root} ({e}); expected {root}/<class>/<image> files") from None
        self.strict = strict
        self._bad = multiprocessing.Array("b", len(self.samples), lock=False)  # 1 = unreadable

    @property
    def skipped(self) -> int:
        """Number of distinct unreadable files found so far (all loader workers)."""
        return int(np.frombuffer(self._bad, dtype=np.int8).sum())

    def load(self, index: int) -> Any:
        """(PIL image, target) of sample `index`, or of the next readable one (see the class docstring)."""
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path, target = self.samples[i]
            try:
                return self.loader(path), target
            except (OSError, ValueError, PIL.UnidentifiedImageError, Image.DecompressionBombError) as e:
                if self.strict:
                    raise DataError(f"cannot read image {path}: {e}; remove or replace the file, "
                                    f"or drop --strict_data to skip bad files") from None
                if not self._bad[i]:
                    self._bad[i] = 1
                    warn(f"skipping unreadable image {path}: {e}", force=True)
        raise DataError(f"no readable image in {self.root}")

    def __getitem__(self, index: int) -> Any:
        sample, target = self.load(index)
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


def split_folder(data_path: str, split: str) -> str:
    """data_path/split, with a clear error when it is missing."""
    if not os.path.isdir(data_path):
        raise DataError(f"--data_path {data_path} does not exist; point it at a folder with "
                        f"train/ and val/ sub-folders of class folders")
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise DataError(f"{root} not found: --data_path must contain a {split}/ folder of class folders")
    return root


def build_dataset(is_train: bool, args: Any, transform: Optional[Callable] = None) -> ImageFolder:
    """ImageFolder(data_path/'train' or 'val') with build_transform (or the given transform)."""
    root = split_folder(args.data_path, "train" if is_train else "val")
    if transform is None:
        transform = build_transform(is_train, args)
    dataset = ImageFolder(root, transform=transform, strict=getattr(args, "strict_data", False))
    return dataset


def _posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """Posterize that keeps 0 bits as a black image (Pillow >= 13 rejects 0; timm asks for it at level 10)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    """RandAugment's PosterizeIncreasing reaches 0 bits at magnitude 10 (m9 + noise): make that work."""
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize


def build_transform(is_train: bool, args: Any) -> Callable:
    """Fine-tuning transforms: timm RandAugment/erasing pipeline, or resize + center crop."""
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if is_train:
        _patch_timm_posterize()
        return create_transform(
            input_size=args.input_size,
            is_training=True,
            color_jitter=args.color_jitter,
            auto_augment=args.aa,
            interpolation="bicubic",
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
            mean=mean,
            std=std,
        )
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


def eval_transform(input_size: int, normalize: bool = True) -> Callable:
    """Resize the short side to input_size/crop_pct (bicubic), center-crop, normalise (or uint8)."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    size = int(input_size / crop_pct)
    return _to_tensor([
        transforms.Resize(size, interpolation=BICUBIC),  # to maintain the same ratio w.r.t. 224 images
        transforms.CenterCrop(input_size),
    ], normalize)


def pretrain_transform(input_size: int, normalize: bool = True) -> Callable:
    """MAE pre-training augmentation: random resized crop (scale 0.2-1), flip, normalise (or uint8)."""
    return _to_tensor([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=BICUBIC),
        transforms.RandomHorizontalFlip(),
    ], normalize)


def linprobe_transform(is_train: bool, input_size: int = 224, normalize: bool = True) -> Callable:
    """Linear-probe transforms: single-draw random resized crop + flip, or resize 256/224 + crop;
    normalised, or uint8."""
    from util.crop import RandomResizedCrop

    if is_train:
        return _to_tensor([RandomResizedCrop(input_size, interpolation=BICUBIC),
                           transforms.RandomHorizontalFlip()], normalize)
    return _to_tensor([transforms.Resize(int(input_size * 256 / 224), interpolation=BICUBIC),
                       transforms.CenterCrop(input_size)], normalize)
