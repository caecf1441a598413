"""util/loaders.py: one recipe per stage, one batch out of every loader (normalised float32 on the device)."""
import os
import random

import numpy as np
import pytest
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import util.dali as dali
import util.loaders as loaders
from util.datasets import ImageFolder
from util.recipes import eval_recipe, finetune_recipe, linprobe_recipe, pretrain_recipe
from util.transforms import torch_transform

CPU = torch.device("cpu")
RECIPES = {"pretrain": pretrain_recipe(32), "linprobe": linprobe_recipe(True, 32), "eval": eval_recipe(32),
           "finetune": finetune_recipe(32)}


@pytest.mark.parametrize("stage", sorted(RECIPES))
def test_torch_batches_are_the_recipes_images_normalised_on_the_device(image_folder, stage):
    recipe = RECIPES[stage]
    dataset = ImageFolder(os.path.join(image_folder, "train"))
    loader = loaders.train_loader("torch", dataset, recipe, 4, 0, False, 0, CPU)
    loader.sampler.set_epoch(0)
    order = loader.sampler.order()[:4]
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    images, labels = next(iter(loader))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    # the same draws by hand: the recipe's transform in this process, then ToTensor + Normalize's formula
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    torch.empty((), dtype=torch.int64).random_()  # what starting the DataLoader's iterator draws
    transform = torch_transform(recipe)
    by_hand = torch.stack([transform(dataset.load(i)[0]) for i in order])
    if by_hand.dtype == torch.uint8:
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
        by_hand = (by_hand.float() / 255 - mean) / std
    torch.testing.assert_close(images, by_hand, rtol=0, atol=1e-6)
    assert labels.tolist() == [dataset.samples[i][1] for i in order]


def test_a_transform_that_breaks_the_contract_is_an_error(image_folder):
    dataset = ImageFolder(os.path.join(image_folder, "val"))
    loader = loaders.eval_loader("torch", dataset, eval_recipe(32), 4, 0, False, False, CPU)
    dataset.transform = torch_transform(eval_recipe(32), normalize=True)  # floats where the recipe says uint8
    with pytest.raises(TypeError, match="expects torch.uint8"):
        next(iter(loader))


@pytest.mark.skipif(not dali.dali_available() and not os.environ.get("REQUIRE_DALI"),
                    reason="NVIDIA DALI is not installed (pip install -r requirements-dali.txt)")
def test_dali_hands_out_the_same_batch_contract_and_order(image_folder):
    dataset = ImageFolder(os.path.join(image_folder, "val"))
    torch_loader = loaders.eval_loader("torch", dataset, eval_recipe(32), 4, 0, False, False, CPU)
    dali_loader = loaders.eval_loader("dali", dataset, eval_recipe(32), 4, 1, False, False, CPU)
    for (a, la), (b, lb) in zip(torch_loader, dali_loader):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape and torch.equal(la, lb)
        assert (a - b).abs().mean() < 0.1  # the same images (resampling differs by a level or so)

