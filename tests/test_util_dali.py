"""util/dali.py on DALI's CPU backend: the same files, labels, shards and order as the torch loaders, the
crop statistics of torchvision's RandomResizedCrop, eval_transform's output, the torch loader's pixels
(16-bit images, EXIF orientation), bad files, and tiny runs of the three entry points with
--data_loader dali (the one-line error without DALI: test_main_pretrain.py)."""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import SequentialSampler
from torchvision import transforms

import main_finetune
import main_linprobe
import main_pretrain
import util.dali as dali
from helpers import TINY_CLS, TINY_PRETRAIN, load, read_log, run_entry
from util.datasets import ImageFolder, ResumableSampler, ShardSampler, load_image, train_loader
from util.errors import DataError, UserError
from util.recipes import Recipe, finetune_recipe
from util.transforms import eval_transform

# CI sets REQUIRE_DALI=1 and installs requirements-dali.txt: there a missing DALI fails instead of skipping
pytestmark = pytest.mark.skipif(not dali.dali_available() and not os.environ.get("REQUIRE_DALI"),
                                reason="NVIDIA DALI is not installed (pip install -r requirements-dali.txt)")
CPU = torch.device("cpu")
DALI = ["--data_loader", "dali", "--num_workers", "1"]


def _smooth_folder(root, sizes=((80, 60), (60, 90), (70, 70)), classes=2, seed=0):
    """root/train/<class>/<i>.png: smooth images (bicubic-upsampled 6x6 noise), so that resize kernels
    differ by little and a crop's position matters."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = os.path.join(root, "train", f"class{c}")
        os.makedirs(d, exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
            coarse.resize((w, h), Image.BICUBIC).save(os.path.join(d, f"{i}.png"))
    return os.path.join(root, "train")


def _batches(loader):
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


# ----------------------------------------------------------------------------
# files, labels, shards, order

def test_files_labels_and_order_are_the_torch_loaders(cls_data):
    dataset = ImageFolder(os.path.join(cls_data, "train"))
    torch_loader = train_loader(dataset, 4, 0, False, seed=3)
    loader = dali.dali_train_loader(dataset, dali.pretrain_aug(32), 4, 1, 3, CPU)
    for epoch in (0, 1):
        torch_loader.sampler.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        order = list(torch_loader.sampler)
        files, labels = loader.files()
        assert files == [dataset.samples[i][0] for i in order]
        # the label of every file is torchvision's ImageFolder index of its (sorted) class folder
        assert labels == [dataset.class_to_idx[os.path.basename(os.path.dirname(f))] for f in files]
        assert dataset.class_to_idx == {"class0": 0, "class1": 1, "class2": 2}
        _, got = _batches(loader)
        assert got.tolist() == labels and len(loader) == 3


def test_a_relative_data_path_works(monkeypatch, cls_data):
    # DALI resolves a file list's entries relative to the list's (temporary) folder: the list holds absolute paths
    monkeypatch.chdir(os.path.dirname(cls_data))
    dataset = ImageFolder(os.path.join(os.path.basename(cls_data), "train"))
    assert not os.path.isabs(dataset.samples[0][0])
    loader = dali.dali_train_loader(dataset, dali.pretrain_aug(32), 4, 1, 0, CPU)
    loader.sampler.set_epoch(0)
    images, labels = _batches(loader)
    assert len(images) == 12 and labels.tolist() == loader.files()[1]


def test_rebuilt_pipelines_keep_the_first_builds_executor(tmp_path):
    # Pipeline.deserialize alone gives DALI's synchronous executor
    Image.new("RGB", (48, 48), (1, 2, 3)).save(tmp_path / "a.png")
    factory = dali.PipelineFactory(dali.pretrain_aug(32), 2, 1, None)
    flags = ("exec_pipelined", "exec_async", "exec_dynamic")
    first, again = (factory.build([str(tmp_path / "a.png")] * 2, [0, 0], seed=s) for s in (0, 1))
    assert first.exec_pipelined and first.exec_async
    assert {k: getattr(again, k) for k in flags} == {k: getattr(first, k) for k in flags}


def test_training_shards_are_disjoint_and_cover_the_set(cls_data):
    dataset = ImageFolder(os.path.join(cls_data, "train"))
    shards = []
    for rank in (0, 1):
        sampler = ResumableSampler(dataset, num_replicas=2, rank=rank, seed=0)
        sampler.set_epoch(5)
        shards.append(dali.DaliLoader(dataset, sampler, dali.pretrain_aug(32), 2, 1, CPU, 0, True).files()[0])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(p for p, _ in dataset.samples)


def test_validation_counts_every_image_once_also_sharded(cls_data):
    dataset = ImageFolder(os.path.join(cls_data, "val"))  # 7 images
    seen = []
    for rank in (0, 1):
        loader = dali.DaliLoader(dataset, ShardSampler(dataset, 2, rank), dali.eval_aug(32), 3, 1, CPU, 0, False)
        images, labels = _batches(loader)
        assert len(images) == len(labels) == len(loader.files()[0]) == (4 if rank == 0 else 3)
        seen += loader.files()[0]
    assert sorted(seen) == sorted(p for p, _ in dataset.samples)


def test_same_seed_and_epoch_same_batches_another_epoch_differs(cls_data):
    dataset = ImageFolder(os.path.join(cls_data, "train"))

    def epoch(e, seed=0):
        loader = dali.dali_train_loader(dataset, dali.pretrain_aug(32), 4, 2, seed, CPU)
        loader.sampler.set_epoch(e)
        return loader.files()[0], _batches(loader)[0]

    files0, images0 = epoch(0)
    files0b, images0b = epoch(0)
    files1, images1 = epoch(1)
    assert files0 == files0b and torch.equal(images0, images0b)  # bitwise on the CPU backend
    assert files1 != files0 and not torch.equal(images1, images0)


# ----------------------------------------------------------------------------
# what the pipelines compute

def _ramp_png(path, w=256, h=192):
    """R = x, G = y: the crop window can be read back from the output's values."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)).save(path)


def test_crop_area_and_aspect_match_torchvision_random_resized_crop(tmp_path):
    _ramp_png(tmp_path / "ramp.png")
    n, size = 400, 64
    factory = dali.PipelineFactory(dali.pretrain_aug(size), 100, 2, None)
    pipe = factory.build([str(tmp_path / "ramp.png")] * n, [0] * n, seed=1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = []
    for _ in range(n // 100):
        images = torch.from_numpy(np.array(pipe.run()[0].as_tensor()))
        out.append(((images * std + mean) * 255).double())  # back to 0-255 values
    pixels = torch.cat(out)
    # bicubic reproduces a linear ramp away from the borders: the output's slope is crop size / output size
    rx = pixels[:, 0].mean(1)  # [N, W] (R over the columns)
    gy = pixels[:, 1].mean(2)  # [N, H] (G over the rows)
    w = (rx[:, 48] - rx[:, 16]).abs() / 32 * size
    h = (gy[:, 48] - gy[:, 16]).abs() / 32 * size
    flipped = (rx[:, 48] < rx[:, 16]).double().mean()
    area, log_aspect = (w * h / (256 * 192)).numpy(), torch.log(w / h).numpy()

    crop = transforms.RandomResizedCrop(size, scale=(0.2, 1.0))
    img = Image.new("RGB", (256, 192))
    torch.manual_seed(0)
    ref = np.array([crop.get_params(img, crop.scale, crop.ratio)[2:] for _ in range(4000)], dtype=np.float64)
    ref_area, ref_log_aspect = ref[:, 0] * ref[:, 1] / (256 * 192), np.log(ref[:, 1] / ref[:, 0])

    def ks(a, b):
        grid = np.sort(np.concatenate([a, b]))
        return np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                      - np.searchsorted(np.sort(b), grid, "right") / len(b)).max()

    # two-sample Kolmogorov-Smirnov at alpha = 0.001 for 400 vs 4000 draws: 1.95 * sqrt((n + m) / (n m)) = 0.102;
    # the read-back (uint8 values over 32 output pixels) adds under 1% to a window's size
    bound = 1.95 * np.sqrt((400 + 4000) / (400 * 4000))
    assert ks(area, ref_area) < bound
    assert ks(log_aspect, ref_log_aspect) < bound
    # the flip is a fair coin: 4.4 standard deviations of a mean of 400 coin flips is 0.11
    assert abs(float(flipped) - 0.5) < 0.11


def test_validation_output_matches_eval_transform(tmp_path):
    root = _smooth_folder(tmp_path / "smooth")
    dataset = ImageFolder(root)
    loader = dali.DaliLoader(dataset, SequentialSampler(dataset), dali.eval_aug(32), 4, 1, CPU, 0, False)
    images, labels = _batches(loader)
    assert labels.tolist() == [t for _, t in dataset.samples]
    reference = torch.stack([eval_transform(32)(Image.open(p).convert("RGB")) for p, _ in dataset.samples])
    # the tolerance is what two correct antialiased bicubic resizes differ by: PIL's (eval_transform) against
    # torch's tensor resize of the same images, with the same centre crop
    other = torch.stack([transforms.Compose([
        transforms.PILToTensor(), transforms.ConvertImageDtype(torch.float32),
        transforms.Resize(36, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(32), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])(Image.open(p).convert("RGB")) for p, _ in dataset.samples])
    kernels = (other - reference).abs().mean().item()
    assert 0 < kernels < 0.05
    assert (images - reference).abs().mean().item() < 2 * kernels
    assert (images - reference).abs().max().item() < 0.5  # about 29 levels of 255: no shifted crop


def test_random_erasing_rectangle_and_noise(tmp_path):
    # uniform grey images, no RandAugment, erasing always: the noise pixels form one rectangle of 2-33% of the
    # image with values N(0, 1) (the grey is a constant after normalisation)
    Image.new("RGB", (48, 48), (124, 116, 104)).save(tmp_path / "grey.png")
    aug = Recipe("finetune", 32, True, scale=(1.0, 1.0), ratio=(1.0, 1.0), reprob=1.0)
    pipe = dali.PipelineFactory(aug, 64, 1, None).build([str(tmp_path / "grey.png")] * 64, [0] * 64, seed=0)
    images = torch.from_numpy(np.array(pipe.run()[0].as_tensor()))
    grey = images[:, :, 0, 0].median(0).values.view(1, 3, 1, 1)
    erased = (images - grey).abs().amax(1) > 1e-3  # [N, H, W]
    frac = erased.double().mean((1, 2))
    assert (frac > 0.01).all() and (frac < 0.36).all()
    rows, cols = erased.any(2), erased.any(1)
    assert torch.equal(erased.sum((1, 2)), rows.sum(1) * cols.sum(1))  # a rectangle
    noise = (images - grey)[erased.unsqueeze(1).expand_as(images)]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05


def test_rand_augment_strings():
    assert dali.parse_rand_augment("rand-m9-mstd0.5-inc1") == (2, 9, 0.5)
    assert dali.parse_rand_augment("rand-n3-m7-inc1") == (3, 7, 0.0)
    for bad in ("v0", "rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1-p0.3", "augmix-m5"):
        with pytest.raises(UserError, match="--data_loader torch"):
            dali.parse_rand_augment(bad)
    with pytest.raises(UserError, match="--remode rand"):
        dali.dali_plan(finetune_recipe(32, "rand-m9-mstd0.5-inc1", None, 0.25, "rand", 1))
    with pytest.raises(UserError, match="crop_rand_color"):
        dali.pretrain_aug(32, "crop_rand_color")


def test_substitutes_follow_image_folder_load():
    assert dali.substitutes(5, [1, 2]).tolist() == [0, 3, 3, 3, 4]
    assert dali.substitutes(4, [3]).tolist() == [0, 1, 2, 0]


# ----------------------------------------------------------------------------
# the torch loader's images: 16-bit values, EXIF orientation

RAMP16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once


def _png16(path, values):
    """A 16-bit PNG of uint16 `values` ([H, W, 2] grey + alpha, [H, W, 3] RGB, [H, W, 4] RGBA), written from the
    PNG specification (PIL writes 16-bit grey only)."""
    values = np.asarray(values, dtype=">u2")  # samples big-endian
    h, w, c = values.shape
    rows = b"".join(b"\x00" + row.tobytes() for row in values)  # filter type 0 on every row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                + chunk(b"IEND", b""))


def _tiff16(path, values):
    """An uncompressed little-endian 16-bit RGB(A) TIFF of uint16 `values` [H, W, 3 or 4] (PIL writes 16-bit grey
    only): header, pixels, BitsPerSample values, then the directory."""
    values = np.asarray(values, dtype="<u2")
    h, w, c = values.shape
    pixels, bits = values.tobytes(), struct.pack(f"<{c}H", *[16] * c)
    bits_at = 8 + len(pixels)
    tags = [(256, 1, w), (257, 1, h), (258, c, bits_at), (259, 1, 1), (262, 1, 2), (273, 1, 8), (277, 1, c),
            (278, 1, h), (279, 1, len(pixels)), (284, 1, 1)] + ([(338, 1, 2)] if c == 4 else [])  # 338: alpha
    longs = (273, 279)  # strip offset and size: LONG values; the rest SHORT, BitsPerSample's by offset
    directory = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, 4 if tag in longs else 3, n)
        + (struct.pack("<I", value) if tag in longs or n > 1 else struct.pack("<HH", value, 0))
        for tag, n, value in tags) + struct.pack("<I", 0)
    with open(path, "wb") as f:
        f.write(b"II*\x00" + struct.pack("<I", bits_at + len(bits)) + pixels + bits + directory)


def _dali_decode(paths):
    """Each file through DALI's CPU decoder as define_pipeline calls it: [H, W, 3] uint8 arrays."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
    def pipeline():
        encoded, _ = fn.readers.file(files=[str(p) for p in paths])
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)

    pipe = pipeline()
    pipe.build()
    (out,) = pipe.run()
    return [np.array(out[i]) for i in range(len(paths))]


def test_16bit_grey_images_decode_bit_for_bit_as_the_torch_loader_opens_them(tmp_path):
    paths = [tmp_path / "grey.png", tmp_path / "grey.tif", tmp_path / "grey_lzw.tif"]
    for path in paths:
        Image.fromarray(RAMP16).save(path, **({"compression": "tiff_lzw"} if "lzw" in path.name else {}))
    # DALI's scale, derived from the ramp: round(v / 257) (never a tie), not v >> 8, on every 16-bit value
    expected = np.repeat(np.round(RAMP16 / 257).astype(np.uint8)[..., None], 3, -1)
    assert (expected[..., 0] != RAMP16 >> 8).mean() > 0.2
    for path, got in zip(paths, _dali_decode(paths)):
        np.testing.assert_array_equal(got, expected, err_msg=path.name)
        np.testing.assert_array_equal(np.asarray(load_image(str(path))), expected, err_msg=path.name)

    # and through both validation pipelines: uniform images, which every resize keeps
    d = tmp_path / "uniform" / "class0"
    d.mkdir(parents=True)
    for name, value in (("mid.png", 32768), ("dark.tif", 100 * 257 + 200)):  # 128, and 101 (not 100 = v >> 8)
        Image.fromarray(np.full((40, 48), value, dtype=np.uint16)).save(d / name)
    dataset = ImageFolder(str(tmp_path / "uniform"))
    loader = dali.DaliLoader(dataset, SequentialSampler(dataset), dali.eval_aug(32), 2, 1, CPU, 0, False)
    images, _ = _batches(loader)
    reference = torch.stack([eval_transform(32)(dataset.load(i)[0]) for i in range(2)])
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(images, reference, rtol=0, atol=1e-5)
    grey = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) + reference * std  # back to [0, 1]
    assert torch.allclose(grey * 255, torch.tensor([101.0, 128.0]).view(2, 1, 1, 1), atol=1e-3)


def test_16bit_colour_images_are_at_most_one_level_apart(tmp_path):
    # PIL opens 16-bit colour PNGs and TIFFs as 8 bits itself, keeping the high byte (v >> 8); DALI rounds
    rgb = np.stack([RAMP16, 65535 - RAMP16, np.roll(RAMP16, 12345)], -1)  # [H, W, 3]
    alpha = np.full((256, 256, 1), 40000, dtype=np.uint16)
    grey_alpha = np.concatenate([RAMP16[..., None], alpha], -1)
    cases = [("rgb.png", _png16, rgb, rgb), ("rgba.png", _png16, np.concatenate([rgb, alpha], -1), rgb),
             ("la.png", _png16, grey_alpha, np.repeat(RAMP16[..., None], 3, -1)), ("rgb.tif", _tiff16, rgb, rgb)]
    for name, write, values, _ in cases:
        write(tmp_path / name, values)
    decoded = _dali_decode([tmp_path / name for name, *_ in cases])
    for (name, _, _, colour), got in zip(cases, decoded):
        np.testing.assert_array_equal(got, np.round(colour / 257).astype(np.uint8), err_msg=name)  # alpha dropped
        diff = got.astype(int) - np.asarray(load_image(str(tmp_path / name))).astype(int)
        assert np.abs(diff).max() == 1, name  # round(v / 257) against v >> 8: -1, 0 or +1


def _exif_rotated_jpeg(path, w=80, h=48):
    """A w x h JPEG, R = 3x and G = 5y, whose EXIF orientation (6) asks viewers to turn it 90 degrees."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.stack([3 * x, 5 * y, np.full_like(x, 128)], -1).astype(np.uint8)).save(path, exif=exif,
                                                                                               quality=95)


def test_exif_orientation_is_ignored_as_by_the_torch_loader(tmp_path):
    (tmp_path / "d" / "class0").mkdir(parents=True)
    path = str(tmp_path / "d" / "class0" / "turned.jpg")
    _exif_rotated_jpeg(path)
    dataset = ImageFolder(str(tmp_path / "d"))
    assert dataset.load(0)[0].size == (80, 48)  # PIL does not turn it
    loader = dali.DaliLoader(dataset, SequentialSampler(dataset), dali.eval_aug(32), 1, 1, CPU, 0, False)
    images, _ = _batches(loader)
    reference = eval_transform(32)(dataset.load(0)[0])[None]
    turned = eval_transform(32)(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))[None]
    # the two resizes (and JPEG decoders) differ by a mean of about 0.004 here; the turned image by 0.66 (40 levels)
    assert (images - reference).abs().mean().item() < 0.05
    assert (turned - reference).abs().mean().item() > 0.5

    # the training pipeline's random-crop decoder: R still rises along the width (flipped or not), not the height
    pipe = dali.PipelineFactory(dali.pretrain_aug(32), 8, 1, None).build([path] * 8, [0] * 8, seed=0)
    red = torch.from_numpy(np.array(pipe.run()[0].as_tensor()))[:, 0]  # [N, H, W]
    along_w, along_h = red.mean(1), red.mean(2)  # [N, W], [N, H]
    assert ((along_w.amax(1) - along_w.amin(1)) > 10 * (along_h.amax(1) - along_h.amin(1))).all()


# ----------------------------------------------------------------------------
# bad files, errors, entry points

def test_corrupt_and_truncated_jpegs_are_skipped_or_stop_under_strict(tmp_path, capsys):
    root = _smooth_folder(tmp_path / "d", sizes=((64, 48),) * 4, classes=1)
    good = os.path.join(root, "class0", "good.jpg")
    Image.open(os.path.join(root, "class0", "0.png")).save(good, quality=90)
    with open(good, "rb") as f:
        data = f.read()
    with open(os.path.join(root, "class0", "cut.jpg"), "wb") as f:
        f.write(data[:len(data) // 2])
    with open(os.path.join(root, "class0", "junk.jpg"), "wb") as f:
        f.write(b"not an image at all")
    dataset = ImageFolder(root)
    loader = dali.dali_train_loader(dataset, dali.pretrain_aug(32), 2, 1, 0, CPU)
    err = capsys.readouterr().err
    assert "skipping unreadable image" in err and "cut.jpg" in err and "junk.jpg" in err
    assert dataset.skipped == 2 and "good.jpg" not in err
    loader.sampler.set_epoch(0)
    files, _ = loader.files()
    assert len(files) == 6 and not any(f.endswith(("cut.jpg", "junk.jpg")) for f in files)
    assert len(_batches(loader)[0]) == 6

    with pytest.raises(DataError, match="cannot read image .*(cut|junk).jpg.*--strict_data"):
        dali.dali_train_loader(ImageFolder(root, strict=True), dali.pretrain_aug(32), 2, 1, 0, CPU)


def test_only_rank_0_warns_about_bad_files(tmp_path, monkeypatch, capsys):
    # after the all-gather every rank knows every bad file: one warning each, from rank 0
    import util.logger
    root = _smooth_folder(tmp_path / "d", sizes=((64, 48),) * 2, classes=1)
    with open(os.path.join(root, "class0", "junk.jpg"), "wb") as f:
        f.write(b"not an image at all")
    for rank, warned in ((1, False), (0, True)):
        monkeypatch.setattr(util.logger, "_rank", lambda: rank)
        dataset = ImageFolder(root)
        assert len(dali.scan_images(dataset, 1)) == 1 and dataset.skipped == 1
        assert ("junk.jpg" in capsys.readouterr().err) == warned


def _undecodable_jpeg(path, like):
    """A JPEG with a bogus Huffman table: it passes the up-front check (header and end marker) but neither
    libjpeg (DALI) nor PIL can decode it."""
    data = open(like, "rb").read()
    dht = data.index(b"\xff\xc4")
    with open(path, "wb") as f:
        f.write(data[:dht + 5] + b"\xff" * 16 + data[dht + 21:])


@pytest.mark.parametrize("name, batch", [("a.jpg", 0), ("z.jpg", 2)])
def test_a_file_dali_cannot_decode_stops_with_one_line_naming_it(tmp_path, name, batch):
    root = tmp_path / "d" / "class0"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem in "bcde":
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / f"{stem}.jpg", quality=90)
    _undecodable_jpeg(root / name, root / "b.jpg")
    dataset = ImageFolder(str(tmp_path / "d"))
    assert dali.scan_images(dataset, 1) == []  # the up-front check lets it through
    loader = dali.DaliLoader(dataset, SequentialSampler(dataset), dali.eval_aug(32), 2, 1, CPU, 0, False)
    assert loader.files()[0].index(str(root / name)) // 2 == batch
    got = []
    with pytest.raises(DataError) as info:  # batch 0 fails in the iterator's constructor, a later one in next()
        for images, _ in loader:
            got.append(images)
    assert len(got) == batch
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"DALI could not decode {root / name} (") and "--data_loader torch" in message


def test_errors_other_than_decoding_pass_through_unchanged(monkeypatch, cls_data):
    import nvidia.dali.plugin.pytorch as dali_torch

    class Failing:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Critical error in pipeline: CUDA out of memory in operator fn.resize")

    monkeypatch.setattr(dali_torch, "DALIGenericIterator", Failing)
    dataset = ImageFolder(os.path.join(cls_data, "val"))
    loader = dali.DaliLoader(dataset, SequentialSampler(dataset), dali.eval_aug(32), 4, 1, CPU, 0, False)
    with pytest.raises(RuntimeError, match="^Critical error in pipeline: CUDA out of memory"):
        next(iter(loader))
    assert dali.is_decode_error(RuntimeError("Error in CPU operator `nvidia.dali.fn.decoders.image`\nencountered"))
    assert not dali.is_decode_error(RuntimeError("Error in MIXED operator `nvidia.dali.fn.decoders.image`: "
                                                 "CUDA out of memory"))


@pytest.mark.e2e
def test_strict_data_stops_the_entry_point(tmp_path, cls_data):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(cls_data, data)
    (data / "train" / "class0" / "bad.png").write_bytes(b"\x89PNG broken")
    proc = run_entry(main_pretrain, *TINY_PRETRAIN, *DALI, "--data_path", data, "--epochs", "1", "--output_dir", "",
                     "--log_dir", "", "--strict_data", check=False)
    assert proc.returncode == 2
    assert "error: cannot read image" in proc.stderr and "bad.png" in proc.stderr


@pytest.mark.e2e
def test_pretraining_resumes_at_the_epoch_boundary_bitwise(tmp_path, cls_data):
    common = [*TINY_PRETRAIN, *DALI, "--data_path", cls_data, "--epochs", "2", "--log_dir", ""]
    run_entry(main_pretrain, *common, "--output_dir", tmp_path / "full")
    run_entry(main_pretrain, *common, "--output_dir", tmp_path / "cut", "--stop_epoch", "1")
    assert not (tmp_path / "cut" / "checkpoint-1.pth").exists()
    run_entry(main_pretrain, *common, "--output_dir", tmp_path / "cut")
    full, cut = load(tmp_path / "full" / "checkpoint-1.pth"), load(tmp_path / "cut" / "checkpoint-1.pth")
    for k, v in full["model"].items():
        assert torch.equal(v, cut["model"][k]), k
    assert read_log(tmp_path / "full") == read_log(tmp_path / "cut")
    assert full["args"]["data_loader"] == "dali"


@pytest.mark.e2e
def test_linprobe_and_finetune_run_with_dali(tmp_path, cls_data, pretrained):
    common = [*TINY_CLS, *DALI, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "1", "--log_dir", "",
              "--finetune", pretrained]
    run_entry(main_linprobe, *common, "--output_dir", tmp_path / "lp")
    run_entry(main_finetune, *common, "--output_dir", tmp_path / "ft", "--mixup", "0.8", "--dist_eval")
    for out in ("lp", "ft"):
        (row,) = read_log(tmp_path / out)
        assert np.isfinite(row["train_loss"]) and 0 <= row["test_acc1"] <= 100
        # 7 validation images: accuracy is a multiple of 1/7
        assert abs(row["test_acc1"] * 7 / 100 - round(row["test_acc1"] * 7 / 100)) < 1e-6


@pytest.mark.e2e
def test_finetune_eval_does_not_build_the_training_augmentation(cls_data, tmp_path):
    # --aa v0 is torch-only: it matters only when training
    common = [*TINY_CLS, *DALI, "--data_path", cls_data, "--nb_classes", "3", "--output_dir", "", "--aa", "v0"]
    classifier = tmp_path / "classifier.pth"
    torch.save({"model": main_finetune.models_vit.vit_tiny_patch16(img_size=32, num_classes=3, global_pool=True).state_dict()},
               classifier)
    proc = run_entry(main_finetune, *common, "--eval", "--resume", classifier)
    assert "Accuracy of the network on the 7 test images" in proc.stdout
    proc = run_entry(main_finetune, *common, "--epochs", "1", check=False)
    assert proc.returncode == 2 and "--aa v0" in proc.stderr


def test_hflip_and_crop_scale_reach_the_dali_pipeline(tmp_path):
    _ramp_png(tmp_path / "ramp.png")
    n, size = 100, 64
    aug = dali.pretrain_aug(size, "crop_rand", hflip=0.0, scale=(0.9, 1.0))
    assert aug.hflip == 0.0 and aug.scale == (0.9, 1.0)
    tuned = finetune_recipe(size, "", None, 0.0, "pixel", 1, hflip=0.0, scale=[0.5, 0.6])
    assert tuned.scale == (0.5, 0.6) and tuned.hflip == 0.0 and dali.dali_plan(tuned) is None
    assert dali.linprobe_aug(True, size, hflip=0.25, scale=(0.3, 0.4)).scale == (0.3, 0.4)
    pipe = dali.PipelineFactory(aug, n, 2, None).build([str(tmp_path / "ramp.png")] * n, [0] * n, seed=1)
    images = torch.from_numpy(np.array(pipe.run()[0].as_tensor()))
    rx = images[:, 0].mean(1)  # [N, W]: the R ramp rises left to right unless flipped
    assert (rx[:, 48] > rx[:, 16]).all()  # never flipped
    w = (rx[:, 48] - rx[:, 16]) * 0.229 * 255 / 32 * size
    assert (w > 0.9 * 256 * 0.75).all()  # crops of 90-100% of the area (aspect 3/4-4/3 bounds the width)
