"""Where a split's images come from, besides the reference's ImageFolder: WebDataset shards, an unlabeled folder,
and a Hugging Face dataset saved with `save_to_disk`.

`open_split(data_path, split, ...)` picks the source from what `--data_path` holds:

- `D/dataset_dict.json`: a Hugging Face DatasetDict (splits `train`, and `validation` or `val`);
- `D/train-{000000..000127}.tar` (a brace pattern, or one .tar): those training shards, for pre-training;
- `D/<split>/` holding `.tar` files (and no class folders): WebDataset shards, read by random access through the
  indexed reader `wids`, so the samplers, the exact mid-epoch resume and the bad-sample policy work as for a folder;
- `D/<split>/<class>/<image>`: the reference's ImageFolder;
- a training split of a D with neither `train/` nor `val/`, when the stage takes unlabeled images (pre-training):
  every image under D, at any depth, label 0.

Every source is a BadSamplePolicy dataset with `classes`, `root`, `read`, `describe` and `fingerprint`
(what a mid-epoch position is checked against). ImageFolder and the unlabeled folder have image files (`samples`),
which DALI's file reader reads; shards and Hugging Face datasets give each sample's encoded bytes (`encoded`), which
the DALI loader feeds to its decoder in the sampler's order. webdataset / wids and datasets are
optional (requirements-data.txt) and imported when such a source is opened.
"""
import contextlib
import hashlib
import io
import json
import os
import tarfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset
from util.datasets import IMAGE_FILE_EXTENSIONS, BadSamplePolicy, ImageFolder, load_image, reads_pixels, split_folder
from util.distributed import broadcast_object, is_main_process
from util.errors import DataError, UserError
from util.hf_datasets import HFImages
from util.logger import log, warn
from util.optional import require_package
from util.pixels import load_pixels

SHARD_INDEX = "shards.json"  # next to the shards: wids' shard list (nsamples per shard) plus the class names
INDEX_KIND = "mae-webdataset-index-v1"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "npy")


require = require_package  # (used by make_shards.py)


# ----------------------------------------------------------------------------
# an unlabeled folder

def list_images(root: str) -> List[str]:
    """Every image file under root, at any depth, in sorted order (os.scandir, no stat of each file)."""
    found, stack = [], [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                elif entry.name.lower().endswith(IMAGE_FILE_EXTENSIONS):
                    found.append(entry.path)
    return sorted(found)


class UnlabeledFolder(BadSamplePolicy, Dataset):
    """Every image under `root` (any nesting) as one unlabeled set: label 0, no classes."""

    def __init__(self, root: str, strict: bool = False, in_chans: int = 3):
        self.root, self.classes = root, []
        # listed once by rank 0 and shared (a collective), as ImageFolder's files
        self.samples = [(path, 0) for path in broadcast_object(list_images(root) if is_main_process() else None)]
        if not self.samples:
            raise DataError(f"no images under {root}: --data_path must hold train/ (and val/) class folders, or "
                            f"image files at any depth for pre-training without labels")
        self.in_chans = in_chans
        self.float_pixels = reads_pixels(in_chans, (p for p, _ in self.samples))
        self._track_bad_samples(len(self.samples), strict)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> Any:
        path = self.samples[index][0]
        return (load_pixels(path, self.in_chans) if self.float_pixels else load_image(path)), 0

    def describe(self, index: int) -> str:
        return self.samples[index][0]

    def __repr__(self) -> str:
        return f"UnlabeledFolder\n    Number of datapoints: {len(self)}\n    Root location: {self.root}"


# ----------------------------------------------------------------------------
# WebDataset shards

def _key_and_field(name: str) -> Tuple[str, str]:
    """A tar member's sample key and field, as webdataset splits them: at the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, _, field = base.partition(".")
    return os.path.join(folder, stem), field.lower()


def scan_shard(path: str, fields: Optional[set] = None) -> Tuple[int, List[int]]:
    """(samples, their labels, -1 where a sample has no .cls) of one tar shard, read member by member; the image
    fields met (jpg, npy, ...) are added to `fields` when given."""
    keys: Dict[str, int] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, field = _key_and_field(member.name)
                keys.setdefault(key, -1)
                if field == "cls":
                    keys[key] = int(tar.extractfile(member).read().decode().strip())
                elif fields is not None and field in IMAGE_KEYS:
                    fields.add(field)
    except (tarfile.TarError, OSError, ValueError) as e:
        raise DataError(f"cannot read shard {path}: {e}; rewrite it (make_shards.py) or remove it") from None
    return len(keys), list(keys.values())


def _stamp(path: str) -> Dict[str, int]:
    """What tells a rewritten shard: its size and modification time."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_shard_index(folder: str, shards: Sequence[str], classes: Optional[Sequence[str]] = None,
                      name: str = SHARD_INDEX) -> Dict[str, Any]:
    """Scan `shards` and write folder/shards.json: wids' shard list (url, nsamples) and the class names (given,
    or '0'..'K-1' from the labels found)."""
    shardlist, top, fields = [], -1, set()
    for path in shards:
        n, labels = scan_shard(path, fields)
        if labels and min(labels) < 0:
            raise DataError(f"shard {path} has samples without a .cls label; write the label of each sample as "
                            f"<key>.cls (webdataset.TarWriter: 'cls')")
        top = max([top, *labels])
        shardlist.append({"url": os.path.relpath(path, folder), "nsamples": n, **_stamp(path)})
    index = {"__kind__": INDEX_KIND, "wids_version": 1, "shardlist": shardlist,
             "classes": list(classes) if classes is not None else [str(i) for i in range(top + 1)],
             "image_fields": sorted(fields)}
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(folder, name))
    return index


def shard_index(folder: str, shards: Sequence[str], name: str = SHARD_INDEX,
                classes: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """folder/shards.json (or `name`), built once by rank 0 when missing or stale (shards added, removed or
    rewritten)."""
    def build() -> Dict[str, Any]:
        path = os.path.join(folder, name)
        names = [os.path.relpath(s, folder) for s in shards]
        if os.path.exists(path):
            with open(path) as f:
                index = json.load(f)
            listed = [(s["url"], s.get("size"), s.get("mtime_ns")) for s in index["shardlist"]]
            current = listed == [(n, *_stamp(os.path.join(folder, n)).values()) for n in names]
            if current and "image_fields" in index:  # (indexes written before image fields were recorded: again)
                return index
        if not os.access(folder, os.W_OK):
            raise UserError(f"{folder} holds shards without an up-to-date {SHARD_INDEX} and is read-only: run "
                            f"`python make_shards.py --index {folder}` as a user who can write there")
        old = None
        if os.path.exists(path):
            with open(path) as f:
                old = {s["url"]: s["nsamples"] for s in json.load(f)["shardlist"]}
        log(f"Indexing {len(shards)} shard(s) in {folder} (once: {name})")
        index = write_shard_index(folder, shards, classes, name=name)
        changed = [f"{s['url']} ({old[s['url']]} -> {s['nsamples']} samples)" for s in index["shardlist"]
                   if old is not None and s["url"] in old and old[s["url"]] != s["nsamples"]]
        if changed:
            warn(f"shard(s) changed since they were indexed, check they are whole: {', '.join(changed[:5])}")
        return index
    index = broadcast_object(build() if is_main_process() else None)
    if index is None:  # rank 0 failed: its error is the one to read
        raise DataError(f"rank 0 could not index the shards in {folder}")
    return index


class ShardDataset(BadSamplePolicy, Dataset):
    """WebDataset tar shards as a random-access dataset (wids), in the order of folder/shards.json.

    Each sample is an image (one of IMAGE_KEYS) and its label (`.cls`, an integer as text).
    """

    def __init__(self, folder: str, shards: Sequence[str], strict: bool = False, index_name: str = SHARD_INDEX,
                 classes: Optional[Sequence[str]] = None, in_chans: int = 3):
        require_package("wids", "reading WebDataset shards")
        self.root, self.folder = folder, folder
        self.in_chans = in_chans
        index = shard_index(folder, shards, index_name, classes)
        self.shardlist = [{"url": os.path.join(folder, s["url"]), "nsamples": s["nsamples"]}
                          for s in index["shardlist"]]
        self.classes = list(index["classes"])
        # as a folder: full precision for other than 3 channels, or where the shards hold .npy arrays
        self.float_pixels = reads_pixels(in_chans, (f".{f}" for f in index.get("image_fields", ())))
        self._len = sum(s["nsamples"] for s in self.shardlist)
        self._reader: Optional[Any] = None
        self._reader_pid = -1
        self._track_bad_samples(self._len, strict)

    def __len__(self) -> int:
        return self._len

    def _samples(self) -> Any:
        # opened in each process that reads (loader workers too): open tar files are not shared across a fork
        if self._reader is None or self._reader_pid != os.getpid():
            import wids
            quiet = io.StringIO()  # wids prints its shard list
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                self._reader = wids.ShardListDataset(self.shardlist, transformations=[])
            self._reader_pid = os.getpid()
        return self._reader

    def _member(self, index: int) -> Tuple[bytes, str, int]:
        """(the image's bytes, its field, e.g. 'jpg', the label) of sample `index`."""
        sample = self._samples()[index]
        field = next((k for k in IMAGE_KEYS if f".{k}" in sample), None)
        if field is None:
            raise ValueError(f"no image field ({', '.join(IMAGE_KEYS)}) in sample {sample['__key__']}")
        label = sample.get(".cls")
        if label is None:
            raise DataError(f"sample {sample['__key__']} of {sample['__shard__']} has no .cls label")
        return sample[f".{field}"].read(), field, int(label.read().decode().strip())

    def encoded(self, index: int) -> Tuple[bytes, int]:
        """(the image's encoded bytes, the label) of sample `index`, undecoded (what the DALI loader feeds)."""
        data, _, label = self._member(index)
        return data, label

    def read(self, index: int) -> Any:
        data, field, label = self._member(index)
        if self.float_pixels:
            return load_pixels(data, self.in_chans, f"{self.describe(index)}.{field}"), label
        if field == "npy":  # an index written before image_fields were recorded
            raise DataError(f"{self.describe(index)} is a .npy array and {self.folder}'s {SHARD_INDEX} does not list "
                            f"its image fields: rebuild it with `python make_shards.py --index {self.folder}`")
        return load_image(io.BytesIO(data)), label

    def describe(self, index: int) -> str:
        start = 0
        for shard in self.shardlist:
            if index < start + shard["nsamples"]:
                return f"{shard['url']} (sample {index - start})"
            start += shard["nsamples"]
        return f"sample {index}"

    def fingerprint(self) -> str:
        """The shards, their sizes and sample counts: what a saved position is checked against."""
        text = "\n".join(f"{os.path.relpath(s['url'], self.folder)}\t{s['nsamples']}\t{os.path.getsize(s['url'])}"
                         for s in self.shardlist)
        return hashlib.sha1(text.encode()).hexdigest()

    def __repr__(self) -> str:
        return (f"ShardDataset\n    Number of datapoints: {len(self)}\n    Shards: {len(self.shardlist)} in "
                f"{self.folder}\n    Classes: {len(self.classes)}")


# ----------------------------------------------------------------------------
# picking the source

def _shards_in(folder: str) -> List[str]:
    names = sorted(os.listdir(folder))
    if any(os.path.isdir(os.path.join(folder, n)) for n in names):
        return []
    return [os.path.join(folder, n) for n in names if n.endswith(".tar")]


def is_shard_pattern(data_path: str) -> bool:
    """Whether --data_path names training shards itself: 'D/train-{000000..000127}.tar' or one 'D/x.tar'."""
    return data_path.endswith(".tar")


def pattern_shards(pattern: str, split: str, strict: bool, in_chans: int = 3) -> "ShardDataset":
    """The shards a brace pattern names (the training split only), indexed in <folder>/shards-<hash>.json."""
    if split != "train":
        raise UserError(f"--data_path {pattern} names training shards only; for a stage that also evaluates, give a "
                        f"folder with train/ and val/ shard folders")
    require_package("braceexpand", "a shard pattern")
    import braceexpand
    shards = [os.path.abspath(p) for p in braceexpand.braceexpand(pattern)]
    missing = [p for p in shards if not os.path.isfile(p)]
    if missing:
        raise DataError(f"--data_path {pattern}: {len(missing)} of its {len(shards)} shard(s) do not exist, e.g. "
                        f"{missing[0]}")
    folders = {os.path.dirname(p) for p in shards}
    if len(folders) > 1:
        raise UserError(f"--data_path {pattern} names shards in {len(folders)} folders; keep a pattern's shards in one")
    digest = hashlib.sha1("\n".join(os.path.basename(p) for p in shards).encode()).hexdigest()[:12]
    folder = folders.pop()
    classes = None  # the class names of the folder's make_shards.py index, when it has one
    if os.path.isfile(os.path.join(folder, SHARD_INDEX)):
        with open(os.path.join(folder, SHARD_INDEX)) as f:
            classes = json.load(f).get("classes")
    return ShardDataset(folder, shards, strict, index_name=f"shards-{digest}.json", classes=classes, in_chans=in_chans)


def open_split(data_path: str, split: str, strict: bool = False, unlabeled_ok: bool = False,
               image_column: str = "image", label_column: str = "label", in_chans: int = 3) -> Dataset:
    """The dataset of `split` ('train' or 'val') under --data_path, from whichever source it holds (see the module
    docstring); `unlabeled_ok`: a training split with no train/ folder is every image under data_path;
    `in_chans`: the channels of each image (util/pixels.py reads other than 3, and arrays)."""
    if is_shard_pattern(data_path):
        return pattern_shards(data_path, split, strict, in_chans)
    if os.path.isfile(os.path.join(data_path, "dataset_dict.json")):
        return HFImages(data_path, split, image_column, label_column, strict, in_chans)
    folder = os.path.join(data_path, split)
    if os.path.isdir(folder):
        shards = _shards_in(folder)
        if shards:
            return ShardDataset(folder, shards, strict, in_chans=in_chans)
        return ImageFolder(folder, strict=strict, in_chans=in_chans)
    has_split = any(os.path.isdir(os.path.join(data_path, s)) for s in ("train", "val"))
    if unlabeled_ok and split == "train" and os.path.isdir(data_path) and not has_split:
        dataset = UnlabeledFolder(data_path, strict, in_chans)
        log(f"No train/ in {data_path}: pre-training on every image under it, without labels "
            f"({len(dataset)} images)")
        return dataset
    if not os.path.isdir(data_path):
        split_folder(data_path, split)  # the error that names the missing --data_path
    raise DataError(f"{folder} not found: --data_path must contain a {split}/ folder of class folders or .tar "
                    f"shards, or be a Hugging Face save_to_disk folder (only pre-training reads a folder of unlabeled "
                    f"images, one with neither train/ nor val/)")
