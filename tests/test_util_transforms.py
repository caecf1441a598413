"""util/transforms.py (and util/compat.py): each stage's transforms, uint8 batches normalised on the device
bit-identically, and RandAugment at its highest magnitude."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment

import engine_pretrain
import util.compat as compat
import util.transforms as transforms
from engine_finetune import evaluate
from util.precision import NativeScalerWithGradNormCount


def test_randaugment_posterize_at_level_10_does_not_crash():
    args = argparse.Namespace(input_size=32, color_jitter=None, aa="rand-m9-mstd0.5-inc1", reprob=0.25,
                              remode="pixel", recount=1)
    transforms.build_transform(True, args)  # RandAugment with the posterize ops of util/compat.py
    img = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = np.asarray(op(img))
    assert out.shape == (32, 32, 3) and out.max() == 0  # 0 bits kept: black, as older Pillow gave
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)
    assert np.asarray(op(img)).max() == 192  # 2 bits kept: 200 -> 0b11000000


def test_eval_transform_sizes():
    img = Image.fromarray(np.zeros((50, 80, 3), dtype=np.uint8))
    assert transforms.eval_transform(32)(img).shape == (3, 32, 32)
    # 224/256 crop ratio: the short side is resized to int(32 / 0.875) = 36 before the crop
    assert transforms.eval_transform(32).transforms[0].size == 36
    assert transforms.eval_transform(256).transforms[0].size == 256
    assert transforms.linprobe_transform(False, 224).transforms[0].size == 256
    assert transforms.pretrain_transform(48)(img).shape == (3, 48, 48)


def test_uint8_pretrain_pipeline_is_bit_identical_to_float():
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    torch.manual_seed(5)
    reference = transforms.pretrain_transform(48)(img)  # ToTensor + Normalize in the worker
    torch.manual_seed(5)
    raw = transforms.pretrain_transform(48, normalize=False)(img)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 48, 48)
    batch = transforms.normalize_images(torch.stack([raw, raw]))
    assert batch.dtype == torch.float32
    assert torch.equal(batch[0], reference) and torch.equal(batch[1], reference)
    assert transforms.normalize_images(reference) is reference  # float batches pass through


def test_pretrain_engine_normalises_uint8_batches():

    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x, mask_ratio=0.75):
            seen.append(x)
            return self.w * x.mean(), None, None

    raw = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    args = argparse.Namespace(accum_iter=1, mask_ratio=0.75, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1,
                              amp="none", print_freq=100)
    model = Spy()
    engine_pretrain.train_one_epoch(model, [(raw, torch.zeros(2))], torch.optim.SGD(model.parameters(), lr=0.0),
                                    torch.device("cpu"), 0, NativeScalerWithGradNormCount("cpu", enabled=False),
                                    args=args)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (raw.float() / 255 - mean) / std)


@pytest.mark.parametrize("make", [lambda n: transforms.eval_transform(32, normalize=n),
                                  lambda n: transforms.linprobe_transform(True, 32, normalize=n),
                                  lambda n: transforms.linprobe_transform(False, 32, normalize=n)])
def test_uint8_classification_transforms_are_bit_identical_to_float(make):
    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    torch.manual_seed(2)
    reference = make(True)(img)
    torch.manual_seed(2)
    raw = make(False)(img)
    assert raw.dtype == torch.uint8
    assert torch.equal(transforms.normalize_images(raw[None])[0], reference)


def test_evaluate_gives_the_same_numbers_for_uint8_and_float_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6))
    raw = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    target = torch.tensor([0, 1, 2, 3, 4])
    as_uint8 = evaluate([(raw, target)], model, torch.device("cpu"), amp="none")
    as_float = evaluate([(transforms.normalize_images(raw), target)], model, torch.device("cpu"), amp="none")
    assert as_uint8 == as_float
    # and normalisation did happen: raw pixel values give other logits
    assert as_uint8 != evaluate([(raw.float(), target)], model, torch.device("cpu"), amp="none")


def test_posterize_fix_applies_only_where_pillow_rejects_zero_bits(monkeypatch):
    table = dict(auto_augment.NAME_TO_OP)
    monkeypatch.setattr(auto_augment, "NAME_TO_OP", table)
    monkeypatch.setattr(compat, "pillow_rejects_zero_bit_posterize", lambda: False)
    table["Posterize"] = auto_augment.posterize
    assert compat.fix_timm_posterize() is False and table["Posterize"] is auto_augment.posterize
    monkeypatch.setattr(compat, "pillow_rejects_zero_bit_posterize", lambda: True)
    assert compat.fix_timm_posterize() is True and table["Posterize"] is compat._posterize


@pytest.mark.parametrize("aug", transforms.PRETRAIN_AUGS)
def test_pretrain_augmentations(aug):
    img = Image.fromarray(np.random.default_rng(5).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    t = transforms.pretrain_transform(32, normalize=False, aug=aug)
    outs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outs.append(t(img))
    assert outs[0].shape == (3, 32, 32) and outs[0].dtype == torch.uint8
    assert torch.equal(outs[0], outs[1]) == (aug == "none")  # only 'none' is deterministic
    names = [type(step).__name__ for step in t.transforms]
    assert ("ColorJitter" in names) == (aug == "crop_rand_color")
    assert ("RandomResizedCrop" in names) == aug.startswith("crop_rand")
    with pytest.raises(ValueError, match="must be one of"):
        transforms.pretrain_transform(32, aug="mixup")


def _asymmetric_image() -> Image.Image:
    """Bright left half, dark right half: a flip is visible in every crop."""
    arr = np.zeros((48, 48, 3), dtype=np.uint8)
    arr[:, :24] = 255
    return Image.fromarray(arr)


def _flipped(out: torch.Tensor) -> bool:
    half = out.shape[-1] // 2
    return out[..., :half].float().mean() < out[..., half:].float().mean()


@pytest.mark.parametrize("make", [
    lambda p, s: transforms.pretrain_transform(32, normalize=False, hflip=p, scale=s),
    lambda p, s: transforms.linprobe_transform(True, 32, normalize=False, hflip=p, scale=s),
    lambda p, s: transforms.build_transform(True, argparse.Namespace(
        input_size=32, color_jitter=None, aa="", reprob=0.0, remode="pixel", recount=1, hflip=p, crop_scale=s)),
    lambda p, s: transforms.torch_transform(transforms.finetune_recipe(32, aa="", reprob=0.0, hflip=p, scale=s)),
], ids=["pretrain", "linprobe", "finetune", "finetune-recipe"])
def test_hflip_and_crop_scale_reach_every_training_transform(make):
    img = _asymmetric_image()
    torch.manual_seed(0)
    never = make(0.0, (0.7, 1.0))
    assert not any(_flipped(never(img)) for _ in range(40))
    always = make(1.0, (0.7, 1.0))
    assert all(_flipped(always(img)) for _ in range(20))
    half = make(0.5, (0.7, 1.0))
    flips = sum(_flipped(half(img)) for _ in range(200))
    assert 70 <= flips <= 130  # Binomial(200, 0.5): mean 100, sd 7; this is +-4.2 sd
    crops = [step for step in never.transforms if "RandomResizedCrop" in type(step).__name__]
    assert len(crops) == 1 and tuple(crops[0].scale) == (0.7, 1.0)


def test_crop_scale_defaults_are_each_stages_own():
    assert transforms.pretrain_recipe(32).scale == (0.2, 1.0)
    assert transforms.finetune_recipe(32).scale == (0.08, 1.0)
    assert transforms.linprobe_recipe(True, 32).scale == (0.08, 1.0)
    # the reference's pipelines are unchanged by default
    ref = transforms.build_transform(True, argparse.Namespace(
        input_size=32, color_jitter=None, aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1))
    names = [type(step).__name__ for step in ref.transforms]
    assert "RandomHorizontalFlip" in names and tuple(ref.transforms[0].scale) == (0.08, 1.0)


def test_an_unknown_auto_augment_policy_is_a_one_line_error():
    from util.errors import UserError

    args = argparse.Namespace(input_size=32, color_jitter=None, aa="randaug-m9", reprob=0.0, remode="pixel",
                              recount=1)
    with pytest.raises(UserError, match="--aa randaug-m9 is not an augmentation policy timm knows"):
        transforms.build_transform(True, args)
    args.aa = ""  # none at all
    names = [type(step).__name__ for step in transforms.build_transform(True, args).transforms]
    assert "RandAugment" not in names and "RandomResizedCropAndInterpolation" in names
