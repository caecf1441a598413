"""--fsdp and --grad_checkpointing: FSDP2 against DDP, accumulation, gathered checkpoints that load anywhere, and
a SIGKILLed sharded run that resumes. Two-process runs use torchrun on CPU (gloo)."""
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

import main_finetune
import main_pretrain
import models_mae
import models_vit
from conftest import make_image_folder
from fsdp_steps import PRETRAINED, SEED, finetune_vit, pretrain_mae
from helpers import (ROOT, TINY_CLS, TINY_PRETRAIN, free_port, load, read_log, run_entry, run_torchrun, tiny_net,
                     trained_optimizer)
from util.distributed import destroy_process_group, init_single_process_group
from util.precision import autocast
from util.sharding import optimizer_state_to_ids, optimizer_state_to_names, shard_model

# fp32 round-off between two ways of summing the same gradient (another batch split, all-reduce vs
# reduce-scatter), relative to a tensor's largest gradient: 2^-16 = 128 ulp. Measured on AVX-512: at most 5 ulp,
# also at the third step, after AdamW has magnified round-off in a few weights. A missing reduction (each rank's
# half batch), a lost micro-step, leaked gradients or a per-shard clipping norm change gradients by 30% to 100%
# of that scale.
GRAD_TOL = 2.0 ** -16


def assert_gradients_close(got, expected, what):
    """Same parameters, each gradient within GRAD_TOL of its tensor's largest entry (and not all zero)."""
    assert got.keys() == expected.keys(), what
    for k, g in expected.items():
        scale = g.abs().max()
        assert scale > 0, (what, k)
        torch.testing.assert_close(got[k], g, rtol=0, atol=GRAD_TOL * scale.item(), msg=f"{what}: {k}")


def test_optimizer_layout_conversion_matches_torchs_own():
    model = tiny_net(0)
    optimizer = trained_optimizer(model)
    by_name = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    names = [["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]]
    assert by_name["param_groups"][0]["params"] == names[0]
    by_id = optimizer_state_to_ids(by_name, names)
    own = optimizer.state_dict()
    assert by_id["param_groups"] == own["param_groups"] and by_id["state"].keys() == own["state"].keys()
    for i, state in own["state"].items():
        for k, v in state.items():
            assert torch.equal(by_id["state"][i][k], v), (i, k)
    back = optimizer_state_to_names(own, names)
    assert back["param_groups"] == by_name["param_groups"] and back["state"].keys() == by_name["state"].keys()
    with pytest.raises(ValueError, match="group 0 holds 6 parameters saved, 5 here"):
        optimizer_state_to_names(own, [names[0][:5]])


@pytest.mark.parametrize("flags,expected", [
    (["--amp", "fp16"], "--fsdp does not support --amp fp16"),
    (["--compile"], "--fsdp with --compile is not supported"),
    (["--knn_freq", "1"], "--knn_freq is not supported with --fsdp"),
])
def test_unsupported_combinations_are_one_line_errors(flags, expected, tmp_path):
    proc = run_entry(main_pretrain, *TINY_PRETRAIN, "--data_path", tmp_path, "--output_dir", "", "--fsdp", *flags,
                     check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr


@pytest.mark.e2e
def test_one_process_fsdp_finetuning_matches_plain_and_its_checkpoint_evaluates(cls_data, pretrained, tmp_path):
    common = [*TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "1", "--finetune", pretrained,
              "--amp", "none", "--clip_grad", "0.5", "--log_dir", ""]
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    run_entry(main_finetune, *common, "--output_dir", plain)
    proc = run_entry(main_finetune, *common, "--output_dir", sharded, "--fsdp", "--grad_checkpointing")
    assert "Sharding the model with FSDP2 over 1 process(es)" in proc.stdout
    a, b = read_log(plain)[0], read_log(sharded)[0]
    # one process: nothing is sharded, only the clipping norm is summed in another order
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
    ckpt = load(sharded / "checkpoint-0.pth")
    assert sorted(ckpt["optimizer"]["state"])[:3] == [0, 1, 2]  # torch's own layout, not parameter names
    # the sharded run's checkpoint is an ordinary one: --eval without --fsdp reproduces its test numbers
    proc = run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--eval", "--resume",
                     sharded / "checkpoint-0.pth", "--amp", "none", "--output_dir", "")
    assert f"* Acc@1 {b['test_acc1']:.3f}" in proc.stdout and f"loss {b['test_loss']:.3f}" in proc.stdout


@pytest.fixture
def one_process_group():
    """A process group of this process alone (as --fsdp without torchrun), left as found."""
    made = not dist.is_initialized()
    init_single_process_group("cpu")
    yield
    if made:
        destroy_process_group()


def _mae():
    return models_mae.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2,
                                           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def _vit(**kwargs):
    return models_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, **kwargs)


@pytest.mark.parametrize("build,amp,batch", [
    (_mae, "none", 1), (_mae, "none", 2), (_mae, "bf16", 2),  # Linear on 3-D inputs may return views of these
    (lambda: _vit(num_classes=0), "none", 2), (lambda: _vit(num_classes=0), "bf16", 1),
    (lambda: _vit(num_classes=3), "none", 1), (lambda: _vit(num_classes=0, global_pool=True), "none", 2),
], ids=["mae_1", "mae_2", "mae_bf16", "vit_cls_token_no_head", "vit_cls_token_no_head_bf16", "vit_cls_token_head",
        "vit_global_pool_no_head"])
def test_fsdp_forward_returns_no_view_and_warns_nothing(one_process_group, build, amp, batch):
    device = torch.device("cpu")
    model = shard_model(build(), device, amp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with autocast(device, amp):
            out = model(torch.randn(batch, 3, 32, 32))
        outputs = out if isinstance(out, tuple) else (out,)
        outputs[0].float().mean().backward()
    # FSDP2 warns when a sharded module returns a view ("returned a view tensor"): an in-place op on it would
    # drop its pre-backward hook
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert all(t._base is None for t in outputs)  # FSDP's own test for a view
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def fsdp_steps(tmp_path_factory):
    """tests/fsdp_steps.py under torchrun (2 processes): (its results, its checkpoint folder, its output)."""
    tmp = tmp_path_factory.mktemp("fsdp_steps")
    out, ckpt_dir = tmp / "steps.pth", tmp / "ckpt"
    ckpt_dir.mkdir()
    proc = run_torchrun(2, "tests/fsdp_steps.py", out, ckpt_dir)
    return torch.load(out, weights_only=True), ckpt_dir, proc.stdout + proc.stderr


@pytest.mark.e2e
def test_two_process_fsdp_starts_from_the_weights_of_one_process(fsdp_steps):
    r, ckpt_dir, _ = fsdp_steps
    # each rank seeded SEED + rank (util/runner.py) and built its own weights; right after sharding, before any
    # step, the full state is bitwise the one process's (= DDP's, which broadcasts rank 0's) with --seed SEED:
    # every parameter and buffer of an MAE, and of a ViT whose fine-tuning head is drawn after --finetune loading
    pretrained = str(ckpt_dir / PRETRAINED)
    for name, seed_model in [("mae", pretrain_mae), ("vit", lambda seed: finetune_vit(seed, pretrained))]:
        expected, rank_1 = seed_model(SEED).state_dict(), seed_model(SEED + 1).state_dict()
        got = r[f"initial_{name}"]
        assert list(got) == list(expected), name
        for k, v in expected.items():
            assert torch.equal(got[k], v), (name, k)
        # not vacuous: rank 1 drew other weights (the patchwork of shards this replaces would differ)
        drawn = ["blocks.0.attn.qkv.weight", "drawn"] if name == "mae" else ["head.weight"]
        assert all(not torch.equal(rank_1[k], expected[k]) for k in drawn), name


@pytest.mark.e2e
def test_two_process_fsdp_equals_ddp_accumulation_and_resume(fsdp_steps):
    r, _, output = fsdp_steps
    # no configuration (fp32, bf16, accumulation, checkpointing) made FSDP warn that the model returned a view
    assert "returned a view tensor" not in output, output[-3000:]
    ddp = r["weights_ddp"]
    assert not torch.equal(ddp["blocks.0.attn.qkv.weight"], r["resumed"]["blocks.0.attn.qkv.weight"])
    # Same weights and global batches. Not bitwise: fsdp_accum sums each gradient over two micro-batches of half
    # the shapes, and reduce-scatter of shards vs all-reduce of buckets may add in another order. So:
    # - losses (averaged over ranks) to 1e-6 (8 ulp; measured: at most 1 ulp);
    # - the gradients every optimizer step applied (after clipping, before AdamW, which divides by sqrt(v) and
    #   so magnifies round-off on near-zero gradients), each within GRAD_TOL: a missing reduction, a lost
    #   micro-step, a per-shard clipping norm move them by 30-100%. A pure factor (a sum instead of a mean over
    #   ranks) is clipped away at CLIP; the unclipped first-batch norm (grad_norm_*, below) catches it;
    # - weights: after three AdamW steps, 99% of the elements within 1e-6, and half of every tensor. AdamW moves
    #   an element whose gradient is round-off noise (the key third of a qkv bias: mathematically 0) by up to lr
    #   per step whatever its sign; measured: 0.04% of all elements beyond 1e-6, 26% of the decoder's qkv bias
    #   (fsdp_accum). An optimizer that skips or double-steps a shard or a tensor moves it all by ~lr = 1e-3.
    # *_odd: epochs of 3 batches with --accum_iter 2 end on a micro-step without an update; its gradients must
    # not leak into the next epoch's first update (DDP discards them; leaked, that step's gradients grow by ~50%)
    for name, ref in [("fsdp", "ddp"), ("fsdp_accum", "ddp"), ("fsdp_ckpt", "ddp"), ("fsdp_odd", "ddp_odd")]:
        assert r[f"losses_{name}"] == pytest.approx(r[f"losses_{ref}"], rel=1e-6), name
        steps, ref_steps = r[f"step_grads_{name}"], r[f"step_grads_{ref}"]
        assert len(steps) == len(ref_steps) == (2 if name == "fsdp_odd" else 3), name
        for i, (grads, ref_grads) in enumerate(zip(steps, ref_steps)):
            assert_gradients_close(grads, ref_grads, f"{name} step {i}")
        ddp = r[f"weights_{ref}"]
        apart = {k: (r[f"weights_{name}"][k] - ddp[k]).abs() > 1e-6 for k in ddp}
        assert sum(a.sum() for a in apart.values()) < 1e-2 * sum(a.numel() for a in apart.values()), name
        worst = max(apart, key=lambda k: apart[k].float().mean())
        assert apart[worst].float().mean() < 0.5, (name, worst)  # a tensor left out of the step: 100%
    ddp = r["weights_ddp"]
    for k in ddp:  # activation checkpointing under FSDP changes nothing at all (same kernels, same shapes)
        assert torch.equal(r["weights_fsdp_ckpt"][k], r["weights_fsdp"][k]), k
    assert r["grad_norm_fsdp"] == pytest.approx(r["grad_norm_ddp"], rel=1e-6) and r["grad_norm_ddp"] > 0.5  # clips
    # the gathered optimizer state has DDP's layout and values
    assert r["optimizer_fsdp"]["param_groups"] == r["optimizer_ddp"]["param_groups"]
    for i, state in r["optimizer_ddp"]["state"].items():
        torch.testing.assert_close(r["optimizer_fsdp"]["state"][i]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-4,
                                   atol=1e-12)
    # gathered, saved, reloaded into a new sharded model: it continues bitwise as if never stopped
    for k in r["continued"]:
        assert torch.equal(r["resumed"][k], r["continued"][k]), k
    assert r["bf16_loss"] == pytest.approx(r["losses_ddp"][0], rel=1e-2)
    # FSDP's bf16 policy computes as plain autocast does: the residual stream stays fp32 (every block gets fp32
    # inputs; blocks' LayerNorms and the root keep fp32 parameters), and the loss is the same
    assert r["bf16_loss"] == pytest.approx(r["bf16_loss_plain"], rel=1e-6)
    assert r["bf16_block_inputs_fsdp"] == r["bf16_block_inputs_plain"] == ["torch.float32"] * 3
    # each process holds half: 4 bytes per parameter, 4 per gradient, 8 of AdamW moments, over 2 processes
    total = sum(v.numel() for v in ddp.values())
    trainable = total - ddp["pos_embed"].numel() - ddp["decoder_pos_embed"].numel()
    per_rank = r["local_bytes"]
    assert sum(b["params"] for b in per_rank) == 4 * total
    assert sum(b["grads"] for b in per_rank) == 4 * trainable
    assert sum(b["optimizer"] for b in per_rank) == 8 * trainable
    assert all(b["params"] < 0.6 * 4 * total for b in per_rank)  # about half each (dim 0 splits unevenly)


@pytest.mark.e2e
def test_sigkilled_fsdp_pretraining_resumes_with_every_epoch_logged_once(cls_data, tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4, size=32)  # 2 steps per epoch
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

    def command():
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), os.path.join(ROOT, "main_pretrain.py"), *map(str, TINY_PRETRAIN),
                "--batch_size", "2", "--print_freq", "1", "--epochs", "2", "--data_path", str(data), "--output_dir",
                str(out), "--log_dir", "", "--fsdp", "--grad_checkpointing"]

    proc = subprocess.Popen(command(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("Epoch: [1]  [0/2]"):  # epoch 0 saved, epoch 1 under way
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, no chance to save
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert load(out / "checkpoint-last.pth")["epoch"] == 0 and [r["epoch"] for r in read_log(out)] == [0]

    rerun = subprocess.run(command(), cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Auto-resuming from" in rerun.stdout and "Epoch: [0]" not in rerun.stdout
    assert "Sharding the model with FSDP2 over 2 process(es)" in rerun.stdout
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 1 and len(ckpt["rng"]) == 2 and ckpt["args"]["fsdp"] is True
    assert ckpt["model"]["blocks.0.attn.qkv.weight"].shape == (576, 192)  # full, not a shard
    assert sorted(ckpt["optimizer"]["state"])[:3] == [0, 1, 2]  # torch's own layout
    # the sharded run's checkpoint fine-tunes in one process, without --fsdp
    run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "1",
              "--finetune", out / "checkpoint-1.pth", "--output_dir", "", "--log_dir", "")
