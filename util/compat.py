"""Work-arounds for third-party behaviour, each applied once and only where it is needed.

Pillow 13 made `ImageOps.posterize(img, 0)` an error; timm's RandAugment (up to at least timm 1.0.31)
asks for 0 bits when the magnitude reaches 10 (m9 plus noise, `rand-m9-mstd0.5-inc1`, the fine-tuning
default), which would crash a loader worker. Remove `fix_timm_posterize` once timm maps 0 bits to a
black image itself (or stops asking for 0 bits).
"""
from PIL import Image, ImageOps
from timm.data import auto_augment

_POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


def _posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """timm's posterize with 0 bits kept giving a black image, as Pillow < 13 did."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def pillow_rejects_zero_bit_posterize() -> bool:
    """Whether this Pillow raises on posterize with 0 bits."""
    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        return True
    return False


def fix_timm_posterize() -> bool:
    """Point timm's posterize ops at `_posterize` when Pillow rejects 0 bits; return whether it did."""
    if not pillow_rejects_zero_bit_posterize():
        return False
    for name in _POSTERIZE_OPS:
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize
    return True
