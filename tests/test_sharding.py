"""--fsdp and --grad_checkpointing: FSDP2 against DDP, accumulation, gathered checkpoints that load anywhere, and
a SIGKILLed sharded run that resumes. Two-process runs use torchrun on CPU (gloo)."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

import main_finetune
import main_pretrain
from conftest import make_image_folder
from helpers import (ROOT, TINY_CLS, TINY_PRETRAIN, free_port, load, read_log, run_entry, run_torchrun, tiny_net,
                     trained_optimizer)
from util.sharding import optimizer_state_to_ids, optimizer_state_to_names


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


@pytest.mark.e2e
def test_two_process_fsdp_equals_ddp_accumulation_and_resume(tmp_path):
    out, ckpt_dir = tmp_path / "steps.pth", tmp_path / "ckpt"
    ckpt_dir.mkdir()
    run_torchrun(2, "tests/fsdp_steps.py", out, ckpt_dir)
    r = torch.load(out, weights_only=True)
    ddp = r["weights_ddp"]
    assert not torch.equal(ddp["blocks.0.attn.qkv.weight"], r["resumed"]["blocks.0.attn.qkv.weight"])
    # Same weights and batches: the first loss is bitwise the same; later ones differ only by float summation
    # order (reduce-scatter of shards vs all-reduce of buckets, the clipping norm summed over shards) at the
    # 1e-7 level. AdamW divides by sqrt(v), so the rare elements whose gradient is near zero can move by a
    # noticeable fraction of their lr-sized step (measured: at most 1.2e-5, in 0.05% of the elements; all
    # others equal to 1e-6). So: every element within 1e-4 (3% of lr x steps = 3e-3) and 99.9% within 1e-6.
    # A missing or doubled reduction, a wrong clipping norm or a lost micro-step moves most weights by ~1e-4
    # to 1e-3.
    # *_odd: epochs of 3 batches with --accum_iter 2 end on a micro-step without an update; its gradients must
    # not leak into the next epoch's first update (DDP discards them; leaked, most weights move by ~1e-4)
    for name, ref in [("fsdp", "ddp"), ("fsdp_accum", "ddp"), ("fsdp_ckpt", "ddp"), ("fsdp_odd", "ddp_odd")]:
        losses = r[f"losses_{name}"]
        assert losses[0] == r[f"losses_{ref}"][0], name
        assert losses == pytest.approx(r[f"losses_{ref}"], rel=1e-6), name
        ddp = r[f"weights_{ref}"]
        diff = torch.cat([(r[f"weights_{name}"][k] - ddp[k]).abs().flatten() for k in ddp])
        assert diff.max() <= 1e-4 and (diff > 1e-6).float().mean() < 1e-3, (name, diff.max())
    ddp = r["weights_ddp"]
    for k in ddp:  # activation checkpointing under FSDP changes nothing at all
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
    data = make_image_folder(tmp_path / "data", classes=2, per_class=8, size=32)
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
        if line.startswith("Epoch: [1]  [1/4]"):  # epoch 0 saved, epoch 1 under way
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
