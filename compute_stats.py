"""Per-channel mean and standard deviation of a training set, for --mean / --std.

    python compute_stats.py --data_path D --in_chans 5
    # train: 1200 images, 5 channels, 78643200 pixels per channel
    # --mean 0.1214 0.1388 ... --std 0.0612 0.0705 ...

Every pixel of every image of the training split (or of --max_images of them, a fixed random subset), as the
loaders read it before augmentation: 8-bit RGB divided by 255, other images scaled by their type's range
(util/pixels.py). The mean and the standard deviation (population: divided by the pixel count) are taken over all
pixels of a channel together, in float64. Any --data_path the training scripts take works (folders, shards, a
Hugging Face dataset, an unlabeled folder).
"""
import argparse
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

import util.cli as cli
from util.errors import UserError
from util.logger import log
from util.sources import open_split


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE dataset statistics", add_help=False,
                                     description="Per-channel mean and std of a training set, for --mean / --std.")
    group = parser.add_argument_group("statistics parameters")
    group.add_argument("--data_path", default=None, help="the dataset, as the training scripts take it (required)")
    group.add_argument("--in_chans", default=3, type=int, help="channels per image (as the training flag)")
    group.add_argument("--max_images", default=0, type=int,
                       help="use at most this many training images, a fixed random subset (0: all)")
    group.add_argument("--num_workers", default=4, type=int, help="processes that read the images")
    group.add_argument("--image_column", default="image", help="a Hugging Face dataset's image column")
    group.add_argument("--label_column", default="label", help="a Hugging Face dataset's label column")
    return parser


def _as_float(sample: object) -> torch.Tensor:
    """A dataset sample as float64 [C, H, W] values, scaled as the loaders scale them before normalising."""
    if torch.is_tensor(sample):  # util.pixels: already scaled
        return sample.double()
    return torch.from_numpy(np.asarray(sample, dtype=np.float64).transpose(2, 0, 1) / 255.0)  # 8-bit RGB


class _Values:
    """The float64 values of a dataset's samples `indices` (its bad-sample policy applies)."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _as_float(self.dataset.load(self.indices[i])[0])


def channel_stats(dataset, num_workers: int = 0, indices: Optional[Sequence[int]] = None) -> Dict[str, object]:
    """{'mean': [C], 'std': [C], 'images': n, 'pixels': per channel} over every pixel of `dataset`'s images (or
    of those at `indices`)."""
    samples = _Values(dataset, range(len(dataset)) if indices is None else indices)
    total = total_sq = None
    pixels = 0
    loader = DataLoader(samples, batch_size=None, num_workers=num_workers)
    for values in loader:
        flat = values.reshape(values.shape[0], -1)
        s, sq = flat.sum(dim=1), (flat * flat).sum(dim=1)
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        pixels += flat.shape[1]
    if total is None:
        raise UserError("no images to compute statistics of")
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp_min(0).sqrt()
    return {"mean": mean.tolist(), "std": std.tolist(), "images": len(samples), "pixels": pixels}


def flags_line(mean: List[float], std: List[float]) -> str:
    """'--mean 0.4850 ... --std 0.2290 ...' (4 decimals: well under the noise of a dataset's statistics)."""
    return f"--mean {' '.join(f'{v:.4f}' for v in mean)} --std {' '.join(f'{v:.4f}' for v in std)}"


def main(args: argparse.Namespace) -> Dict[str, object]:
    if not args.data_path:
        raise UserError("--data_path is required: the training set to compute the statistics of")
    if args.in_chans < 1:
        raise UserError(f"--in_chans is a number of channels, at least 1, got {args.in_chans}")
    dataset = open_split(args.data_path, "train", unlabeled_ok=True, image_column=args.image_column,
                         label_column=args.label_column, in_chans=args.in_chans)
    indices = None
    if args.max_images and len(dataset) > args.max_images:
        keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:args.max_images]
        indices = keep.sort().values.tolist()
    stats = channel_stats(dataset, args.num_workers, indices)
    channels = len(stats["mean"])
    log(f"train: {stats['images']} images, {channels} channel(s), {stats['pixels']} pixels per channel")
    print(flags_line(stats["mean"], stats["std"]))
    return stats


if __name__ == "__main__":
    sys.exit(cli.launch(main, cli.command_line_parser(get_args_parser()).parse_args()))
