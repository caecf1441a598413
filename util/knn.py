"""k-NN classification on frozen features, the protocol of DINO: L2-normalised features, cosine similarity,
the k nearest training images vote with weight exp(similarity / temperature).

References:
    DINO: https://arxiv.org/abs/2104.14294 (k-NN evaluation)
    Wu et al., instance discrimination: https://arxiv.org/abs/1805.01978
"""
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Subset

from util.datasets import check_same_classes
from util.distributed import all_reduce_sum_, get_world_size
from util.errors import UserError
from util.loaders import eval_loader
from util.logger import log
from util.precision import autocast
from util.recipes import eval_recipe
from util.sources import open_split


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `local` (on this rank's device), concatenated in rank order (a collective)."""
    if get_world_size() == 1:
        return local
    sizes = torch.tensor([local.shape[0]], device=local.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(get_world_size())]
    dist.all_gather(all_sizes, sizes)
    longest = int(max(int(n) for n in all_sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in all_sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(n)] for part, n in zip(parts, all_sizes)])


@torch.no_grad()
def extract_features(encode: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device,
                     amp: str = "none") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dataset indices [n], L2-normalised features [n, D], labels [n]) of this rank's images, on `device`."""
    feats, labels, indices = [], [], []
    index_iter = iter(loader.sampler)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)  # normalised floats (util/loaders.py)
        with autocast(device, amp):
            out = encode(images)
        feats.append(F.normalize(out.float(), dim=1))
        labels.append(targets.to(device))
        indices.extend(next(index_iter) for _ in range(len(targets)))
    if not feats:  # an empty shard: the feature width comes from one forward pass of nothing
        dim = encode(torch.zeros(0, 3, *_image_size(loader), device=device)).shape[-1]
        return (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dim, device=device),
                torch.zeros(0, dtype=torch.long, device=device))
    return torch.tensor(indices, dtype=torch.long, device=device), torch.cat(feats), torch.cat(labels)


def _image_size(loader: Iterable) -> Tuple[int, int]:
    image = loader.dataset[0][0]
    return tuple(image.shape[-2:])


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, ks: Sequence[int], temperature: float = 0.07, num_classes: int = 0,
                 weighting: str = "exp", chunk: int = 256) -> Dict[int, Tuple[float, float]]:
    """k -> (top-1 %, top-5 %) of k-NN voting on L2-normalised features (all on one device).

    Args:
        ks: the numbers of neighbours to evaluate (each capped at the training-set size).
        weighting: 'exp' (DINO: exp(cosine similarity / temperature)) or 'uniform' (one vote each).
        num_classes: at least max label + 1 (default: from the labels).
    """
    hits = knn_hits(train_feats, train_labels, val_feats, val_labels, ks, temperature, num_classes, weighting, chunk)
    n = max(val_feats.shape[0], 1)
    return {k: (100.0 * h1 / n, 100.0 * h5 / n) for k, (h1, h5) in hits.items()}


@torch.no_grad()
def knn_hits(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
             val_labels: torch.Tensor, ks: Sequence[int], temperature: float = 0.07, num_classes: int = 0,
             weighting: str = "exp", chunk: int = 256) -> Dict[int, Tuple[int, int]]:
    """k -> (top-1 hits, top-5 hits) among the validation images (see knn_classify)."""
    num_classes = max(num_classes, int(train_labels.max()) + 1,
                      int(val_labels.max()) + 1 if val_labels.numel() else 0)
    k_max = min(max(ks), train_feats.shape[0])
    hits = {k: [0, 0] for k in ks}
    # similarities in fp32 even under a caller's autocast: a bf16 cosine (steps of 1/256 near 1) reorders
    # neighbours and, through exp(s / 0.07), moves votes by several percent
    train_feats, val_feats = train_feats.float(), val_feats.float()
    for start in range(0, val_feats.shape[0], chunk):
        with torch.autocast(train_feats.device.type, enabled=False):
            sims, idx = (val_feats[start:start + chunk] @ train_feats.T).topk(k_max, dim=1)  # [B, k_max]
        neighbours = train_labels[idx]  # [B, k_max]
        weights = (sims / temperature).exp() if weighting == "exp" else torch.ones_like(sims)
        targets = val_labels[start:start + chunk]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64, device=sims.device)
            votes.scatter_add_(1, neighbours[:, :kk], weights[:, :kk].double())
            top = votes.topk(min(5, kk, num_classes), dim=1).indices  # DINO: top-5 among at most k guesses
            hits[k][0] += int((top[:, 0] == targets).sum())
            hits[k][1] += int((top == targets[:, None]).any(dim=1).sum())
    return {k: (h1, h5) for k, (h1, h5) in hits.items()}


def knn_evaluate(encode: Callable[[torch.Tensor], torch.Tensor], train_loader: Iterable, val_loader: Iterable,
                 device: torch.device, ks: Sequence[int], temperature: float = 0.07,
                 amp: str = "none") -> Dict[int, Tuple[float, float]]:
    """Extract the features of both loaders (sharded), classify the validation images; prints one line per k
    and the cost. Every rank holds the whole training set's features (gathered as tensors, on the device)
    and votes for its own validation shard; the hits are summed over ranks."""
    start = time.time()
    train_idx, train_feats, train_labels = extract_features(encode, train_loader, device, amp)
    order = _gather_rows(train_idx).argsort()  # dataset order, whatever the sharding
    train_feats, train_labels = _gather_rows(train_feats)[order], _gather_rows(train_labels)[order]
    _, val_feats, val_labels = extract_features(encode, val_loader, device, amp)
    num_classes = len(getattr(_base(val_loader.dataset), "classes", [])) or 0
    hits = knn_hits(train_feats, train_labels, val_feats, val_labels, ks, temperature, num_classes)
    counts = torch.tensor([[h1, h5] for h1, h5 in hits.values()] + [[val_feats.shape[0], 0]],
                          dtype=torch.float64, device=device)
    counts = all_reduce_sum_(counts)
    n = max(int(counts[-1, 0]), 1)
    results = {k: (100.0 * float(c[0]) / n, 100.0 * float(c[1]) / n) for k, c in zip(hits, counts[:-1])}
    for k, (top1, top5) in results.items():
        capped = f" (k capped at the {train_feats.shape[0]} training images)" if k > train_feats.shape[0] else ""
        log(f"{k}-NN classifier result: Top1: {top1:.1f}, Top5: {top5:.1f}{capped}")
    log(f"k-NN evaluation: {train_feats.shape[0]} training and {n} validation images in "
        f"{time.time() - start:.1f} s")
    return results


def _base(dataset: Any) -> Any:
    return dataset.dataset if isinstance(dataset, Subset) else dataset


def encoder_features(model: torch.nn.Module, global_pool: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> features of an MAE's encoder (all patches visible): the cls token, or the mean of the patch
    tokens with global_pool."""
    def encode(images: torch.Tensor) -> torch.Tensor:
        n, L = images.shape[0], model.patch_embed.num_patches
        keep_all = torch.arange(L, device=images.device, dtype=torch.float).expand(n, L)
        latent = model.forward_encoder(images, 0.0, noise=keep_all)[0]  # [N, 1+L, D], patches in order
        return latent[:, 1:].mean(dim=1) if global_pool else latent[:, 0]
    return encode


def knn_ks(values: List[int]) -> List[int]:
    """The --nb_knn values, checked."""
    if not values or any(k < 1 for k in values):
        raise ValueError(f"--nb_knn takes numbers of neighbours of at least 1, got {values}")
    return list(values)


def knn_loaders(data_path: str, input_size: int, batch_size: int, num_workers: int, pin_mem: bool,
                device: torch.device, max_train: int = 0, strict: bool = False, image_column: str = "image",
                label_column: str = "label", in_chans: int = 3, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                std: Sequence[float] = IMAGENET_DEFAULT_STD) -> Tuple[Any, Any]:
    """Sharded evaluation loaders (util/loaders.py, torch) of the train split (a fixed random subset of max_train
    images, if set) and the val split of data_path (any labelled source of util/sources.py), resized and
    center-cropped as evaluation is."""
    is_hf = os.path.isfile(os.path.join(data_path, "dataset_dict.json"))
    if not is_hf and not os.path.isdir(os.path.join(data_path, "val")):
        raise UserError(f"k-NN evaluation needs {os.path.join(data_path, 'val')}: train/ and val/ class folders or "
                        f"shards, or a Hugging Face save_to_disk folder (--data_path of main_knn.py, --knn_data_path "
                        f"of main_pretrain.py)")
    train, val = (open_split(data_path, split, strict, image_column=image_column, label_column=label_column,
                             in_chans=in_chans) for split in ("train", "val"))
    check_same_classes(train, val)
    if max_train and len(train) > max_train:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:max_train].sort().values
        train = Subset(train, keep.tolist())
    # no workers kept between evaluations, and a private generator: training's random stream is untouched
    return tuple(eval_loader("torch", ds, eval_recipe(input_size).normalized(mean, std), batch_size, num_workers, pin_mem, dist_eval=True,
                             device=device, keep_workers=False) for ds in (train, val))
