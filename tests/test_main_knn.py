"""main_knn.py and util/knn.py: DINO's weighted k-NN vote, checked by hand and against scikit-learn; the
tool on pre-training and fine-tuning checkpoints, sharded under torchrun; the monitor of pre-training."""
import math
import os

import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

import main_finetune
import main_knn
import main_pretrain
import util.cli as cli
from helpers import TINY_CLS, TINY_PRETRAIN, read_log, run_entry, run_torchrun
from util.knn import knn_classify

KNN = ["--model", "vit_tiny_patch16", "--input_size", "32", "--batch_size", "4", "--num_workers", "0", "--device",
       "cpu", "--amp", "none"]


def _features(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)


def test_weighted_vote_equals_a_direct_computation():
    train, val = _features(40, 8, 0), _features(15, 8, 1)
    train_labels = torch.arange(40) % 6
    val_labels = torch.arange(15) % 6
    k, t = 7, 0.07
    hits1 = hits5 = 0
    for i in range(15):
        sims = [(float(val[i] @ train[j]), j) for j in range(40)]
        nearest = sorted(sims, reverse=True)[:k]
        votes = [0.0] * 6
        for sim, j in nearest:
            votes[int(train_labels[j])] += math.exp(sim / t)
        ranked = sorted(range(6), key=lambda c: -votes[c])
        hits1 += ranked[0] == int(val_labels[i])
        hits5 += int(val_labels[i]) in ranked[:5]
    top1, top5 = knn_classify(train, train_labels, val, val_labels, [k], t)[k]
    assert top1 == pytest.approx(100 * hits1 / 15) and top5 == pytest.approx(100 * hits5 / 15)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_uniform_votes_agree_with_scikit_learn(k):
    train, val = _features(60, 5, 2), _features(30, 5, 3)
    train_labels = (train[:, 0] > 0).long()  # two classes, odd k: no ties
    val_labels = (val[:, 0] + 0.3 * val[:, 1] > 0).long()
    ours = knn_classify(train, train_labels, val, val_labels, [k], weighting="uniform")[k][0]
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(train.numpy(), train_labels)
    assert ours == pytest.approx(100 * float((torch.from_numpy(sk.predict(val.numpy())) == val_labels).float().mean()))


def _lines(stdout):
    return [line for line in stdout.splitlines() if "-NN classifier result" in line]


@pytest.mark.e2e
def test_knn_tool_on_pretraining_and_finetuning_checkpoints(cls_data, pretrained, tmp_path):
    proc = run_entry(main_knn, *KNN, "--data_path", cls_data, "--finetune", pretrained, "--nb_knn", "1", "20",
                     "--output_dir", tmp_path / "knn")
    lines = _lines(proc.stdout)
    assert len(lines) == 2 and lines[0].startswith("1-NN classifier result: Top1: ") and ", Top5: " in lines[0]
    assert set(read_log(tmp_path / "knn", "knn_log.txt")[0]) == {"checkpoint", "1nn_top1", "1nn_top5", "20nn_top1",
                                                                  "20nn_top5"}
    assert os.listdir(tmp_path / "knn") == ["knn_log.txt"]  # its own file only: the folder may hold a training run
    ft = tmp_path / "ft"
    run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "1", "--finetune",
              pretrained, "--output_dir", ft, "--log_dir", "")
    proc = run_entry(main_knn, *KNN, "--data_path", cls_data, "--finetune", ft / "checkpoint-0.pth", "--global_pool",
                     "--nb_knn", "5", "--output_dir", "")
    assert len(_lines(proc.stdout)) == 1
    proc = run_entry(main_knn, *KNN, "--data_path", cls_data, "--nb_knn", "0", "--finetune", pretrained,
                     "--output_dir", "", check=False)
    assert proc.returncode == 2 and "--nb_knn" in proc.stderr


def test_knn_help_lists_only_what_applies(capsys):
    with pytest.raises(SystemExit):
        cli.command_line_parser(main_knn.get_args_parser()).parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--nb_knn" in out and "--temperature" in out and "--finetune" in out
    assert "--blr" not in out and "--epochs" not in out and "--resume" not in out
    actions = [a for a in main_knn.get_args_parser()._actions if a.option_strings]
    assert actions and all((a.help or "").strip() for a in actions)


@pytest.mark.e2e
def test_sharded_extraction_gives_the_single_process_result(cls_data, shards, pretrained):
    # two processes read the folder's WebDataset shards: the same neighbours, so every image of both splits was
    # extracted once across the ranks
    args = [*KNN, "--finetune", pretrained, "--nb_knn", "1", "3", "--output_dir", "", "--batch_size", "2"]
    single = _lines(run_entry(main_knn, *args, "--data_path", cls_data).stdout)
    sharded = _lines(run_torchrun(2, "main_knn.py", *args, "--data_path", shards).stdout)
    assert sharded == single and len(single) == 2


@pytest.mark.e2e
def test_knn_monitor_during_pretraining(cls_data, tmp_path):
    out = tmp_path / "out"
    proc = run_entry(main_pretrain, *TINY_PRETRAIN, "--data_path", cls_data, "--epochs", "3", "--knn_freq", "2",
                     "--knn_max_train", "6", "--output_dir", out, "--log_dir", "")
    assert proc.stdout.count("k-NN evaluation: 6 training and 7 validation images in") == 2  # epochs 0 and 2
    rows = read_log(out)
    assert ["knn_acc1" in r for r in rows] == [True, False, True]
    assert all(0 <= r["knn_acc1"] <= r["knn_acc5"] <= 100 for r in rows if "knn_acc1" in r)
    # 7 validation images: accuracies are multiples of 100/7
    assert rows[0]["knn_acc1"] * 7 / 100 == pytest.approx(round(rows[0]["knn_acc1"] * 7 / 100))


def test_different_class_folders_in_train_and_val_are_an_error(tmp_path):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", classes=3, per_class=2, size=32, splits=("train",))
    make_image_folder(tmp_path / "data", classes=2, per_class=2, size=32, splits=("val",))
    model = tmp_path / "mae.pth"
    import models_vit
    torch.save({"model": models_vit.vit_tiny_patch16(img_size=32, num_classes=0).state_dict()}, model)
    proc = run_entry(main_knn, *KNN, "--data_path", data, "--finetune", model, "--output_dir", "", check=False)
    assert proc.returncode == 2 and "different class folders (class2)" in proc.stderr


def test_knn_similarities_stay_fp32_under_bf16_autocast():
    # one class-0 neighbour at cosine 0.7517 against two class-1 ones at 0.701425 (k=3, T=0.07): class 0 wins by
    # 2.5%; rounded to bf16 (steps of 1/256) the cosines become 0.75 and 0.703125 and class 1 would win
    def unit(s):
        return [s, math.sqrt(1 - s * s)]

    train = torch.tensor([unit(0.7517), unit(0.701425), unit(0.701425)])
    labels = torch.tensor([0, 1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert knn_classify(train, labels, torch.tensor([[1.0, 0.0]]), torch.tensor([0]), [3], 0.07)[3][0] == 100.0
