"""Images of any number of channels and bit depth (`--in_chans N`), read at full precision as float tensors.

The reference reads 8-bit RGB through PIL (util.datasets.load_image), and so do we by default. A dataset is read
with `load_pixels` instead when `--in_chans` is not 3 or when it holds NumPy arrays (.npy); then every sample is a
float32 tensor [C, H, W]:

- `.npy`: a NumPy array, channels last as an image is stored: H x W x C (or H x W for one channel);
- `.tif` / `.tiff`: read with `tifffile`; H x W, H x W x C (channels last, TIFF's "contig" layout), or C x H x W
  (bands first, the "separate" layout GDAL writes) when the first axis has --in_chans entries and the last does not;
- anything else: PIL (PNG, JPEG, ...): 1-channel modes (8-bit L, 16-bit I;16 at full precision, 32-bit I and F),
  RGB and RGBA as they are stored (PIL reads 16-bit colour PNGs at 8 bits: store those as .npy or TIFF).

Values are scaled by their type's range: unsigned integers by their maximum (uint8 by 255, uint16 by 65535),
signed integers by theirs (int16 by 32767), booleans as 0 / 1, floating-point values as they are; nothing is
clipped. A 1-channel image is replicated to 3 channels for --in_chans 3 (as the RGB path does); any other channel
count that differs from --in_chans is an error naming the file.
"""
import io
import os
from typing import BinaryIO, Optional, Union

import numpy as np
import torch
from PIL import Image

from util.errors import DataError
from util.optional import require_package

ARRAY_ONLY = (".npy",)  # files only load_pixels reads (PIL cannot): a dataset holding them is read by it


class ChannelError(DataError):
    """A file whose channel count differs from --in_chans: a mistake in the data or the flag, not a bad sample."""


def scale_to_float(values: np.ndarray) -> np.ndarray:
    """float32 values of an array, integers divided by their type's maximum, floats as they are."""
    if values.dtype == np.bool_:
        return values.astype(np.float32)
    if np.issubdtype(values.dtype, np.integer):
        return (values.astype(np.float64) / np.iinfo(values.dtype).max).astype(np.float32)
    if np.issubdtype(values.dtype, np.floating):
        return values.astype(np.float32)
    raise ValueError(f"{values.dtype} values are not pixels (integers, booleans or floats)")


def _pil_array(img: Image.Image) -> np.ndarray:
    """A PIL image's values in their own type: [H, W] or [H, W, C]."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img).astype(np.uint16)
    if img.mode in ("L", "RGB", "RGBA", "I", "F", "1", "LA"):
        return np.asarray(img)
    if img.mode == "P":  # a palette: its colours (with alpha where it has transparency)
        return np.asarray(img.convert("RGBA" if "transparency" in img.info else "RGB"))
    return np.asarray(img.convert("RGB"))  # CMYK, YCbCr, ...: as RGB


def read_array(source: Union[str, os.PathLike, bytes, BinaryIO], name: str) -> np.ndarray:
    """The stored values of an image or array file (`name` tells the format: its extension)."""
    ext = os.path.splitext(name)[1].lower()
    data = io.BytesIO(source) if isinstance(source, bytes) else source
    if ext == ".npy":
        return np.load(data, allow_pickle=False)
    if ext in (".tif", ".tiff"):
        require_package("tifffile", "reading TIFF images with --in_chans")
        import tifffile
        return np.asarray(tifffile.imread(data))
    with Image.open(data) as img:
        return _pil_array(img)


def to_chw(values: np.ndarray, in_chans: int, name: str) -> np.ndarray:
    """[H, W] or [H, W, C] (or, for C x H x W TIFF bands, [C, H, W]) as [C, H, W] with in_chans channels."""
    if values.ndim == 2:
        values = values[None]
    elif values.ndim == 3:
        bands_first = name.lower().endswith((".tif", ".tiff")) and values.shape[0] == in_chans \
            and values.shape[-1] != in_chans
        values = values if bands_first else values.transpose(2, 0, 1)
    else:
        raise ValueError(f"an array of shape {tuple(values.shape)}, not an image (H x W or H x W x C)")
    channels = values.shape[0]
    if channels == 1 and in_chans == 3:
        values = np.repeat(values, 3, axis=0)
    elif channels != in_chans:
        stored = tuple(values.shape[1:]) + (channels,)
        if name.lower().endswith(".npy") and values.shape[1] == in_chans:  # [C, H, W] saved as it is in torch
            shape = (values.shape[1], values.shape[2], values.shape[0])  # as saved
            raise ChannelError(f"{name} holds an array of shape {' x '.join(map(str, shape))}, channels first (C x H x "
                               f"W); .npy images are H x W x C: save it as array.transpose(1, 2, 0)")
        raise ChannelError(f"{name} has {channels} channel(s) (H x W x C = {' x '.join(map(str, stored))}), "
                           f"--in_chans is {in_chans}: give every image {in_chans} channel(s), or set --in_chans "
                           f"{channels}")
    return values


def load_pixels(source: Union[str, os.PathLike, bytes, BinaryIO], in_chans: int,
                name: Optional[str] = None) -> torch.Tensor:
    """The image at `source` (a path, or encoded bytes / a file object with `name` giving its format) as a
    float32 tensor [in_chans, H, W], scaled by its type's range (module docstring)."""
    name = name if name is not None else os.fspath(source)
    values = to_chw(read_array(source, name), in_chans, name)
    return torch.from_numpy(np.ascontiguousarray(scale_to_float(values)))
