"""Datasets and torch's loaders: opening an image, an ImageFolder that survives bad files (the one bad-file
policy of both loaders), and the torch DataLoaders over the samplers of util/samplers.py.

`build_dataset` and `build_transform` are the reference's names (the transforms themselves live in
util/transforms.py).
"""
import contextlib
import multiprocessing
import os
from typing import Any, BinaryIO, Callable, Optional, Union

import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets

from util.distributed import broadcast_object, is_main_process
from util.errors import DataError, UserError
from util.logger import log, warn
from util.pixels import ARRAY_ONLY, load_pixels
from util.samplers import ResumableSampler, ShardSampler, check_one_batch, eval_sampler, train_sampler
from util.transforms import build_transform

__all__ = ["BadSamplePolicy", "ImageFolder", "READ_ERRORS", "ResumableSampler", "ShardSampler", "build_dataset", "build_transform",
           "check_one_batch", "check_same_classes", "eval_loader", "load_image", "split_folder",
           "to_8bit", "train_loader"]

# the files an ImageFolder lists: torchvision's image extensions and NumPy arrays (util/pixels.py)
IMAGE_FILE_EXTENSIONS = (*datasets.folder.IMG_EXTENSIONS, ".npy")

# what opening or decoding a damaged image raises, in PIL and in our checks: the files the bad-file policy skips
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.UnidentifiedImageError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------
# opening an image

_GREY_16BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I": how some Pillow versions open 16-bit grey


def to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit values (0-65535) as uint8, scaled as DALI's decoders scale them: round(v / 257) = (v + 128) // 257."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def load_image(path: Union[str, os.PathLike, BinaryIO]) -> Image.Image:
    """ImageFolder's loader: the file as an 8-bit RGB PIL image, 16-bit grey scaled to 8 bits as DALI scales it.

    As torchvision's default loader (grey replicated to RGB, alpha dropped, the EXIF orientation not
    applied), except that 16-bit grey images (PNG, TIFF) go through `to_8bit` instead of saturating at
    255, and that images with no 8-bit scale (32-bit integers outside 0-65535, floats) raise ValueError
    instead of being clipped. PIL opens 16-bit colour images as 8 bits itself, keeping each value's high
    byte (v >> 8): at most one level below DALI's round(v / 257).
    """
    with open(path, "rb") if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path) as f:
        img = Image.open(f)
        if img.mode in _GREY_16BIT:
            values = np.asarray(img)  # [H, W]
            if values.min() < 0 or values.max() > 65535:
                raise ValueError(f"{img.mode} image with values {values.min()} to {values.max()}, outside the "
                                 f"16-bit range 0-65535: no 8-bit scale without clipping")
            return Image.fromarray(to_8bit(values), "L").convert("RGB")
        if img.mode == "F":
            raise ValueError("32-bit floating-point image: its value range is not defined; save it with 8 or 16 bits")
        return img.convert("RGB")


class BadSamplePolicy:
    """The one bad-sample policy of every image source and both loaders.

    A sample that cannot be decoded is replaced by the next readable one and a warning names it once; `skipped`
    counts the distinct bad samples seen by any loader worker (a flag per sample in shared memory). With
    strict=True the first bad sample raises a DataError naming it. A source implements `read(index)` ->
    (PIL image, target), `describe(index)` (the file or member, for messages) and `__len__`.
    """

    strict = False
    transform: Optional[Callable] = None
    target_transform: Optional[Callable] = None

    def _track_bad_samples(self, n: int, strict: bool) -> None:
        self.strict = strict
        self._bad = multiprocessing.Array("b", n, lock=False)  # 1 = unreadable

    @property
    def skipped(self) -> int:
        """Number of distinct unreadable samples found so far (all loader workers)."""
        return int(np.frombuffer(self._bad, dtype=np.int8).sum())

    def is_flagged(self, index: int) -> bool:
        """Whether sample `index` was found unreadable."""
        return bool(self._bad[index])

    def unreadable(self, index: int, reason: str, every_rank: bool = True) -> None:
        """With `strict` a DataError naming the sample; otherwise the sample is flagged (counted by `skipped`,
        replaced by the next readable one) and named in a warning the first time (by the rank that met it, or
        only by rank 0 when every rank meets every bad sample: `every_rank` False)."""
        where = self.describe(index)
        if self.strict:
            raise DataError(f"cannot read image {where}: {reason}; remove or replace the file, "
                            f"or drop --strict_data to skip bad files")
        if not self._bad[index]:
            self._bad[index] = 1
            warn(f"skipping unreadable image {where}: {reason}", force=every_rank)

    def load(self, index: int) -> Any:
        """(PIL image, target) of sample `index`, or of the next readable one."""
        n = len(self)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                return self.read(i)
            except READ_ERRORS as e:
                self.unreadable(i, str(e) or type(e).__name__)
        raise DataError(f"no readable image in {self.root}")

    def __getitem__(self, index: int) -> Any:
        sample, target = self.load(index)
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


def reads_pixels(in_chans: int, files: Any) -> bool:
    """Whether a dataset of these files is read by util.pixels.load_pixels (float tensors at full precision):
    for other than 3 channels, or where it holds NumPy arrays (.npy, which PIL cannot open); else as 8-bit RGB
    through PIL, the reference's (3-channel TIFFs included, as DALI decodes them)."""
    return in_chans != 3 or any(str(f).lower().endswith(ARRAY_ONLY) for f in files)


class ImageFolder(BadSamplePolicy, datasets.ImageFolder):
    """torchvision ImageFolder (root/<class>/<image>) that survives unreadable images (BadSamplePolicy).

    Lists .npy files as well as torchvision's image extensions. `in_chans` (3) and the files say how images are
    read (`float_pixels`, see reads_pixels): PIL's 8-bit RGB images, or float tensors of in_chans channels.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, strict: bool = False, in_chans: int = 3):
        if not os.path.isdir(root):
            raise DataError(f"image folder not found: {root}; --data_path must contain "
                            f"train/ and val/ folders of class sub-folders")
        try:
            datasets.DatasetFolder.__init__(self, root, loader=load_image, extensions=IMAGE_FILE_EXTENSIONS,
                                            transform=transform)
        except FileNotFoundError as e:
            raise DataError(f"no images in {root} ({e}); expected {root}/<class>/<image> files") from None
        self.imgs = self.samples
        self.in_chans = in_chans
        self.float_pixels = reads_pixels(in_chans, (p for p, _ in self.samples))
        if self.float_pixels and in_chans == 3:
            log(f"{root} holds .npy arrays: reading every image of it at full precision as float tensors "
                f"(util/pixels.py), not as 8-bit RGB")
        self._track_bad_samples(len(self.samples), strict)

    @staticmethod
    def make_dataset(directory: str, class_to_idx: Any, extensions: Any = None, is_valid_file: Any = None,
                     allow_empty: bool = False) -> Any:
        """torchvision's file listing, done once by rank 0 and shared with the other ranks (a collective): a
        million files are not listed by every process of a job at every start."""
        listed: Any = None
        if is_main_process():
            try:
                listed = datasets.folder.make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
            except FileNotFoundError as e:
                listed = e
        listed = broadcast_object(listed)
        if isinstance(listed, Exception):
            raise listed
        return listed

    def read(self, index: int) -> Any:
        path, target = self.samples[index]
        return (load_pixels(path, self.in_chans) if self.float_pixels else self.loader(path)), target

    def describe(self, index: int) -> str:
        return self.samples[index][0]

    __getitem__ = BadSamplePolicy.__getitem__


def check_same_classes(train: Dataset, val: Dataset) -> None:
    """train/ and val/ must list the same class folders: each split numbers its own sorted folders, so a missing
    or renamed one would shift every label after it (a Subset is checked by its dataset)."""
    train_classes, val_classes = (getattr(d, "dataset", d).classes for d in (train, val))
    if train_classes != val_classes:
        only = sorted(set(train_classes) ^ set(val_classes))
        what = "class folders" if isinstance(getattr(train, "dataset", train), ImageFolder) else "classes"
        raise UserError(f"train/ and val/ hold different {what} ({', '.join(only[:5]) or 'in another order'}"
                        f"{', ...' if len(only) > 5 else ''}): the labels would not match; give both the same "
                        f"{what}")


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
    """The reference's: ImageFolder(args.data_path/'train' or 'val') with build_transform (or the given transform)."""
    root = split_folder(args.data_path, "train" if is_train else "val")
    return ImageFolder(root, transform=transform if transform is not None else build_transform(is_train, args),
                       strict=vars(args).get("strict_data", False))  # --strict_data: ours, where given


# ----------------------------------------------------------------------------
# torch's loaders

def _loader(dataset: Dataset, sampler: Sampler, batch_size: int, num_workers: int, pin_mem: bool,
            drop_last: bool, keep_workers: bool = True) -> DataLoader:
    # without kept workers the loader also seeds them from its own generator, not the global random stream
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_mem and torch.cuda.is_available(), drop_last=drop_last,
                      persistent_workers=keep_workers and num_workers > 0,
                      generator=None if keep_workers else torch.Generator().manual_seed(0))


def train_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_mem: bool, seed: int) -> DataLoader:
    """Shuffled (reshuffled per epoch by `set_epoch`), per-rank sharded, drop_last training loader."""
    return _loader(dataset, train_sampler(dataset, batch_size, seed), batch_size, num_workers, pin_mem,
                   drop_last=True)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_mem: bool,
                dist_eval: bool, keep_workers: bool = True) -> DataLoader:
    """Validation loader: sequential, or sharded without duplicates across ranks with `dist_eval`.

    keep_workers=False: workers end with each pass and the loader draws from its own generator (for
    evaluations inside a training run, such as the k-NN monitor)."""
    return _loader(dataset, eval_sampler(dataset, dist_eval), batch_size, num_workers, pin_mem, drop_last=False,
                   keep_workers=keep_workers)
