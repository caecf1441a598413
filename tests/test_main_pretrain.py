"""End-to-end tests of main_pretrain.py and engine_pretrain.py on a tiny generated ImageFolder.

Runs of the entry point happen in this process (helpers.run_entry: the script's own parser and
cli.launch); torchrun runs are real processes.
"""
import argparse
import json
import os

import pytest
import torch

import engine_pretrain
import main_pretrain
import util.engine_loop as engine_loop
import util.optional as optional
import util.misc as misc
from helpers import TINY_PRETRAIN, load, read_log, run_entry, run_torchrun
from util.visualize import draw_reconstructions


def test_reference_flags_and_defaults():
    args = main_pretrain.get_args_parser().parse_args([])
    expected = dict(batch_size=64, epochs=400, accum_iter=1, model="mae_vit_large_patch16", input_size=224,
                    mask_ratio=0.75, norm_pix_loss=False, weight_decay=0.05, lr=None, blr=1e-3, min_lr=0.0,
                    warmup_epochs=40, output_dir="./output_dir", log_dir="./output_dir", seed=0, resume="",
                    start_epoch=0, num_workers=10, pin_mem=True, world_size=1, local_rank=-1,
                    dist_on_itp=False, dist_url="env://")
    for k, v in expected.items():
        assert getattr(args, k) == v, k
    assert main_pretrain.get_args_parser().parse_args(["--no_pin_mem"]).pin_mem is False
    # a parent parser for launchers: no -h of its own
    assert not any("-h" in a.option_strings for a in main_pretrain.get_args_parser()._actions)


@pytest.mark.e2e
def test_two_epochs_then_resume(image_folder, tmp_path):
    out = tmp_path / "out"
    common = [*TINY_PRETRAIN, "--data_path", image_folder, "--output_dir", out, "--log_dir", out]
    proc = run_entry(main_pretrain, *common, "--epochs", "2")
    assert "effective batch size: 4" in proc.stdout
    files = set(os.listdir(out))
    assert {"checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth", "log.txt", "args.json"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out))
    events.Reload()
    assert {"train_loss", "lr"} <= set(events.Tags()["scalars"])
    images = events.Images("reconstruction")  # the reconstruction grid, logged at the last epoch
    layout = draw_reconstructions(torch.zeros(8, 4, 3, 32, 32), 0.75)  # the titled figure of 8 rows
    assert [e.step for e in images] == [0, 1] and (images[0].height, images[0].width) == layout.pixels.shape[:2]
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert set(rows[0]) == {"train_loss", "train_lr", "epoch"}
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 1 and set(ckpt) >= {"model", "optimizer", "epoch", "scaler", "args"}
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == "mae_vit_tiny_patch16"

    # explicit --resume of epoch 1 continues at epoch 2
    proc = run_entry(main_pretrain, *common, "--epochs", "3", "--resume", out / "checkpoint-1.pth")
    assert "Epoch: [2]" in proc.stdout and "Epoch: [1]" not in proc.stdout
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2]

    # auto-resume: same command again, nothing left to do, nothing changes
    before = load(out / "checkpoint-last.pth")["model"]
    proc = run_entry(main_pretrain, *common, "--epochs", "3")
    assert "Auto-resuming from" in proc.stdout and "Nothing to train" in proc.stdout
    after = load(out / "checkpoint-last.pth")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2]

    # auto-resume with more epochs continues (--epochs may change on resume)
    proc = run_entry(main_pretrain, *common, "--epochs", "4")
    assert "Epoch: [3]" in proc.stdout and "Epoch: [2]" not in proc.stdout and "--epochs 3 -> 4" in proc.stdout
    # --no_auto_resume would start over this run: refused, nothing touched; --overwrite starts over on purpose
    listing = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = run_entry(main_pretrain, *common, "--epochs", "1", "--no_auto_resume", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Epoch: [0]" not in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == listing
    proc = run_entry(main_pretrain, *common, "--epochs", "1", "--no_auto_resume", "--overwrite")
    assert "Epoch: [0]" in proc.stdout and "Auto-resuming" not in proc.stdout
    assert [r["epoch"] for r in read_log(out)] == [0] and load(out / "checkpoint-last.pth")["epoch"] == 0
    assert not (out / "checkpoint-3.pth").exists()  # the old run's numbered checkpoints went with it


@pytest.mark.e2e
def test_exact_resume_is_bitwise_identical(image_folder, tmp_path):
    common = [*TINY_PRETRAIN, "--data_path", image_folder, "--amp", "none", "--epochs", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_entry(main_pretrain, *common, "--output_dir", a, "--log_dir", a)
    run_entry(main_pretrain, *common, "--output_dir", b, "--log_dir", b, "--stop_epoch", "2")
    assert load(b / "checkpoint-last.pth")["epoch"] == 1
    run_entry(main_pretrain, *common, "--output_dir", b, "--log_dir", b)
    wa, wb = load(a / "checkpoint-last.pth"), load(b / "checkpoint-last.pth")
    assert wa["epoch"] == wb["epoch"] == 3
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    assert read_log(a) == read_log(b)


@pytest.mark.e2e
def test_output_dir_empty_disables_saving(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    proc = run_entry(main_pretrain, *TINY_PRETRAIN, "--data_path", image_folder, "--epochs", "1",
                     "--output_dir", "", "--log_dir", "")
    assert "Training time" in proc.stdout
    assert set(os.listdir(tmp_path)) == before


class _CountingOptimizer(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def test_accum_iter_steps_and_lr_every_second_iteration(monkeypatch):
    model = torch.nn.Linear(2, 1)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, x, mask_ratio=0.75):
            return self.lin(x.flatten(1)[:, :2]).pow(2).mean(), None, None

    calls = []
    real = engine_loop.lr_sched.adjust_learning_rate

    def spy(optimizer, epoch, args):
        calls.append(epoch)
        return real(optimizer, epoch, args)

    monkeypatch.setattr(engine_loop.lr_sched, "adjust_learning_rate", spy)
    opt = _CountingOptimizer(model.parameters())
    loader = [(torch.randn(2, 2), torch.zeros(2)) for _ in range(6)]
    args = argparse.Namespace(accum_iter=2, mask_ratio=0.75, lr=0.1, min_lr=0.0, warmup_epochs=1, epochs=2,
                              amp="none", print_freq=100)
    engine_pretrain.train_one_epoch(Toy(), loader, opt, torch.device("cpu"), 0,
                                    misc.NativeScalerWithGradNormCount("cpu", enabled=False), args=args)
    assert opt.steps == 3
    assert calls == pytest.approx([0 / 6, 2 / 6, 4 / 6])


def test_nonfinite_loss_raises_with_epoch_step_lr():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x, mask_ratio=0.75):
            return self.w * x.mean() * float("nan") if x.mean() > 100 else self.w * 0.0 + 1.0, None, None

    loader = [(torch.zeros(1, 2), None), (torch.zeros(1, 2), None), (torch.full((1, 2), 1000.0), None)]
    args = argparse.Namespace(accum_iter=1, mask_ratio=0.75, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1,
                              amp="none", print_freq=100)
    model = Bad()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from util.errors import NonFiniteLossError
    with pytest.raises(NonFiniteLossError) as e:
        engine_pretrain.train_one_epoch(model, loader, opt, torch.device("cpu"), 5,
                                        misc.NativeScalerWithGradNormCount("cpu", enabled=False), args=args)
    assert e.value.epoch == 5 and e.value.step == 2
    assert "epoch 5, step 2" in str(e.value) and "lr" in str(e.value)


@pytest.mark.e2e
def test_ddp_step_equals_single_process_double_batch(tmp_path):
    import ddp_pretrain_step
    from ddp_pretrain_step import init_model

    one, two = tmp_path / "one.pth", tmp_path / "two.pth"
    ddp_pretrain_step.main(str(one))  # one process, batch 2b, here
    run_torchrun(2, "tests/ddp_pretrain_step.py", two)  # two processes, batch b each
    a, b = load(one), load(two)
    # The gradients the step applied (DDP's all-reduced mean vs the whole batch's), compared before AdamW: the
    # same sums added in another order, so fp32 round-off relative to each tensor's largest gradient, within
    # 2^-16 (128 ulp; measured: at most 2). A missing all-reduce (each rank's half batch) or a sum instead of a
    # mean over ranks moves them by 30% to 100% of that scale.
    assert a["grads"].keys() == b["grads"].keys() == {n for n, p in init_model().named_parameters() if p.requires_grad}
    tol = {k: 2.0 ** -16 * g.abs().max().item() for k, g in a["grads"].items()}
    for k, g in a["grads"].items():
        assert tol[k] > 0, k
        torch.testing.assert_close(b["grads"][k], g, rtol=0, atol=tol[k], msg=k)
    # The weights after that first AdamW step, which moves each weight by lr * g / (|g| + eps) (bias-corrected
    # moments of one step; plus weight decay): a gradient error dg changes that by at most lr * eps * dg / g^2,
    # under 5e-7 where |g| >= sqrt(lr * eps * dg / 5e-7); there the weights agree to 1e-6 (with their own
    # rounding). Below, the step's sign is round-off noise (the key biases' gradient is mathematically 0):
    # such elements are few (measured 1.4%). Without the all-reduce, most steps change sign: 2 * lr apart.
    lr, eps = 1e-3, 1e-8  # ddp_pretrain_step's AdamW
    decided = {k: g.abs() >= max(1e-6, (lr * eps * tol[k] / 5e-7) ** 0.5) for k, g in a["grads"].items()}
    assert sum(m.sum() for m in decided.values()) > 0.95 * sum(m.numel() for m in decided.values())
    for k, m in decided.items():
        torch.testing.assert_close(b["weights"][k][m], a["weights"][k][m], rtol=0, atol=1e-6, msg=k)
    for k in a["weights"].keys() - decided.keys():  # frozen (the position tables): untouched and equal
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    # and the step did change the weights
    init = init_model().state_dict()
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], a["weights"]["blocks.0.attn.qkv.weight"])


@pytest.mark.e2e
def test_args_json_records_the_settings_in_effect(image_folder, tmp_path):
    out = tmp_path / "out"
    common = [*TINY_PRETRAIN, "--data_path", image_folder, "--output_dir", out, "--log_dir", "",
              "--blr", "2e-3", "--accum_iter", "2"]
    run_entry(main_pretrain, *common, "--epochs", "1")
    run_entry(main_pretrain, *common, "--epochs", "2")  # auto-resumes from checkpoint-last.pth (epoch 0)
    with open(out / "args.json") as f:
        recorded = json.load(f)
    # resolved values, not the flags' defaults: lr from --blr x effective batch / 256, device, precision, ...
    assert recorded["lr"] == pytest.approx(2e-3 * 4 * 2 / 256)
    assert recorded["resume"] == str(out / "checkpoint-last.pth") and recorded["start_epoch"] == 1
    assert (recorded["device"], recorded["compile"], recorded["patch_embed"]) == ("cpu", False, "linear")
    assert recorded["amp"] in ("none", "bf16") and recorded["attn"] in ("sdpa", "math")
    # and they are exactly the args stored in the checkpoint that run wrote
    assert load(out / "checkpoint-last.pth")["args"] == recorded


@pytest.mark.e2e
def test_ablation_flags_train_and_the_checkpoint_fine_tunes(image_folder, tmp_path):
    import main_finetune
    from helpers import TINY_CLS

    out = tmp_path / "abl"
    run_entry(main_pretrain, *TINY_PRETRAIN, "--input_size", "64", "--data_path", image_folder, "--epochs", "1",
              "--output_dir", out, "--log_dir", "", "--mask_type", "block", "--decoder_embed_dim", "64",
              "--decoder_depth", "2", "--decoder_num_heads", "2", "--encoder_mask_token", "--loss_on_visible",
              "--pretrain_aug", "crop_rand_color")
    ckpt = load(out / "checkpoint-0.pth")
    assert {k: ckpt["args"][k] for k in ("mask_type", "decoder_embed_dim", "decoder_depth", "encoder_mask_token",
                                          "loss_on_visible", "pretrain_aug")} == dict(
        mask_type="block", decoder_embed_dim=64, decoder_depth=2, encoder_mask_token=True, loss_on_visible=True,
        pretrain_aug="crop_rand_color")
    assert ckpt["model"]["decoder_embed.weight"].shape == (64, 192) and "decoder_blocks.1.norm1.weight" in ckpt["model"]
    assert "decoder_blocks.2.norm1.weight" not in ckpt["model"] and "encoder_mask_token" in ckpt["model"]
    # fine-tuning drops the decoder and the encoder's mask token as usual
    run_entry(main_finetune, *TINY_CLS, "--input_size", "64", "--data_path", image_folder, "--nb_classes", "2",
              "--epochs", "1", "--finetune", out / "checkpoint-0.pth", "--output_dir", "", "--log_dir", "")
    # a grid mask with another ratio is a one-line error naming the flag
    proc = run_entry(main_pretrain, *TINY_PRETRAIN, "--input_size", "64", "--data_path", image_folder,
                     "--epochs", "1", "--output_dir", "", "--mask_type", "grid", "--mask_ratio", "0.5", check=False)
    assert proc.returncode == 2 and "--mask_type grid" in proc.stderr and "0.75" in proc.stderr


@pytest.mark.e2e
def test_missing_dali_is_one_line_naming_the_install(monkeypatch, cls_data):
    monkeypatch.setattr(optional, "dali_available", lambda: False)
    # needs no DALI (so not in test_util_dali.py, which skips without it)
    proc = run_entry(main_pretrain, *TINY_PRETRAIN, "--data_loader", "dali", "--data_path", cls_data,
                     "--output_dir", "", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install nvidia-dali-cuda" in lines[0] and "--data_loader torch" in lines[0]
