"""Export a checkpoint to timm, Hugging Face, or the reference's release format.

    python export.py --checkpoint output_dir/checkpoint-799.pth --format timm --output_dir mae_vit_large_timm
    python export.py --checkpoint output_dir/checkpoint-799.pth --format hf --output_dir mae_vit_large_hf
    python export.py --checkpoint output_dir/checkpoint-799.pth --format encoder --output_dir release

See README.md, "Using the weights elsewhere"; the logic is in util/export.py.
"""
import argparse
import sys

import util.cli as cli
from util.export import FORMATS, export
from util.logger import log


def get_args_parser() -> argparse.ArgumentParser:
    """Export flags."""
    parser = argparse.ArgumentParser("MAE export", add_help=False,
                                     description="Export a checkpoint for timm, Hugging Face transformers, or users "
                                                 "of the reference code.")
    group = parser.add_argument_group("export parameters")
    group.add_argument("--checkpoint", required=True,
                       help="checkpoint to export: ours or the reference's; pre-training, fine-tuning or linear probing")
    group.add_argument("--format", required=True, choices=FORMATS,
                       help="timm: model.safetensors + timm's config.json; hf: a Hugging Face ViTMAEForPreTraining or "
                            "ViTForImageClassification folder; encoder: {'model': ...} .pth as the reference releases")
    group.add_argument("--output_dir", required=True, help="folder to write (made if missing)")
    group.add_argument("--model", default=None,
                       help="model name, for checkpoints without args (default: the checkpoint's, else from the "
                            "weights' width)")
    return parser


def main(args: argparse.Namespace) -> None:
    """Export args.checkpoint."""
    log(export(args.checkpoint, args.format, args.output_dir, args.model))


if __name__ == "__main__":
    sys.exit(cli.launch(main, cli.command_line_parser(get_args_parser()).parse_args()))
