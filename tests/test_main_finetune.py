"""End-to-end tests of main_finetune.py, main_linprobe.py and engine_finetune.py on tiny data.

Entry points run in this process (helpers.run_entry) from the session's pre-trained tiny MAE
(conftest.pretrained); the --dist_eval check runs under torchrun.
"""
import re

import pytest
import torch

import main_finetune
import main_linprobe
import main_pretrain
from helpers import TINY_CLS, TINY_PRETRAIN, load, read_log, run_entry, run_torchrun


def acc_line(stdout):
    m = re.findall(r"\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+)", stdout)
    assert m, stdout[-2000:]
    return tuple(float(x) for x in m[-1])


def test_reference_defaults():
    ft = main_finetune.get_args_parser().parse_args([])
    for k, v in dict(batch_size=64, epochs=50, model="vit_large_patch16", input_size=224, drop_path=0.1,
                     clip_grad=None, weight_decay=0.05, lr=None, blr=1e-3, layer_decay=0.75, min_lr=1e-6,
                     warmup_epochs=5, color_jitter=None, aa="rand-m9-mstd0.5-inc1", smoothing=0.1, reprob=0.25,
                     remode="pixel", recount=1, resplit=False, mixup=0, cutmix=0, cutmix_minmax=None,
                     mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", finetune="", global_pool=True,
                     nb_classes=1000, eval=False, dist_eval=False, num_workers=10, pin_mem=True).items():
        assert getattr(ft, k) == v, k
    assert main_finetune.get_args_parser().parse_args(["--cls_token"]).global_pool is False
    lp = main_linprobe.get_args_parser().parse_args([])
    for k, v in dict(batch_size=512, epochs=90, model="vit_large_patch16", weight_decay=0.0, blr=0.1, min_lr=0.0,
                     warmup_epochs=10, global_pool=False, nb_classes=1000, input_size=224).items():
        assert getattr(lp, k) == v, k
    assert not hasattr(lp, "mixup") and not hasattr(lp, "drop_path") and not hasattr(lp, "layer_decay")


@pytest.mark.e2e
@pytest.mark.parametrize("extra", [[], ["--cls_token"], ["--mixup", "0.8", "--cutmix", "1.0"],
                                   ["--cls_token", "--cutmix", "1.0", "--clip_grad", "1.0"]],
                         ids=["gap", "cls", "gap-mixup", "cls-cutmix-clip"])
def test_finetune_end_to_end(cls_data, pretrained, tmp_path, extra):
    out = tmp_path / "ft"
    proc = run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "1",
                     "--finetune", pretrained, "--output_dir", out, "--log_dir", out, *extra)
    assert "Load pre-trained checkpoint" in proc.stdout
    if "--cls_token" in extra:
        assert "missing_keys=['head.weight', 'head.bias']" in proc.stdout
    else:
        assert "missing_keys=['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']" in proc.stdout
    if "--mixup" in extra or "--cutmix" in extra:
        assert "Mixup is activated!" in proc.stdout and "SoftTargetCrossEntropy" in proc.stdout
    rows = read_log(out)
    assert len(rows) == 1 and {"train_loss", "train_lr", "test_acc1", "test_acc5", "test_loss", "epoch",
                               "n_parameters"} <= set(rows[0])
    ckpt = load(out / "checkpoint-0.pth")
    # the encoder moved away from the pre-trained weights, the head has 3 outputs
    assert ckpt["model"]["head.weight"].shape == (3, 192)
    pre = load(pretrained)["model"]
    assert not torch.equal(pre["blocks.0.attn.qkv.weight"], ckpt["model"]["blocks.0.attn.qkv.weight"])

    # --eval --resume reproduces the logged test accuracy
    proc = run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--eval",
                     "--resume", out / "checkpoint-0.pth", "--output_dir", "", *extra)
    acc1, acc5, loss = acc_line(proc.stdout)
    assert acc1 == pytest.approx(rows[0]["test_acc1"], abs=1e-3)
    assert loss == pytest.approx(rows[0]["test_loss"], abs=2e-3)
    assert "Accuracy of the network on the 7 test images" in proc.stdout
    # --eval --finetune evaluates the same weights, loaded by the fine-tuning rules
    proc = run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--eval",
                     "--finetune", out / "checkpoint-0.pth", "--output_dir", "", *extra)
    assert acc_line(proc.stdout) == (acc1, acc5, loss)


@pytest.mark.e2e
def test_linprobe_keeps_encoder_bitwise(cls_data, pretrained, tmp_path):
    out = tmp_path / "lp"
    run_entry(main_linprobe, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "2",
              "--finetune", pretrained, "--output_dir", out, "--log_dir", out)
    pre, ckpt = load(pretrained)["model"], load(out / "checkpoint-last.pth")
    model = ckpt["model"]
    encoder = [k for k in pre if k in model]
    assert len(encoder) > 100
    for k in encoder:
        assert torch.equal(pre[k], model[k]), k
    assert {"head.0.running_mean", "head.1.weight", "head.1.bias"} <= set(model)
    assert "head.0.weight" not in model  # BatchNorm without affine parameters
    assert not torch.equal(model["head.0.running_mean"], torch.zeros_like(model["head.0.running_mean"]))
    assert "mu" in next(iter(ckpt["optimizer"]["state"].values()))  # LARS momentum buffers
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    # --eval --finetune evaluates the probe as --eval --resume does; a pre-training checkpoint has no head to evaluate
    evals = [acc_line(run_entry(main_linprobe, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--eval", flag,
                                out / "checkpoint-last.pth", "--output_dir", "").stdout)
             for flag in ("--resume", "--finetune")]
    assert evals[0] == evals[1] and evals[0][0] == pytest.approx(read_log(out)[-1]["test_acc1"], abs=1e-3)
    proc = run_entry(main_linprobe, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--eval", "--finetune",
                     pretrained, "--output_dir", "", check=False)
    assert proc.returncode == 2 and "has no trained classifier head" in proc.stderr


@pytest.mark.e2e
def test_finetune_from_other_input_size_interpolates(cls_data, tmp_path):
    pre = tmp_path / "pre48"
    run_entry(main_pretrain, *TINY_PRETRAIN, "--input_size", "48", "--data_path", cls_data, "--epochs", "1",
              "--output_dir", pre, "--log_dir", pre)
    proc = run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "1",
                     "--finetune", pre / "checkpoint-0.pth", "--output_dir", "", "--log_dir", "")
    assert "Position interpolate from 3x3 to 2x2" in proc.stdout


@pytest.mark.e2e
def test_wrong_checkpoint_names_keys(cls_data, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(3), "fc.weight": torch.zeros(2, 2)}}, bad)
    proc = run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "1",
                     "--finetune", bad, "--output_dir", "", "--log_dir", "", check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr
    assert "missing keys: cls_token" in err[0] and str(bad) in err[0]


@pytest.mark.e2e
def test_dist_eval_counts_each_image_once(cls_data, pretrained, tmp_path):
    # the pre-training checkpoint as a classifier: its encoder and a fresh (seeded) head
    model = main_finetune.models_vit.vit_tiny_patch16(img_size=32, num_classes=3, global_pool=True)
    main_finetune.load_pretrained(model, str(pretrained), global_pool=True)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a head that ranks the classes
    torch.save({"model": model.state_dict()}, tmp_path / "classifier.pth")
    args = [*TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--eval", "--resume",
            tmp_path / "classifier.pth", "--output_dir", "", "--batch_size", "2"]
    single = acc_line(run_entry(main_finetune, *args).stdout)
    # the reference's single-node command: python -m torch.distributed.launch (passes --local-rank=N)
    proc = run_torchrun(2, "main_finetune.py", *args, "--dist_eval", launcher="torch.distributed.launch")
    assert "does not divide evenly" in proc.stderr
    dist = acc_line(proc.stdout)
    assert dist[0] == pytest.approx(single[0], abs=1e-6)
    assert dist[1] == pytest.approx(single[1], abs=1e-6)
    assert dist[2] == pytest.approx(single[2], abs=1e-4)
    # 7 images: accuracy is a multiple of 100/7
    assert (single[0] * 7 / 100) == pytest.approx(round(single[0] * 7 / 100), abs=1e-3)


@pytest.mark.e2e
def test_partial_finetuning_trains_only_the_last_blocks(cls_data, pretrained, tmp_path):
    out = tmp_path / "pft"
    proc = run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "1",
                     "--finetune", pretrained, "--finetune_blocks", "1", "--output_dir", out, "--log_dir", "")
    assert "Partial fine-tuning: the last 1 blocks" in proc.stdout
    pre, ckpt = load(pretrained)["model"], load(out / "checkpoint-0.pth")
    model = ckpt["model"]
    frozen = [k for k in pre if k.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks."))
              and not k.startswith("blocks.11.")]
    assert all(torch.equal(pre[k], model[k]) for k in frozen)  # bit-identical after the training steps
    assert not torch.equal(pre["blocks.11.mlp.fc1.weight"], model["blocks.11.mlp.fc1.weight"])
    trainable = [k for k in model if k.startswith(("blocks.11.", "fc_norm.", "head."))]
    assert len(ckpt["optimizer"]["state"]) == len(trainable)  # no optimizer state for frozen weights
    # the checkpoint evaluates as any other; a K the model does not have is a one-line error
    run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--eval", "--resume",
              out / "checkpoint-0.pth", "--output_dir", "")
    proc = run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--finetune_blocks",
                     "13", "--output_dir", "", check=False)
    assert proc.returncode == 2 and "--finetune_blocks 13" in proc.stderr and "12 blocks" in proc.stderr
