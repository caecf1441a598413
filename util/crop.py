"""RandomResizedCrop without the retry loop (as used for MAE linear probing).

References:
    MoCo v3 / MAE linear-probe augmentation: https://arxiv.org/abs/2111.06377
"""
import math
from typing import Sequence, Tuple

import torch
from torchvision import transforms
from torchvision.transforms import functional as F


class RandomResizedCrop(transforms.RandomResizedCrop):
    """RandomResizedCrop that draws a single box (clipped to the image) instead of retrying."""

    @staticmethod
    def get_params(img, scale: Sequence[float], ratio: Sequence[float]) -> Tuple[int, int, int, int]:
        """Return (top, left, height, width) of one random crop: four torch draws, no retries."""
        width, height = F.get_image_size(img)
        area = height * width
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        w = min(w, width)
        h = min(h, height)
        i = torch.randint(0, height - h + 1, size=(1,)).item()
        j = torch.randint(0, width - w + 1, size=(1,)).item()
        return i, j, h, w
