"""k-NN classification on frozen features, the protocol of DINO: L2-normalised features, cosine similarity,
the k nearest training images vote with weight exp(similarity / temperature).

References:
    DINO: https://arxiv.org/abs/2104.14294 (k-NN evaluation)
    Wu et al., instance discrimination: https://arxiv.org/abs/1805.01978
"""
import argparse
import os
import time
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from util.datasets import build_dataset, eval_loader
from util.distributed import all_gather_objects
from util.errors import UserError
from util.logger import log
from util.precision import autocast
from util.transforms import eval_transform, normalize_images


@torch.no_grad()
def extract_features(encode: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device,
                     amp: str = "none") -> Tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised features [N, D], labels [N]) of every image of the loader's dataset, in dataset order.

    The loader may be a shard (util.datasets.ShardSampler) of a distributed run: the shards are gathered,
    so every rank ends with the whole set (a collective).
    """
    feats, labels, indices = [], [], []
    index_iter = iter(loader.sampler)
    for images, targets in loader:
        images = normalize_images(images.to(device, non_blocking=True))
        with autocast(device, amp):
            out = encode(images)
        feats.append(F.normalize(out.float(), dim=1).cpu())
        labels.append(targets)
        indices.extend(next(index_iter) for _ in range(len(targets)))
    dim = feats[0].shape[1] if feats else 0
    shard = (torch.tensor(indices, dtype=torch.long), torch.cat(feats) if feats else torch.zeros(0, dim),
             torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    parts = all_gather_objects(shard)
    order = torch.cat([p[0] for p in parts]).argsort()
    return torch.cat([p[1] for p in parts])[order], torch.cat([p[2] for p in parts])[order]


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, ks: Sequence[int], temperature: float = 0.07, num_classes: int = 0,
                 weighting: str = "exp", chunk: int = 256) -> Dict[int, Tuple[float, float]]:
    """k -> (top-1 %, top-5 %) of k-NN voting on L2-normalised features.

    Args:
        ks: the numbers of neighbours to evaluate (each capped at the training-set size).
        weighting: 'exp' (DINO: exp(cosine similarity / temperature)) or 'uniform' (one vote each).
        num_classes: at least max label + 1 (default: from the labels).
    """
    num_classes = max(num_classes, int(train_labels.max()) + 1, int(val_labels.max()) + 1)
    k_max = min(max(ks), train_feats.shape[0])
    hits = {k: [0, 0] for k in ks}
    for start in range(0, val_feats.shape[0], chunk):
        sims, idx = (val_feats[start:start + chunk] @ train_feats.T).topk(k_max, dim=1)  # [B, k_max]
        neighbours = train_labels[idx]  # [B, k_max]
        weights = (sims / temperature).exp() if weighting == "exp" else torch.ones_like(sims)
        targets = val_labels[start:start + chunk]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64)
            votes.scatter_add_(1, neighbours[:, :kk], weights[:, :kk].double())
            top = votes.topk(min(5, num_classes), dim=1).indices
            hits[k][0] += int((top[:, 0] == targets).sum())
            hits[k][1] += int((top == targets[:, None]).any(dim=1).sum())
    n = max(val_feats.shape[0], 1)
    return {k: (100.0 * h1 / n, 100.0 * h5 / n) for k, (h1, h5) in hits.items()}


def knn_evaluate(encode: Callable[[torch.Tensor], torch.Tensor], train_loader: Iterable, val_loader: Iterable,
                 device: torch.device, ks: Sequence[int], temperature: float = 0.07,
                 amp: str = "none") -> Dict[int, Tuple[float, float]]:
    """Extract the features of both loaders, classify the validation images; prints one line per k and the cost."""
    start = time.time()
    train_feats, train_labels = extract_features(encode, train_loader, device, amp)
    val_feats, val_labels = extract_features(encode, val_loader, device, amp)
    results = knn_classify(train_feats, train_labels, val_feats, val_labels, ks, temperature)
    for k, (top1, top5) in results.items():
        log(f"{k}-NN classifier result: Top1: {top1:.1f}, Top5: {top5:.1f}")
    log(f"k-NN evaluation: {len(train_labels)} training and {len(val_labels)} validation images in "
        f"{time.time() - start:.1f} s")
    return results


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
                max_train: int = 0, strict: bool = False) -> Tuple[DataLoader, DataLoader]:
    """Sharded evaluation loaders of data_path/train (a fixed random subset of max_train images, if set) and
    data_path/val, resized and center-cropped, uint8."""
    if not os.path.isdir(os.path.join(data_path, "val")):
        raise UserError(f"k-NN evaluation needs {os.path.join(data_path, 'val')}: point --knn_data_path at an "
                        f"ImageFolder with train/ and val/")
    where = argparse.Namespace(data_path=data_path, strict_data=strict)
    transform = eval_transform(input_size, normalize=False)
    train, val = (build_dataset(is_train, where, transform=transform) for is_train in (True, False))
    if max_train and len(train) > max_train:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:max_train].sort().values
        train = Subset(train, keep.tolist())
    return tuple(eval_loader(ds, batch_size, num_workers, pin_mem, dist_eval=True) for ds in (train, val))
