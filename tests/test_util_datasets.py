"""util/datasets.py: folders, errors, and the training / validation loaders."""
import argparse

import pytest
import torch

import util.datasets as datasets
from util.errors import DataError, UserError


def test_folders_errors_and_classes(image_folder, tmp_path):
    args = argparse.Namespace(data_path=image_folder, input_size=32)
    ds = datasets.build_dataset(False, args)
    assert ds.classes == ["class0", "class1"] and len(ds) == 8
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and y == 1
    with pytest.raises(DataError, match="does not exist"):
        datasets.build_dataset(True, argparse.Namespace(data_path=str(tmp_path / "nope"), input_size=32))


def test_train_loader_shards_shuffles_per_epoch_and_drops_the_last_batch(image_folder):
    ds = datasets.build_dataset(True, argparse.Namespace(data_path=image_folder), transform=lambda img: 0)
    loader = datasets.train_loader(ds, batch_size=3, num_workers=0, pin_mem=False, seed=0)
    assert len(loader) == 2 and loader.drop_last  # 8 images, batches of 3
    loader.sampler.set_epoch(0)
    first = list(loader.sampler)
    loader.sampler.set_epoch(1)
    assert sorted(first) == list(range(8)) and list(loader.sampler) != first
    with pytest.raises(UserError, match="fewer than one batch"):
        datasets.train_loader(ds, batch_size=9, num_workers=0, pin_mem=False, seed=0)


def test_eval_loader_keeps_every_image_in_order(image_folder):
    ds = datasets.build_dataset(False, argparse.Namespace(data_path=image_folder, input_size=32))
    loader = datasets.eval_loader(ds, batch_size=3, num_workers=0, pin_mem=False, dist_eval=True)
    targets = torch.cat([y for _, y in loader])
    assert targets.tolist() == [y for _, y in ds.samples]


def test_shard_sampler_counts_every_index_once():
    ds = list(range(7))
    shards = [list(datasets.ShardSampler(ds, 3, r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(datasets.ShardSampler(ds, 3, r)) for r in range(3)] == [3, 2, 2]
