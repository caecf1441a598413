"""Write an ImageFolder as WebDataset tar shards, with the index the loaders read, and check the result.

    python make_shards.py --data_path ${IMAGENET_DIR} --output_dir ${SHARDS_DIR} --maxcount 10000

reads DATA/train/<class>/<image> (and DATA/val/...) and writes SHARDS/train/train-000000.tar, ... (and
SHARDS/val/...): each sample is the image file's bytes under its extension (jpg, png, ...), its label as `.cls`
(the class's index in sorted order, as ImageFolder numbers them) and its path in the folder as `.txt`; then
SHARDS/<split>/shards.json (the shard list with each shard's sample count, as the indexed reader wids takes it, and
the class names). The output is read back and its samples per class compared with the folder's.

    python make_shards.py --index SHARDS/train

builds shards.json for shards written by other tools (webdataset.TarWriter, img2dataset: image + `.cls`).
Then `--data_path SHARDS` trains from the shards as from the folder (PRETRAIN.md, "Data in shards").
"""
import argparse
import collections
import os
import sys
import time
from typing import List

import util.cli as cli
from util.datasets import ImageFolder
from util.errors import DataError, UserError
from util.sources import SHARD_INDEX, require, scan_shard, write_shard_index


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE shard writer", add_help=False,
                                     description="Write an ImageFolder as WebDataset shards (or index shards).")
    group = parser.add_argument_group("shard parameters")
    group.add_argument("--data_path", default=None, help="ImageFolder root with train/ (and val/) class folders")
    group.add_argument("--output_dir", default=None, help="where to write <split>/<split>-NNNNNN.tar and shards.json")
    group.add_argument("--splits", nargs="+", default=["train", "val"],
                        help="the splits to write (those missing in --data_path are skipped)")
    group.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most")
    group.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    group.add_argument("--index", default=None, metavar="FOLDER",
                        help="instead: write FOLDER/shards.json for the .tar shards in FOLDER")
    return parser


def shards_of(folder: str) -> List[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".tar"))


def write_split(source: str, folder: str, split: str, maxcount: int, maxsize: float) -> None:
    """source (an ImageFolder split) as shards in folder, then checked against it."""
    require("webdataset", "writing WebDataset shards")
    import webdataset as wds

    dataset = ImageFolder(source)
    os.makedirs(folder, exist_ok=True)
    if shards_of(folder):
        raise UserError(f"{folder} already holds shards; give an empty --output_dir")
    start, n = time.time(), len(dataset.samples)
    with wds.ShardWriter(os.path.join(folder, f"{split}-%06d.tar"), maxcount=maxcount, maxsize=maxsize,
                         verbose=0) as sink:
        for i, (path, label) in enumerate(dataset.samples):
            field = os.path.splitext(path)[1].lower().lstrip(".") or "jpg"
            with open(path, "rb") as f:
                sink.write({"__key__": f"{i:09d}", field: f.read(), "cls": str(label),
                            "txt": os.path.relpath(path, source)})
            if (i + 1) % 10000 == 0 or i + 1 == n:
                print(f"{split}: {i + 1}/{n} images, {(i + 1) / max(time.time() - start, 1e-9):.0f} img/s", flush=True)
    shards = shards_of(folder)
    write_shard_index(folder, shards, classes=dataset.classes)
    written = collections.Counter(label for shard in shards for label in scan_shard(shard)[1])
    expected = collections.Counter(label for _, label in dataset.samples)
    if written != expected:
        raise DataError(f"the shards in {folder} hold {dict(written)} samples per class, the folder "
                        f"{dict(expected)}; the writing went wrong: delete {folder} and write it again")
    print(f"{split}: {len(shards)} shard(s) in {folder}, {n} samples in {len(dataset.classes)} classes, "
          f"each class's count equal to the folder's")


def main(args: argparse.Namespace) -> None:
    if args.index:
        shards = shards_of(args.index) if os.path.isdir(args.index) else []
        if not shards:
            raise UserError(f"--index {args.index}: no .tar shards there")
        try:
            index = write_shard_index(args.index, shards)
        except PermissionError:
            raise UserError(f"--index {args.index}: the folder is not writable; run this as a user who can "
                            f"write there") from None
        print(f"{os.path.join(args.index, SHARD_INDEX)}: {len(shards)} shard(s), "
              f"{sum(s['nsamples'] for s in index['shardlist'])} samples, {len(index['classes'])} classes")
        return
    if not args.data_path or not args.output_dir:
        raise UserError("--data_path and --output_dir are required (or --index FOLDER)")
    if args.maxcount < 1:
        raise UserError(f"--maxcount must be at least 1, got {args.maxcount}")
    splits = [s for s in args.splits if os.path.isdir(os.path.join(args.data_path, s))]
    if not splits:
        raise UserError(f"--data_path {args.data_path} has none of {', '.join(args.splits)}/")
    for split in splits:
        write_split(os.path.join(args.data_path, split), os.path.join(args.output_dir, split), split,
                    args.maxcount, args.maxsize)


if __name__ == "__main__":
    sys.exit(cli.launch(main, cli.command_line_parser(get_args_parser()).parse_args()))
