"""util/sources.py and make_shards.py: WebDataset shards, unlabeled folders and Hugging Face datasets read as the
ImageFolder is, so that the same images in the same order train the same model."""
import io
import json
import os
import signal
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import main_finetune
import main_knn
import main_pretrain
import util.sources as sources
from helpers import TINY_CLS, TINY_PRETRAIN, load, read_log, run_entry
from util.datasets import ImageFolder
from util.samplers import ResumableSampler

COMMON = [*TINY_PRETRAIN, "--batch_size", "2", "--amp", "none", "--log_dir", ""]
KNN = ["--model", "vit_tiny_patch16", "--input_size", "32", "--batch_size", "4", "--num_workers", "0", "--device",
       "cpu", "--amp", "none"]


def _knn_lines(stdout):
    return [line for line in stdout.splitlines() if "-NN classifier result" in line]
# the optional data packages (requirements-data.txt; CI installs them)
pytest.importorskip("webdataset")
pytest.importorskip("wids")


def _same_samples(a, b):
    assert len(a) == len(b) and a.classes == b.classes
    for i in range(len(a)):
        (x, y), (u, v) = a.load(i), b.load(i)
        assert y == v and np.array_equal(np.asarray(x), np.asarray(u)), i


def test_shards_hold_the_folders_samples_and_labels_in_its_order(cls_data, shards):
    with open(os.path.join(shards, "train", "shards.json")) as f:
        index = json.load(f)
    assert [s["nsamples"] for s in index["shardlist"]] == [5, 5, 2]  # 12 images, --maxcount 5
    for split in ("train", "val"):
        dataset = sources.open_split(shards, split)
        assert isinstance(dataset, sources.ShardDataset)
        _same_samples(ImageFolder(os.path.join(cls_data, split)), dataset)


def test_two_ranks_share_an_epoch_of_shards_each_sample_once(shards):
    dataset = sources.open_split(shards, "train")
    orders = []
    for rank in range(2):
        sampler = ResumableSampler(dataset, num_replicas=2, rank=rank, seed=0)
        sampler.set_epoch(3)
        orders.append(list(sampler))
    assert sorted(orders[0] + orders[1]) == list(range(12))


@pytest.mark.e2e
def test_pretraining_from_shards_equals_pretraining_from_the_folder(cls_data, shards, tmp_path):
    args = [*COMMON, "--epochs", "1"]
    run_entry(main_pretrain, *args, "--data_path", cls_data, "--output_dir", tmp_path / "folder")
    run_entry(main_pretrain, *args, "--data_path", shards, "--output_dir", tmp_path / "shards")
    a, b = load(tmp_path / "folder" / "checkpoint-0.pth"), load(tmp_path / "shards" / "checkpoint-0.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert read_log(tmp_path / "folder") == read_log(tmp_path / "shards")


@pytest.mark.e2e
def test_a_stop_signal_mid_epoch_on_shards_resumes_bitwise(shards, tmp_path, monkeypatch):
    args = [*COMMON, "--epochs", "2", "--data_path", shards]
    run_entry(main_pretrain, *args, "--output_dir", tmp_path / "whole")
    real, count = sources.ShardDataset.__getitem__, [0]

    def getitem(self, index):
        count[0] += 1
        if count[0] == 12 + 3 * 2 + 1:  # epoch 1, in step 3 of 6
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, index)

    monkeypatch.setattr(sources.ShardDataset, "__getitem__", getitem)
    out = tmp_path / "out"
    assert run_entry(main_pretrain, *args, "--output_dir", out, check=False).returncode == 128 + signal.SIGTERM
    assert load(out / "checkpoint-last.pth")["position"]["step"] == 4
    monkeypatch.undo()
    assert "Continuing epoch 1 at step 4" in run_entry(main_pretrain, *args, "--output_dir", out).stdout
    a, b = load(tmp_path / "whole" / "checkpoint-last.pth"), load(out / "checkpoint-last.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert read_log(tmp_path / "whole") == read_log(out)


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(value):
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_shards_of_other_tools_are_indexed_once_and_bad_members_skipped(tmp_path):
    folder = tmp_path / "d" / "train"
    folder.mkdir(parents=True)
    _write_shard(folder / "a.tar", [("x/0.png", _png(10)), ("x/0.cls", b"1"), ("x/1.jpg", b"not a jpeg"),
                                    ("x/1.cls", b"0")])
    _write_shard(folder / "b.tar", [("y/2.png", _png(30)), ("y/2.cls", b"2")])
    dataset = sources.open_split(str(tmp_path / "d"), "train")
    assert len(dataset) == 3 and dataset.classes == ["0", "1", "2"]
    assert (folder / "shards.json").exists()
    image, label = dataset.load(1)  # the damaged member: replaced by the next readable sample, said once
    assert label == 2 and np.asarray(image)[0, 0, 0] == 30 and dataset.skipped == 1
    _write_shard(folder / "a.tar", [("x/0.png", _png(10))])  # rewritten without labels: the index is stale
    with pytest.raises(sources.DataError, match="without a .cls label"):
        sources.open_split(str(tmp_path / "d"), "train")


def _dali():
    dali = pytest.importorskip("util.dali")
    if not dali.dali_available() and not os.environ.get("REQUIRE_DALI"):  # CI requires it
        pytest.skip("NVIDIA DALI is not installed (pip install -r requirements-dali.txt)")
    return dali


def test_dali_is_fed_shards_and_hugging_face_rows_as_it_reads_the_folder(cls_data, shards, tmp_path):
    dali = _dali()
    _save_hf(cls_data, tmp_path / "hf")
    recipe = dali.pretrain_aug(32)
    batches = []
    for dataset in (ImageFolder(os.path.join(cls_data, "train")), sources.open_split(shards, "train"),
                    sources.open_split(str(tmp_path / "hf"), "train")):
        loader = dali.dali_train_loader(dataset, recipe, 4, 1, 0, torch.device("cpu"))
        loader.sampler.set_epoch(1)
        batches.append([(x.clone(), y.clone()) for x, y in loader])
    assert len(batches[0]) == 3 and batches[0][0][0].dtype == torch.float32 and batches[0][0][1].dtype == torch.int64
    for other in batches[1:]:  # the same samples, order, labels and random crops, bit for bit
        assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(batches[0], other))


def test_dali_skips_a_damaged_shard_member_as_the_torch_loader_does(tmp_path):
    dali = _dali()
    folder = tmp_path / "d" / "train"
    folder.mkdir(parents=True)
    _write_shard(folder / "a.tar", [("x/0.png", _png(10)), ("x/0.cls", b"0"), ("x/1.jpg", b"\xff\xd8 damaged"),
                                    ("x/1.cls", b"1"), ("x/2.png", _png(30)), ("x/2.cls", b"2")])
    dataset = sources.open_split(str(tmp_path / "d"), "train")
    loader = dali.dali_eval_loader(dataset, dali.eval_aug(32), 3, 1, False, torch.device("cpu"))
    (images, labels), = list(loader)
    assert labels.tolist() == [0, 2, 2] and dataset.skipped == 1  # replaced by the next readable one, as load() does
    assert torch.equal(images[1], images[2])
    strict = sources.open_split(str(tmp_path / "d"), "train", strict=True)
    with pytest.raises(sources.DataError, match=r"a.tar \(sample 1\).*--strict_data"):
        list(dali.dali_eval_loader(strict, dali.eval_aug(32), 3, 1, False, torch.device("cpu")))


@pytest.mark.e2e
def test_shard_and_source_errors_are_one_line(shards, tmp_path, cls_data):
    unlabeled = tmp_path / "photos"
    (unlabeled / "deep" / "er").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(unlabeled / "deep" / "er" / "a.png")
    proc = run_entry(main_finetune, *TINY_CLS, "--epochs", "1", "--data_path", unlabeled, "--nb_classes", "2",
                     "--output_dir", "", check=False)
    assert proc.returncode == 2 and "must contain a train/ folder" in proc.stderr and "unlabeled" in proc.stderr


@pytest.mark.e2e
def test_an_unlabeled_folder_pretrains(tmp_path):
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = root / f"trip{i % 2}" / ("day" if i % 3 else "night")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    proc = run_entry(main_pretrain, *COMMON, "--epochs", "1", "--data_path", root, "--output_dir", tmp_path / "out")
    assert "pre-training on every image under it, without labels (6 images)" in proc.stdout
    assert [r["epoch"] for r in read_log(tmp_path / "out")] == [0]


def _save_hf(cls_data, root, **columns):
    datasets = pytest.importorskip("datasets")
    splits = {}
    for split, name in (("train", "train"), ("val", "validation")):
        folder = ImageFolder(os.path.join(cls_data, split))
        features = datasets.Features({columns.get("image", "image"): datasets.Image(),
                                      columns.get("label", "label"): datasets.ClassLabel(names=folder.classes)})
        splits[name] = datasets.Dataset.from_dict(
            {columns.get("image", "image"): [p for p, _ in folder.samples],
             columns.get("label", "label"): [t for _, t in folder.samples]}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root))


@pytest.mark.e2e
def test_a_hugging_face_dataset_fine_tunes_as_its_folder(cls_data, pretrained, tmp_path):
    _save_hf(cls_data, tmp_path / "hf", image="img", label="y")
    args = [*TINY_CLS, "--epochs", "1", "--nb_classes", "3", "--finetune", pretrained, "--log_dir", ""]
    run_entry(main_finetune, *args, "--data_path", cls_data, "--output_dir", tmp_path / "folder")
    proc = run_entry(main_finetune, *args, "--data_path", tmp_path / "hf", "--output_dir", tmp_path / "out",
                     check=False)
    assert proc.returncode == 2 and "no column 'image'" in proc.stderr and "--image_column" in proc.stderr
    run_entry(main_finetune, *args, "--data_path", tmp_path / "hf", "--image_column", "img", "--label_column", "y",
              "--output_dir", tmp_path / "hf_out")
    a, b = load(tmp_path / "folder" / "checkpoint-0.pth"), load(tmp_path / "hf_out" / "checkpoint-0.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert read_log(tmp_path / "folder") == read_log(tmp_path / "hf_out")
    knn = [*KNN, "--finetune", pretrained, "--nb_knn", "1", "3", "--output_dir", ""]  # and k-NN reads it too
    hf = run_entry(main_knn, *knn, "--data_path", tmp_path / "hf", "--image_column", "img", "--label_column", "y")
    folder = run_entry(main_knn, *knn, "--data_path", cls_data)
    assert _knn_lines(hf.stdout) == _knn_lines(folder.stdout) and len(_knn_lines(folder.stdout)) == 2


def test_shards_of_npy_arrays_are_read_at_full_precision_as_their_folder(tmp_path):
    import make_shards

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / "d" / split / f"class{c}").mkdir(parents=True)
            for i in range(3):
                np.save(tmp_path / "d" / split / f"class{c}" / f"{i}.npy", rng.random((8, 9, 3), dtype=np.float32))
    run_entry(make_shards, "--data_path", tmp_path / "d", "--output_dir", tmp_path / "sh", "--maxcount", "4")
    folder, shards = ImageFolder(str(tmp_path / "d" / "train")), sources.open_split(str(tmp_path / "sh"), "train")
    assert folder.float_pixels and shards.float_pixels
    assert all(torch.equal(folder.load(i)[0], shards.load(i)[0]) and folder.load(i)[1] == shards.load(i)[1]
               for i in range(len(folder)))


def test_a_brace_pattern_names_training_shards(cls_data, shards):
    pattern = os.path.join(shards, "train", "train-{000000..000002}.tar")
    _same_samples(ImageFolder(os.path.join(cls_data, "train")), sources.open_split(pattern, "train"))
    with pytest.raises(sources.UserError, match="names training shards only"):
        sources.open_split(pattern, "val")
    with pytest.raises(sources.DataError, match="1 of its 4 shard"):
        sources.open_split(os.path.join(shards, "train", "train-{000000..000003}.tar"), "train")
