"""Which images each process reads, in which order: one sampler path for both loaders.

- training: `train_sampler`, a DistributedSampler reshuffled per epoch (--seed), this rank's share, whose
  epoch can continue from a saved position (exact mid-epoch resume);
- evaluation: `eval_sampler`, every image once, in order, or sharded over the ranks with --dist_eval.

The torch DataLoader (util/datasets.py) and the DALI loader (util/dali.py) take these samplers, so both see
the same images in the same order.
"""
from typing import Iterator, List, Optional, Sequence

from torch.utils.data import Dataset, DistributedSampler, Sampler, SequentialSampler

from util.distributed import get_rank, get_world_size
from util.errors import UserError
from util.logger import log, warn


class ResumableSampler(DistributedSampler):
    """DistributedSampler (same per-epoch order) whose current epoch can continue from a saved position.

    `order()` is this rank's order for the current epoch; `resume_from(order, start)` makes the rest of
    the epoch yield order[start:]. `set_epoch` starts a new epoch from its beginning.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._saved: Optional[List[int]] = None  # the current epoch's saved order, when resumed
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._saved, self._start = None, 0

    def order(self) -> List[int]:
        """This rank's sample order for the current epoch (all of it, also when resumed)."""
        return list(self._saved) if self._saved is not None else list(super().__iter__())

    def resume_from(self, order: Sequence[int], start: int) -> None:
        """Continue the current epoch at position `start` of this rank's saved `order`."""
        self._saved, self._start = [int(i) for i in order], start

    def __iter__(self) -> Iterator[int]:
        return iter(self._saved[self._start:]) if self._saved is not None else super().__iter__()

    def __len__(self) -> int:
        return len(self._saved) - self._start if self._saved is not None else self.num_samples


class ShardSampler(Sampler):
    """Every index exactly once across ranks (rank r takes r, r+W, ...): no padding duplicates."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        self.n, self.num_replicas, self.rank = len(dataset), num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


def check_one_batch(n_images: int, batch_size: int, world: int) -> None:
    """A training set must fill at least one batch on every process (batches drop their remainder)."""
    if n_images < batch_size * world:
        raise UserError(f"the training set has {n_images} images, fewer than one batch "
                        f"({batch_size} x {world} processes); lower --batch_size")


def train_sampler(dataset: Dataset, batch_size: int, seed: int) -> ResumableSampler:
    """This rank's shuffled share of the training set (reshuffled per epoch by `set_epoch`)."""
    world = get_world_size()
    check_one_batch(len(dataset), batch_size, world)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=get_rank(), seed=seed)
    log("Sampler_train = %s" % str(sampler))
    return sampler


def eval_sampler(dataset: Dataset, dist_eval: bool) -> Sampler:
    """Every evaluation image once: in order, or sharded without duplicates across ranks with `dist_eval`."""
    world = get_world_size()
    if dist_eval and world > 1:
        if len(dataset) % world != 0:
            warn(f"the evaluation set ({len(dataset)} images) does not divide evenly over {world} processes; "
                 f"shards differ in size, every image is still counted exactly once")
        return ShardSampler(dataset, world, get_rank())
    if world > 1:
        log("Evaluating on every process without --dist_eval: each one sees the full validation set")
    return SequentialSampler(dataset)
