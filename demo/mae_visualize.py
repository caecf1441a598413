"""Show what an MAE reconstructs: one PNG per image, a titled row of four cells,
original | masked | reconstruction | reconstruction with the visible patches pasted back.

    python demo/mae_visualize.py --checkpoint output_dir/checkpoint-last.pth --output_dir vis img1.jpg img2.png

Works with our checkpoints and reference ones (model, input size and norm_pix_loss are read from the
checkpoint's args when present, else inferred from its weights or taken from the flags). Removed patches
are magenta (another saturated colour for an image that holds colours near magenta); see
util/visualize.py, draw_reconstructions.
"""
import argparse
import os
import sys
from typing import Optional

from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models_mae  # noqa: E402
from util.export import load_for_export  # noqa: E402
from util.errors import CheckpointError, DataError, UserError  # noqa: E402
from util.cli import command_line_parser, launch  # noqa: E402
from util.datasets import READ_ERRORS  # noqa: E402
from util.pixels import ARRAY_ONLY, load_pixels  # noqa: E402
from util.visualize import draw_reconstructions, reconstruct, shown_channels  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    """The visualizer's flags (a parent parser: command_line_parser adds -h/--help)."""
    parser = argparse.ArgumentParser("MAE reconstruction pictures", add_help=False,
                                     description="Draw an MAE's reconstructions of images: one PNG per image.")
    inputs = parser.add_argument_group("input parameters")
    inputs.add_argument("images", nargs="+", default=argparse.SUPPRESS,
                        help="image files (any format PIL reads; .npy and TIFF for checkpoints of other than 3 "
                             "channels, as the training loaders read them)")
    inputs.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS,
                        help="pre-training checkpoint with its decoder (ours or the reference's)")
    model = parser.add_argument_group("model parameters", "by default read from the checkpoint")
    model.add_argument("--model", default=None,
                       help="MAE model name (default: the checkpoint's, else inferred from its weights)")
    model.add_argument("--input_size", default=None, type=int,
                       help="image size in pixels; must match the checkpoint's position table (default: the "
                            "checkpoint's)")
    model.add_argument("--norm_pix_loss", action="store_true", default=None,
                       help="the checkpoint was trained with --norm_pix_loss: predictions are mapped back with each "
                            "patch's mean and variance (default: the checkpoint's args, else off)")
    picture = parser.add_argument_group("picture parameters")
    picture.add_argument("--output_dir", default="mae_visualize", help="where the PNGs go (<image name>_mae.png)")
    picture.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of the patches removed")
    picture.add_argument("--seed", default=0, type=int, help="seed of the random masks")
    picture.add_argument("--channels", default="",
                         help="what is drawn of other than 3 channels: three channel numbers as RGB (e.g. 3,2,1) or "
                              "'grey' for each channel (default: 1 channel grey, more than 3: channels 0,1,2)")
    picture.add_argument("--scale", default=None, type=int,
                         help="enlarge each panel by this integer factor, nearest-neighbour (default: the smallest "
                              "factor that makes a panel at least 128 px)")
    return parser


def load_mae(path: str, model_name: Optional[str], input_size: Optional[int],
             norm_pix_loss: Optional[bool]) -> models_mae.MaskedAutoencoderViT:
    """Build the checkpoint's MAE (name, size, channels, decoder and mask type from its args, else from the shapes
    of its weights) and load the weights strictly; its run's --mean / --std are kept as `model.stats`."""
    kind, model, saved = load_for_export(path, model_name)
    model.stats = (saved.get("mean") or IMAGENET_DEFAULT_MEAN, saved.get("std") or IMAGENET_DEFAULT_STD)
    if kind != "mae":
        raise CheckpointError(f"{path} holds no decoder: reconstructions need a pre-training checkpoint")
    size = model.patch_embed.img_size[0]
    if input_size is not None and input_size != size:
        raise UserError(f"--input_size {input_size} does not fit the checkpoint, whose position table is for "
                        f"{size} px; leave --input_size out")
    if norm_pix_loss is not None:
        model.norm_pix_loss = norm_pix_loss
    return model.eval()


def main(args: argparse.Namespace) -> None:
    if not 0 <= args.mask_ratio < 1:
        raise UserError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.scale is not None and args.scale < 1:
        raise UserError(f"--scale must be a whole number from 1, got {args.scale}")
    model = load_mae(args.checkpoint, args.model, args.input_size, args.norm_pix_loss)
    size = model.patch_embed.img_size
    in_chans = model.patch_embed.proj.in_channels
    mean, std = model.stats
    channels = shown_channels(args.channels, in_chans)
    steps = [transforms.Resize(min(size), interpolation=transforms.InterpolationMode.BICUBIC),
             transforms.CenterCrop(size)]
    rgb = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
    arrays = transforms.Compose([*steps, transforms.Normalize(mean, std)])  # util.pixels' float tensors
    os.makedirs(args.output_dir, exist_ok=True)
    for path in args.images:
        try:  # as the training loaders read it: 8-bit RGB, or at full precision (other channel counts, .npy)
            if in_chans == 3 and not path.lower().endswith(ARRAY_ONLY):
                image = rgb(Image.open(path).convert("RGB"))
            else:
                image = arrays(load_pixels(path, in_chans))
        except READ_ERRORS as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        panels = reconstruct(model, image.unsqueeze(0), args.mask_ratio, args.seed)
        figure = draw_reconstructions(panels, args.mask_ratio, scale=args.scale, mean=mean, std=std,
                                      channels=channels)
        out = os.path.join(args.output_dir, os.path.splitext(os.path.basename(path))[0] + "_mae.png")
        figure.save(out)
        height, width = figure.pixels.shape[:2]
        print(f"wrote {out} ({width}x{height}: {' | '.join(figure.titles)})")


if __name__ == "__main__":
    sys.exit(launch(main, command_line_parser(get_args_parser()).parse_args()))
