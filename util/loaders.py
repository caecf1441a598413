"""The loaders the entry points use: one stage recipe (util/recipes.py), rendered by the --data_loader backend.

Both backends read the same ImageFolder through the same sampler (util/samplers.py) with the same bad-file
policy (ImageFolder.unreadable), and every loader yields the same batch:

    images: float32 [N, C, S, S], normalised with the recipe's mean and std (ImageNet's unless --mean / --std),
            on the training device
    labels: int64 [N], on the training device

torch: worker processes run the recipe's torchvision / timm transforms and hand out uint8 (a quarter of the
bytes; fine-tuning's training recipe excepted, whose random erasing works on normalised values in the workers);
`DeviceBatches` moves each batch to the device and normalises it there. The engines' own `normalize_images` call
is for callers that hand them a plain DataLoader of uint8 images; for these loaders it does nothing.
Building a torch loader sets the dataset's transform to the recipe's: one dataset, one loader.
dali: the pipeline decodes, augments and normalises on the device itself (util/dali.py, imported only then); it
reads a folder's image files itself, and is fed the encoded bytes of shards and Hugging Face datasets in the
sampler's order.
"""
from typing import Any, Iterator, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from util.datasets import ImageFolder, eval_loader as torch_eval_loader, train_loader as torch_train_loader
from util.distributed import get_world_size
from util.errors import UserError
from util.optional import require_dali
from util.recipes import Recipe
from util.transforms import normalize_images, torch_transform

LOADERS = ("torch", "dali")


class DeviceBatches:
    """A torch DataLoader whose batches are finished to the loaders' contract: on the device, normalised.

    Keeps the DataLoader attributes the training loop reads (dataset, sampler, batch_size, len). iter() starts
    the DataLoader's iterator at once (it draws the loader's seed), as iterating the DataLoader would.
    """

    def __init__(self, loader: DataLoader, recipe: Recipe, device: torch.device):
        self.loader, self.recipe, self.device = loader, recipe, device
        self.dataset, self.sampler, self.batch_size = loader.dataset, loader.sampler, loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self._finish(iter(self.loader))

    def _finish(self, batches: Iterator) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        expected = torch.float32 if self.recipe.normalized_by_workers else torch.uint8
        for images, labels in batches:
            if images.dtype != expected:
                raise TypeError(f"the {self.recipe.stage} transform gave {images.dtype} images, the loader expects "
                                f"{expected} (util/recipes.py Recipe.normalized_by_workers)")
            images = normalize_images(images.to(self.device, non_blocking=True), self.recipe.mean, self.recipe.std)
            yield images, labels.to(self.device, non_blocking=True)


def _dali_can_read(dataset: Any) -> None:
    """DALI reads image files (ImageFolder, an unlabeled folder: `samples`) or is fed encoded bytes (shards,
    Hugging Face datasets: `encoded`), of 8-bit RGB images."""
    require_dali()
    if getattr(getattr(dataset, "dataset", dataset), "float_pixels", False):
        raise UserError(f"--data_loader dali decodes 8-bit RGB images; {dataset.root} is read as "
                        f"{dataset.in_chans}-channel images at full precision (--in_chans other than 3, or .npy "
                        f"files): use --data_loader torch")
    if not (hasattr(dataset, "samples") or hasattr(dataset, "encoded")):
        raise UserError(f"--data_loader dali cannot read {type(dataset).__name__} ({dataset.root}); use "
                        f"--data_loader torch")


def _render_for_torch(dataset: Any, recipe: Recipe) -> Recipe:
    """The recipe (for the dataset's images) as the dataset's transform, run by the DataLoader's workers."""
    recipe = recipe.for_dataset(dataset)
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    base.transform = torch_transform(recipe)
    return recipe


def train_loader(kind: str, dataset: ImageFolder, recipe: Recipe, batch_size: int, num_workers: int, pin_mem: bool,
                 seed: int, device: torch.device, accum_iter: int = 1) -> Any:
    """The training loader of --data_loader `kind` (shuffled per epoch, this rank's share, drop_last); refuses an
    `accum_iter` that no epoch reaches, which would train nothing."""
    if kind == "dali":
        _dali_can_read(dataset)
        import util.dali as dali
        loader: Any = dali.dali_train_loader(dataset, recipe, batch_size, num_workers, seed, device)
    else:
        recipe = _render_for_torch(dataset, recipe)
        loader = DeviceBatches(torch_train_loader(dataset, batch_size, num_workers, pin_mem, seed), recipe, device)
    if len(loader) < accum_iter:
        raise UserError(f"--accum_iter {accum_iter} is more than the {len(loader)} batch(es) of an epoch "
                        f"({len(dataset)} images, --batch_size {batch_size} x {get_world_size()} process(es)): "
                        f"no optimizer step would run; lower --accum_iter to at most {len(loader)} "
                        f"(or --batch_size)")
    return loader


def eval_loader(kind: str, dataset: Any, recipe: Recipe, batch_size: int, num_workers: int, pin_mem: bool,
                dist_eval: bool, device: torch.device, keep_workers: bool = True) -> Any:
    """The validation loader of --data_loader `kind`: every image once, sharded over the ranks with dist_eval.

    keep_workers=False (torch): workers end with each pass and draw from the loader's own generator, for
    evaluations inside a training run (the k-NN monitor) that must not touch training's random stream."""
    if kind == "dali":
        _dali_can_read(dataset)
        import util.dali as dali
        return dali.dali_eval_loader(dataset, recipe, batch_size, num_workers, dist_eval, device)
    recipe = _render_for_torch(dataset, recipe)
    return DeviceBatches(torch_eval_loader(dataset, batch_size, num_workers, pin_mem, dist_eval, keep_workers),
                         recipe, device)
