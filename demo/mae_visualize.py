"""Show what an MAE reconstructs: one PNG per image with four panels side by side,
original | masked | reconstruction | reconstruction with the visible patches pasted back.

    python demo/mae_visualize.py --checkpoint output_dir/checkpoint-last.pth --output_dir vis img1.jpg img2.png

Works with our checkpoints and reference ones (model, input size and norm_pix_loss are read from the
checkpoint's args when present, else inferred from its weights or taken from the flags).
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
from util.cli import launch  # noqa: E402
from util.visualize import reconstruct, to_uint8  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE reconstruction pictures", add_help=False)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help="pre-training checkpoint (ours or the reference's)")
    parser.add_argument("--output_dir", default="mae_visualize", help="where the PNGs go")
    parser.add_argument("--mask_ratio", default=0.75, type=float)
    parser.add_argument("--seed", default=0, type=int, help="seed of the random masks")
    parser.add_argument("--model", default=None, help="MAE model name (default: from the checkpoint)")
    parser.add_argument("--input_size", default=None, type=int, help="default: from the checkpoint")
    parser.add_argument("--norm_pix_loss", action="store_true", default=None,
                        help="the checkpoint was trained with --norm_pix_loss (default: from its args)")
    parser.add_argument("--scale", default=1, type=int, help="enlarge the picture by this integer factor")
    return parser


def load_mae(path: str, model_name: Optional[str], input_size: Optional[int],
             norm_pix_loss: Optional[bool]) -> models_mae.MaskedAutoencoderViT:
    """Build the checkpoint's MAE (name, size, decoder and mask type from its args, else from the shapes of
    its weights) and load the weights strictly."""
    kind, model, saved = load_for_export(path, model_name)
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
    model = load_mae(args.checkpoint, args.model, args.input_size, args.norm_pix_loss)
    size = model.patch_embed.img_size
    transform = transforms.Compose([
        transforms.Resize(min(size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
    os.makedirs(args.output_dir, exist_ok=True)
    for path in args.images:
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        grid = to_uint8(reconstruct(model, transform(img).unsqueeze(0), args.mask_ratio, args.seed))
        picture = Image.fromarray(grid)
        if args.scale > 1:
            picture = picture.resize((picture.width * args.scale, picture.height * args.scale), Image.NEAREST)
        out = os.path.join(args.output_dir, os.path.splitext(os.path.basename(path))[0] + "_mae.png")
        picture.save(out)
        print(f"wrote {out} ({picture.width}x{picture.height}: original | masked | reconstruction | "
              f"reconstruction + visible)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    sys.exit(launch(main, parser.parse_args()))
