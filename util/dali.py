"""NVIDIA DALI loaders (`--data_loader dali`): JPEG decoding and augmentation on the GPU.

The same ImageFolder, the same samplers (util/samplers.py), the same bad-file policy and so the same images in
the same order as the torch loaders; decoding and the stage's recipe run in a DALI pipeline
(util/dali_graph.py) and batches come out as every loader's do: normalised float32 NCHW images on the
device, int64 labels.

A pipeline is built per epoch over that epoch's file list (this rank's shard of the epoch's shuffle)
with a seed drawn from (--seed, rank, epoch), so an epoch's augmentation depends on nothing before it.
DALI stops at an unreadable file, so the file list is checked once before the first epoch
(`scan_images`) and the bad files it finds go through ImageFolder.unreadable, as the torch loader's do; a file
that passes the check but that DALI cannot decode stops the run with one line naming it. On CPU
(`--device cpu`) the pipelines run DALI's CPU operators. This module is imported only when a DALI loader is
built (util/loaders.py), and NVIDIA DALI only when a pipeline is.
"""
import io
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler

from util.dali_graph import FED_INPUT, PREFETCH, PipelineFactory, dali_plan, epoch_seed, parse_rand_augment  # noqa: F401
from util.datasets import READ_ERRORS, ImageFolder
from util.distributed import all_gather_objects, get_rank, get_world_size
from util.errors import DataError
from util.logger import log
from util.optional import dali_available, install_command, require_dali  # noqa: F401
from util.recipes import Recipe, eval_recipe, linprobe_recipe, pretrain_recipe
from util.samplers import eval_sampler, train_sampler

DaliAug = Recipe  # the name of a stage's recipe before the torch and DALI loaders shared one


def pretrain_aug(input_size: int, aug: str = "crop_rand", hflip: float = 0.5,
                 scale: Sequence[float] = (0.2, 1.0)) -> Recipe:
    """The pre-training recipe, checked for DALI (crop_rand_color is torch-only)."""
    recipe = pretrain_recipe(input_size, aug, hflip, scale)
    dali_plan(recipe)
    return recipe


def linprobe_aug(is_train: bool, input_size: int, hflip: float = 0.5,
                 scale: Sequence[float] = (0.08, 1.0)) -> Recipe:
    """The linear-probing recipe (util.recipes.linprobe_recipe)."""
    return linprobe_recipe(is_train, input_size, hflip, scale)


def eval_aug(input_size: int) -> Recipe:
    """The evaluation recipe (util.recipes.eval_recipe)."""
    return eval_recipe(input_size)


# ----------------------------------------------------------------------------
# unreadable files, found before DALI meets them

def check_image(source: Union[str, bytes]) -> Optional[str]:
    """None when `source` (a file, or an image's encoded bytes) reads as an image, else why not.

    A JPEG is checked by its header and its end-of-image marker (no decoding: a truncated copy, the
    usual damage, lacks the marker); any other image, or a JPEG without the marker, is decoded in full.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if img.format == "JPEG":
                if isinstance(source, bytes):
                    if source[-2:] == b"\xff\xd9":
                        return None
                else:
                    with open(source, "rb") as f:
                        f.seek(-2, os.SEEK_END)
                        if f.read(2) == b"\xff\xd9":
                            return None
            img.load()
        return None
    except READ_ERRORS as e:
        return str(e) or type(e).__name__


def decode_error(path: str) -> Optional[str]:
    """None when PIL decodes `path` in full, else why not."""
    try:
        with Image.open(path) as img:
            img.load()
        return None
    except READ_ERRORS as e:
        return str(e) or type(e).__name__


def scan_images(dataset: ImageFolder, num_threads: int) -> List[int]:
    """Indices of `dataset`'s unreadable files, each process checking a share (a collective when
    distributed); each goes through dataset.unreadable on every rank (an error with --strict_data, else
    flagged, and named once, by rank 0: every rank finds every bad file)."""
    world, rank = get_world_size(), get_rank()
    mine = list(range(rank, len(dataset.samples), world))
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        found = [(i, err) for i, err in zip(mine, pool.map(lambda i: check_image(dataset.samples[i][0]), mine))
                 if err is not None]
    bad = sorted(x for share in all_gather_objects(found) for x in share)
    for i, err in bad:
        dataset.unreadable(i, err, every_rank=False)
    if len(bad) == len(dataset.samples):
        raise DataError(f"no readable image in {dataset.root}")
    return [i for i, _ in bad]


def substitutes(n: int, bad: Sequence[int]) -> np.ndarray:
    """For each index, itself, or for an unreadable one the next readable index (cyclically), as
    ImageFolder.load replaces it."""
    readable = np.ones(n, dtype=bool)
    readable[list(bad)] = False
    good = np.flatnonzero(readable)
    nxt = np.searchsorted(good, np.arange(n))  # first readable index >= i
    return good[nxt % len(good)]


# ----------------------------------------------------------------------------
# the loader

_DECODE_ERROR = re.compile(r"Failed to decode|fn\.decoders\.image")
_DALI_NAMED = re.compile(r"Failed to decode sample #\d+ : (.+)")


def is_decode_error(e: BaseException) -> bool:
    """Whether a DALI pipeline error comes from its image decoder (and not, say, a lack of memory)."""
    text = str(e)
    return bool(_DECODE_ERROR.search(text)) and "out of memory" not in text.lower()


def decode_failure(e: BaseException, files: Sequence[str], step: int, batch_size: int) -> str:
    """One line naming the file DALI could not decode at batch `step`: found by decoding that batch's files
    (and the prefetched ones) in full with PIL, else the one DALI names, else the batch's first few."""
    window = files[step * batch_size:(step + 1 + PREFETCH) * batch_size]
    for path in window:
        err = decode_error(path)
        if err is not None:
            return f"DALI could not decode {path} ({err[:200]}); remove or replace the file, or use --data_loader torch"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = next((m.group(1) for m in map(_DALI_NAMED.search, lines) if m), None)
    batch = files[step * batch_size:(step + 1) * batch_size]
    where = named or f"one of {', '.join(batch[:4])}{', ...' if len(batch) > 4 else ''}"
    reason = next((line for line in lines if "Failed to decode" in line), lines[-1] if lines else type(e).__name__)
    return f"DALI could not decode {where} ({reason[:200]}); remove or replace the file, or use --data_loader torch"


def reads_files(dataset: Any) -> bool:
    """Whether DALI reads `dataset` as image files (ImageFolder, an unlabeled folder: `samples`), or is fed its
    samples' encoded bytes (shards, Hugging Face datasets: `encoded`)."""
    return hasattr(dataset, "samples")


class Feed:
    """Fills a fed pipeline's input (FED_INPUT) with one pass's samples, a batch at a time, in `order`.

    Each sample's encoded bytes come from dataset.encoded(i) and are checked as check_image checks a file; an
    unreadable sample goes through the dataset's bad-sample policy and is replaced by the next readable one
    (as BadSamplePolicy.load does). `fed` keeps the indices of each batch (for messages), `labels` their labels.
    """

    def __init__(self, dataset: Any, order: Sequence[int], batch_size: int):
        self.dataset = dataset
        self.batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        self.fed: List[List[int]] = []
        self.labels: List[torch.Tensor] = []  # of each fed batch: batch k comes out of the pipeline k-th

    def sample(self, index: int) -> Tuple[np.ndarray, int, int]:
        n = len(self.dataset)
        for attempt in range(n):
            i = (index + attempt) % n
            if self.dataset.is_flagged(i):
                continue
            try:
                data, label = self.dataset.encoded(i)
                err = check_image(data)
            except READ_ERRORS as e:
                err = str(e) or type(e).__name__
            if err is None:
                return np.frombuffer(data, dtype=np.uint8), label, i
            self.dataset.unreadable(i, err)
        raise DataError(f"no readable image in {self.dataset.root}")

    def __call__(self, pipe: Any) -> None:
        if len(self.fed) == len(self.batches):
            raise StopIteration  # the end of the pass, for DALI's iterator
        picked = [self.sample(int(i)) for i in self.batches[len(self.fed)]]
        self.fed.append([i for _, _, i in picked])
        self.labels.append(torch.tensor([label for _, label, _ in picked], dtype=torch.int64))
        pipe.feed_input(FED_INPUT, [data for data, _, _ in picked])

    def failure(self, e: BaseException, step: int) -> str:
        """One line naming the sample DALI could not decode at batch `step` (decoded in full with PIL)."""
        window = [i for batch in self.fed[step:step + 1 + PREFETCH] for i in batch]
        for i in window:
            try:
                Image.open(io.BytesIO(self.dataset.encoded(i)[0])).load()
            except READ_ERRORS as err:
                return (f"DALI could not decode {self.dataset.describe(i)} ({str(err)[:200]}); remove or replace it, "
                        f"or use --data_loader torch")
        batch = [self.dataset.describe(i) for i in (self.fed[step] if step < len(self.fed) else [])[:4]]
        return (f"DALI could not decode one of {', '.join(batch) or 'this batch'} ({str(e).splitlines()[-1][:200]}); "
                f"remove or replace it, or use --data_loader torch")


class DaliLoader:
    """(images, labels) batches from a DALI pipeline, with the DataLoader attributes the training loop uses.

    `dataset` (an ImageFolder, whose files DALI reads, or a source that gives encoded bytes: util/sources.py),
    `sampler` (the torch loader's: the same per-epoch order, set_epoch / order / resume_from), `batch_size`,
    `len()`. Images come out normalised, float32, NCHW, on `device`; labels int64 [N].
    """

    def __init__(self, dataset: Any, sampler: Sampler, aug: Recipe, batch_size: int, num_threads: int,
                 device: torch.device, seed: int, drop_last: bool, bad: Sequence[int] = ()):
        self.dataset, self.sampler, self.aug = dataset, sampler, aug
        self.batch_size, self.num_threads, self.seed, self.drop_last = batch_size, num_threads, seed, drop_last
        self.device = device
        self.device_id = _device_id(device)
        self._substitute = substitutes(len(dataset.samples), bad) if reads_files(dataset) else None
        self._factory = PipelineFactory(aug, batch_size, num_threads, self.device_id)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self) -> List[int]:
        """This pass's sample indices, in order (drop_last applied)."""
        order = list(iter(self.sampler))
        if self.drop_last:
            order = order[:len(order) // self.batch_size * self.batch_size]
        return order

    def files(self) -> Tuple[List[str], List[int]]:
        """This pass's files and labels, in order (unreadable ones replaced as ImageFolder.load does)."""
        samples = self.dataset.samples
        picked = [samples[int(self._substitute[i])] for i in self.order()]
        return [p for p, _ in picked], [t for _, t in picked]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        seed = epoch_seed(self.seed, get_rank(), getattr(self.sampler, "epoch", 0))
        feed: Optional[Feed] = None
        if reads_files(self.dataset):
            files, labels = self.files()
            if not files:
                return
            pipe = self._factory.build(files, labels, seed)
        else:
            order = self.order()
            if not order:
                return
            feed = Feed(self.dataset, order, self.batch_size)
            pipe = self._factory.build_fed(seed, feed)
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        batches = None
        step = 0
        try:
            while True:
                try:
                    if batches is None:  # inside the try: the constructor already runs the first batch
                        if feed is None:
                            batches = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                                                          auto_reset=False, last_batch_policy=LastBatchPolicy.PARTIAL)
                        else:
                            batches = DALIGenericIterator([pipe], ["seed_pad", "images"], auto_reset=False,
                                                          last_batch_policy=LastBatchPolicy.PARTIAL)
                    out = next(batches)[0]
                except StopIteration:
                    return
                except RuntimeError as e:
                    if not is_decode_error(e):
                        raise
                    message = decode_failure(e, files, step, self.batch_size) if feed is None else \
                        feed.failure(e, step)
                    raise DataError(message) from None
                labels = out["labels"].view(-1).long() if feed is None else feed.labels[step].to(out["images"].device)
                step += 1
                yield out["images"], labels
        finally:
            del batches, pipe


def _device_id(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def dali_train_loader(dataset: Any, aug: Recipe, batch_size: int, num_threads: int, seed: int,
                      device: torch.device) -> DaliLoader:
    """The DALI counterpart of util.datasets.train_loader: the same sampler, drop_last, files checked first."""
    require_dali()
    dali_plan(aug)
    sampler = train_sampler(dataset, batch_size, seed)
    bad = scan_images(dataset, num_threads) if reads_files(dataset) else ()  # fed samples: checked as fed
    log(f"DALI loader ({'GPU' if device.type == 'cuda' else 'CPU'} decoding, {max(1, num_threads)} threads)")
    return DaliLoader(dataset, sampler, aug, batch_size, num_threads, device, seed, drop_last=True, bad=bad)


def dali_eval_loader(dataset: Any, aug: Recipe, batch_size: int, num_threads: int, dist_eval: bool,
                     device: torch.device) -> DaliLoader:
    """The DALI counterpart of util.datasets.eval_loader: sequential, or every image once across ranks."""
    require_dali()
    sampler = eval_sampler(dataset, dist_eval)
    bad = scan_images(dataset, num_threads) if reads_files(dataset) else ()
    return DaliLoader(dataset, sampler, aug, batch_size, num_threads, device, seed=0, drop_last=False, bad=bad)
