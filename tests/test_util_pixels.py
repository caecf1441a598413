"""Beyond RGB (util/pixels.py, --in_chans, --mean / --std, compute_stats.py): N-channel .npy and multi-band 16-bit
TIFF folders pre-train, reconstruct and fine-tune; 1-channel images stay 1 channel; values keep their precision;
RGB checkpoints fine-tune into N-channel models; N-channel exports load in timm and Hugging Face."""
import argparse
import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import compute_stats
import export
import main_finetune
import main_knn
import main_linprobe
import main_pretrain
import models_mae
from helpers import ROOT, TINY_CLS, TINY_PRETRAIN, load, read_log, run_entry
from util import formats
from util.checkpoint import adapt_input_channels
from util.datasets import ImageFolder
from util.pixels import ChannelError, load_pixels
from util.recipes import eval_recipe, finetune_recipe, pretrain_recipe
from util.resume import save_model
from util.transforms import torch_transform
from util.visualize import draw_reconstructions, panel_pixels, reconstruct, shown_channels

tifffile = pytest.importorskip("tifffile")  # requirements-data.txt; CI installs it
COMMON = [*TINY_PRETRAIN, "--batch_size", "2", "--amp", "none"]


def _array_folder(root, make, suffix, classes=2, per_class=3, seed=0):
    """root/{train,val}/class<c>/<i><suffix>, each written by make(path, rng)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            os.makedirs(root / split / f"class{c}", exist_ok=True)
            for i in range(per_class):
                make(root / split / f"class{c}" / f"{i}{suffix}", rng)
    return root


def _npy5(path, rng):
    np.save(path, rng.integers(0, 256, (36, 40, 5), dtype=np.uint8))


def _tiff4(path, rng):  # 16-bit, bands first (planar), as GDAL writes them
    tifffile.imwrite(path, rng.integers(0, 65536, (4, 36, 40), dtype=np.uint16), photometric="minisblack",
                     planarconfig="separate")


def _stats(data, in_chans):
    return compute_stats.main(argparse.Namespace(data_path=str(data), in_chans=in_chans, max_images=0,
                                                 num_workers=0, image_column="image", label_column="label"))


def _flags(stats):
    return ["--mean", *map(str, stats["mean"]), "--std", *map(str, stats["std"])]


# ----------------------------------------------------------------------------
# reading

def test_values_are_scaled_by_their_type_and_never_clipped(tmp_path):
    u16 = np.array([[[0, 65535, 1000]]], dtype=np.uint16)  # 1 x 1 x 3
    np.save(tmp_path / "a.npy", u16)
    assert load_pixels(tmp_path / "a.npy", 3).flatten().tolist() == pytest.approx([0, 1, 1000 / 65535])
    floats = np.array([[[-2.5, 0.25, 7.0]]], dtype=np.float32)  # outside [0, 1]: kept as they are
    np.save(tmp_path / "f.npy", floats)
    assert load_pixels(tmp_path / "f.npy", 3).flatten().tolist() == [-2.5, 0.25, 7.0]
    np.save(tmp_path / "s.npy", np.array([[-32767, 32767]], dtype=np.int16))  # H x W: one channel
    assert load_pixels(tmp_path / "s.npy", 1).flatten().tolist() == [-1.0, 1.0]
    grey = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)  # a 16-bit PNG, at full precision
    Image.fromarray(grey).save(tmp_path / "g.png")
    got = load_pixels(tmp_path / "g.png", 1)
    assert got.shape == (1, 2, 2) and torch.equal(got[0], torch.from_numpy(grey / 65535).float())
    assert torch.equal(load_pixels(tmp_path / "g.png", 3), got.expand(3, -1, -1))  # grey to RGB as the RGB path
    with pytest.raises(ChannelError, match=r"a.npy has 3 channel\(s\).*--in_chans is 5"):
        load_pixels(tmp_path / "a.npy", 5)


def test_tiff_bands_first_or_last_read_the_same(tmp_path):
    bands = np.random.default_rng(0).integers(0, 65536, (4, 6, 5), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", bands, photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(tmp_path / "contig.tif", bands.transpose(1, 2, 0), photometric="minisblack",
                     planarconfig="contig")
    expected = torch.from_numpy(bands / 65535).float()
    assert torch.equal(load_pixels(tmp_path / "planar.tif", 4), expected)
    assert torch.equal(load_pixels(tmp_path / "contig.tif", 4), expected)


def test_compute_stats_equals_numpy_on_the_same_files(tmp_path):
    data = _array_folder(tmp_path / "d", _tiff4, ".tif")
    stats = _stats(data, 4)
    values = np.concatenate([tifffile.imread(p).reshape(4, -1) / 65535.0 for p, _ in
                             ImageFolder(str(data / "train"), in_chans=4).samples], axis=1)
    # the loader's values are float32 (each within 2^-24 of the file's): the statistics agree to about that
    np.testing.assert_allclose(stats["mean"], values.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], values.std(axis=1), rtol=1e-6)
    assert stats["images"] == 6 and stats["pixels"] == 6 * 36 * 40

    def png(path, rng):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path)

    rgb = _array_folder(tmp_path / "rgb", png, ".png")  # the 8-bit RGB path: divided by 255
    values = np.concatenate([np.asarray(Image.open(p)).reshape(-1, 3).T / 255.0 for p, _ in
                             ImageFolder(str(rgb / "train")).samples], axis=1)
    np.testing.assert_allclose(_stats(rgb, 3)["mean"], values.mean(axis=1), rtol=1e-12)


def test_rgb_images_are_read_as_before_and_a_npy_file_switches_the_folder(tmp_path):
    from torchvision.datasets.folder import default_loader

    def png(path, rng):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path)

    data = _array_folder(tmp_path / "rgb", png, ".png")
    dataset = ImageFolder(str(data / "train"))
    image, _ = dataset.load(0)  # the reference's loader: an 8-bit RGB PIL image, the same pixels
    assert not dataset.float_pixels and isinstance(image, Image.Image)
    assert np.array_equal(np.asarray(image), np.asarray(default_loader(dataset.samples[0][0])))
    assert not eval_recipe(32).for_dataset(dataset).float_pixels
    np.save(data / "train" / "class0" / "z.npy", np.zeros((10, 12, 3), np.float32))
    mixed = ImageFolder(str(data / "train"))
    assert mixed.float_pixels and torch.equal(mixed.load(0)[0], torch.from_numpy(
        np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255))  # the same values, as floats


def test_damaged_or_channels_first_arrays_are_named(tmp_path):
    d = tmp_path / "d" / "class0"
    d.mkdir(parents=True)
    np.save(d / "a.npy", np.ones((6, 5, 2), np.float32))
    (d / "b_empty.npy").write_bytes(b"")
    dataset = ImageFolder(str(tmp_path / "d"), in_chans=2)
    assert torch.equal(dataset.load(1)[0], dataset.load(0)[0]) and dataset.skipped == 1  # skipped, not a crash
    np.save(d / "c.npy", np.ones((2, 6, 5), np.float32))  # torch's C x H x W, saved as it is
    with pytest.raises(ChannelError, match="shape 2 x 6 x 5, channels first"):
        load_pixels(d / "c.npy", 2)


def test_fine_tuning_augments_three_channel_arrays_with_its_colour_jitter():
    recipe = finetune_recipe(32, aa="none", color_jitter=0.4, reprob=0.25).normalized((0.5,) * 3, (0.2,) * 3)
    out = torch_transform(replace(recipe, float_pixels=True))(torch.rand(3, 40, 36))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


# ----------------------------------------------------------------------------
# training

@pytest.mark.e2e
@pytest.mark.parametrize("make,suffix,chans", [(_npy5, ".npy", 5), (_tiff4, ".tif", 4)], ids=["npy5", "tiff16x4"])
def test_a_multichannel_folder_pretrains_reconstructs_and_finetunes(make, suffix, chans, tmp_path):
    data = _array_folder(tmp_path / "data", make, suffix)
    stats = _flags(_stats(data, chans))
    pre = tmp_path / "pre"
    run_entry(main_pretrain, *COMMON, "--epochs", "1", "--data_path", data, "--in_chans", chans, *stats,
              "--output_dir", pre, "--log_dir", pre, "--vis_freq", "1")
    ckpt = load(pre / "checkpoint-0.pth")
    assert ckpt["model"]["patch_embed.proj.weight"].shape == (192, chans, 16, 16)
    assert ckpt["model"]["decoder_pred.weight"].shape[0] == 16 * 16 * chans
    assert ckpt["args"]["in_chans"] == chans and len(ckpt["args"]["mean"]) == chans
    assert any(name.startswith("events") for name in os.listdir(pre))  # the pictures went to TensorBoard
    # the reconstruction figure: channels 0, 1, 2 as a composite, or every channel in grey
    model = models_mae.create_model("mae_vit_tiny_patch16", img_size=32, in_chans=chans)
    model.load_state_dict(ckpt["model"])
    dataset = ImageFolder(str(data / "train"), in_chans=chans)
    images = main_pretrain.fixed_images(dataset, 32, n=2, mean=ckpt["args"]["mean"], std=ckpt["args"]["std"])
    panels = reconstruct(model, images, 0.75, seed=0)
    assert panels.shape == (2, 4, chans, 32, 32)
    grey, _ = panel_pixels(panels, ckpt["args"]["mean"], ckpt["args"]["std"], "grey")
    assert grey.shape == (2 * chans, 4, 32, 32, 3)
    figure = draw_reconstructions(panels, 0.75, mean=ckpt["args"]["mean"], std=ckpt["args"]["std"])
    assert len(figure.cells) == 2
    # and the visualizer draws an image file with the checkpoint's channels and statistics
    sys.path.insert(0, os.path.join(ROOT, "demo"))
    import mae_visualize
    image = dataset.samples[0][0]
    proc = run_entry(mae_visualize, "--checkpoint", pre / "checkpoint-0.pth", "--output_dir", tmp_path / "vis",
                     "--channels", "grey", image)
    assert "_mae.png" in proc.stdout
    assert np.asarray(Image.open(next((tmp_path / "vis").iterdir()))).shape[0] > 3 * figure.pixels.shape[0] / 2
    ft = tmp_path / "ft"
    run_entry(main_finetune, *TINY_CLS, "--epochs", "1", "--data_path", data, "--in_chans", chans, *stats,
              "--nb_classes", "2", "--aa", "none", "--finetune", pre / "checkpoint-0.pth", "--output_dir", ft,
              "--log_dir", "")
    assert read_log(ft)[0]["train_loss"] > 0
    # linear probing and k-NN read the same data
    run_entry(main_linprobe, *TINY_CLS, "--epochs", "1", "--data_path", data, "--in_chans", chans, *stats,
              "--nb_classes", "2", "--finetune", pre / "checkpoint-0.pth", "--output_dir", "", "--log_dir", "")
    knn = run_entry(main_knn, "--model", "vit_tiny_patch16", "--input_size", "32", "--num_workers", "0", "--device",
                    "cpu", "--data_path", data, "--in_chans", chans, *stats, "--finetune", pre / "checkpoint-0.pth",
                    "--nb_knn", "1", "--output_dir", "")
    assert "1-NN classifier result" in knn.stdout


@pytest.mark.e2e
def test_a_one_channel_folder_trains_as_one_channel(tmp_path):
    def grey16(path, rng):
        Image.fromarray(rng.integers(0, 65536, (36, 40), dtype=np.uint16)).save(path)

    data = _array_folder(tmp_path / "data", grey16, ".png")
    stats = _stats(data, 1)
    dataset = ImageFolder(str(data / "train"), in_chans=1)
    dataset.transform = torch_transform(pretrain_recipe(32).normalized(stats["mean"], stats["std"])
                                        .for_dataset(dataset))
    assert dataset[0][0].shape == (1, 32, 32) and dataset[0][0].dtype == torch.float32
    out = tmp_path / "out"
    run_entry(main_pretrain, *COMMON, "--epochs", "1", "--data_path", data, "--in_chans", "1", *_flags(stats),
              "--output_dir", out, "--log_dir", "")
    assert load(out / "checkpoint-0.pth")["model"]["patch_embed.proj.weight"].shape == (192, 1, 16, 16)


# ----------------------------------------------------------------------------
# RGB checkpoints into N-channel models, exports

def test_adapted_filters_keep_their_sum_over_the_input_channels():
    rgb = torch.randn(8, 3, 4, 4)
    for n in (1, 2, 4, 5, 6):
        adapted = adapt_input_channels(rgb, n)
        assert adapted.shape == (8, n, 4, 4)
        torch.testing.assert_close(adapted.sum(dim=1), rgb.sum(dim=1))
    assert torch.equal(adapt_input_channels(rgb, 4)[:, 3], rgb[:, 0] / 2)  # R split over channels 0 and 3
    assert torch.equal(adapt_input_channels(rgb, 4)[:, 1], rgb[:, 1])
    torch.testing.assert_close(adapt_input_channels(rgb, 6), timm.models.adapt_input_conv(6, rgb))
    torch.testing.assert_close(adapt_input_channels(rgb, 1), timm.models.adapt_input_conv(1, rgb))
    assert adapt_input_channels(rgb, 3) is rgb  # the same channels: unchanged


@pytest.mark.e2e
def test_an_rgb_checkpoint_finetunes_into_a_four_channel_model(pretrained, tmp_path):
    data = _array_folder(tmp_path / "data", _tiff4, ".tif")
    out = tmp_path / "ft"
    proc = run_entry(main_finetune, *TINY_CLS, "--epochs", "1", "--data_path", data, "--in_chans", "4",
                     *_flags(_stats(data, 4)), "--nb_classes", "2", "--aa", "none", "--finetune", pretrained,
                     "--output_dir", out, "--log_dir", "")
    assert "Adapted patch_embed.proj.weight from 3 to 4 input channels" in proc.stdout
    assert load(out / "checkpoint-0.pth")["model"]["patch_embed.proj.weight"].shape == (192, 4, 16, 16)


def test_an_n_channel_export_loads_in_timm_and_hugging_face(tmp_path):
    torch.manual_seed(0)
    model = models_mae.create_model("mae_vit_tiny_patch16", img_size=32, in_chans=4).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(torch.randn_like(tensor) * 0.05)
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]
    save_model(argparse.Namespace(output_dir=str(tmp_path), model="mae_vit_tiny_patch16", input_size=32,
                                  in_chans=4, mean=mean, std=std, mask_ratio=0.75), 0, model, model,
               torch.optim.AdamW(model.parameters()), None)
    assert run_entry(export, "--checkpoint", tmp_path / "checkpoint-0.pth", "--format", "timm", "--output_dir",
                     tmp_path / "timm").returncode == 0
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert list(theirs.pretrained_cfg["mean"]) == mean and theirs.pretrained_cfg["input_size"][0] == 4
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        ours = model.forward_encoder(x, 0.0, noise=torch.arange(4.0).expand(2, 4))[0]
        torch.testing.assert_close(theirs.forward_features(x), ours, rtol=1e-5, atol=1e-5)
    transformers = pytest.importorskip("transformers")
    assert run_entry(export, "--checkpoint", tmp_path / "checkpoint-0.pth", "--format", "hf", "--output_dir",
                     tmp_path / "hf").returncode == 0
    hf = transformers.ViTMAEModel.from_pretrained(str(tmp_path / "hf"), mask_ratio=0.0).eval()
    assert hf.config.num_channels == 4
    back = formats.read_weights(str(tmp_path / "hf"), "hf")
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        hidden = hf(pixel_values=x, noise=torch.arange(4.0).expand(2, 4)).last_hidden_state
        torch.testing.assert_close(hidden, ours, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# what is refused

@pytest.mark.e2e
def test_what_n_channels_cannot_do_is_one_line(tmp_path):
    data = _array_folder(tmp_path / "data", _npy5, ".npy", per_class=2)
    base = [*COMMON, "--epochs", "1", "--data_path", data, "--output_dir", "", "--log_dir", ""]
    flags = _flags(_stats(data, 5))
    cases = [
        (base + ["--in_chans", "5"], "needs the data's --mean and --std"),
        (base + ["--in_chans", "5", "--mean", "0.5", "--std", "0.2"], "--mean has 1 number(s), --in_chans is 5"),
        (base + ["--in_chans", "4", "--mean", *["0.5"] * 4, "--std", *["0.2"] * 4], "has 5 channel(s)"),
        (base + ["--in_chans", "5", *flags, "--data_loader", "dali"], "use --data_loader torch"),
        (base + ["--in_chans", "5", *flags, "--pretrain_aug", "crop_rand_color"], "colour jitter needs RGB"),
        (base + ["--in_chans", "5", *flags, "--vis_channels", "1,2,7", "--log_dir", tmp_path / "tb"],
         "--vis_channels 1,2,7: give three channel numbers from 0 to 4"),
    ]
    for argv, message in cases:
        proc = run_entry(main_pretrain, *argv, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (argv, proc.stderr)
        assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1
    proc = run_entry(main_finetune, *TINY_CLS, "--epochs", "1", "--data_path", data, "--in_chans", "5", *flags,
                     "--nb_classes", "2", "--output_dir", "", "--log_dir", "", check=False)
    assert proc.returncode == 2 and "RandAugment runs on 8-bit RGB images" in proc.stderr and "--aa none" in proc.stderr
    assert shown_channels("", 1) == "grey" and shown_channels("", 3) == (0, 1, 2) and shown_channels("3,2,1", 5) == (3, 2, 1)
