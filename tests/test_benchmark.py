"""benchmark.py: the analytic FLOP count, the step benchmark and the input-pipeline benchmark."""
import json
import os

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import benchmark
import util.bench as bench
import models_mae
import models_vit


def _counted_forward_flops(model, x, **kwargs):
    # torch's own counter sees every matmul the forward pass runs (models built with the explicit attention)
    with FlopCounterMode(display=False) as counter:
        model(x, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_mae_flops_match_torch_flop_counter(mask_ratio):
    model = models_mae.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                                            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
                                            attn="math")
    x = torch.randn(2, 3, 32, 32)
    assert 2 * bench.mae_flops(model, mask_ratio) == _counted_forward_flops(model, x, mask_ratio=mask_ratio)


def test_vit_flops_match_torch_flop_counter():
    model = models_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                                         num_classes=10, global_pool=True, attn="math")
    x = torch.randn(3, 3, 32, 32)
    assert 3 * bench.vit_flops(model) == _counted_forward_flops(model, x)


def _run(argv, capsys):
    """(exit code, stdout, stderr) of benchmark.py's command line, in this process."""
    code = benchmark.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_runs_baseline_then_defaults(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, _ = _run(["--device", "cpu", "--model", "mae_vit_tiny_patch16", "--input_size", 32,
                            "--batch_size", 2, "--steps", 1, "--warmup", 1, "--compare", "--json", out], capsys)
    assert code == 0 and "speed-up over baseline" in stdout
    base, default = json.loads(out.read_text())["results"]
    assert (base["config"], base["amp"], base["attn"], base["patch_embed"], base["optimizer"]) == \
        ("baseline", "none", "math", "conv", "default")
    assert (default["config"], default["patch_embed"], default["optimizer"]) == ("default", "linear", "fused")
    assert base["img_s"] > 0 and default["img_s"] > 0 and 0 < default["utilisation"]


def test_data_mode_times_generated_jpegs(tmp_path, capsys):
    out = tmp_path / "data.json"
    code, stdout, _ = _run(["--mode", "data", "--data_images", 8, "--batch_size", 4, "--num_workers", 0,
                            "--steps", 2, "--warmup", 1, "--json", out], capsys)
    assert code == 0 and "img/s" in stdout
    result = json.loads(out.read_text())["results"][0]
    assert result["images"] == 8 and result["img_s"] > 0 and result["source"] == "files"


def test_data_mode_times_the_same_images_as_shards(tmp_path, capsys):
    pytest.importorskip("wids")
    out = tmp_path / "data.json"
    code, stdout, _ = _run(["--mode", "data", "--data_images", 8, "--batch_size", 4, "--num_workers", 0,
                            "--steps", 2, "--warmup", 1, "--shards", "--shard_size", 3, "--json", out], capsys)
    results = json.loads(out.read_text())["results"]
    assert code == 0 and [(r["source"], r["images"]) for r in results] == [("files", 8), ("shards", 8)]
    assert "torch, shards / files: " in stdout


def test_data_mode_errors_are_one_line(tmp_path, capsys):
    code, _, err = _run(["--mode", "data", "--data_path", tmp_path / "missing", "--num_workers", 0], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and "--data_path" in err


def test_cpu_peak_memory_sees_a_new_allocation():
    import mmap

    bench.reset_cpu_peak_memory()
    before = bench.cpu_peak_memory_gib()
    # fresh pages from the kernel (malloc might reuse memory an earlier test freed), all touched
    block = mmap.mmap(-1, 64 * 2 ** 20)
    block.write(b"\x01" * len(block))
    assert bench.cpu_peak_memory_gib() >= before + 60 / 1024
    block.close()


def test_generated_jpegs_are_imagenet_sized(tmp_path):
    root = bench.make_jpeg_folder(str(tmp_path), 3, classes=2)
    files = sorted((tmp_path / "train").rglob("*.jpg"))
    assert len(files) == 3 and root == str(tmp_path)
    with Image.open(files[0]) as img:
        assert (img.format, img.size) == ("JPEG", (500, 375))


def test_e2e_mode_feeds_the_training_step_from_both_loaders(tmp_path, capsys):
    import util.dali as dali

    loaders = ["torch", "dali"] if dali.dali_available() or os.environ.get("REQUIRE_DALI") else ["torch"]
    out = tmp_path / "e2e.json"
    code, stdout, _ = _run(["--mode", "e2e", "--device", "cpu", "--model", "mae_vit_tiny_patch16", "--input_size", 32,
                            "--data_images", 8, "--batch_size", 4, "--num_workers", 1, "--steps", 2, "--warmup", 1,
                            "--data_loader", *loaders, "--json", out], capsys)
    assert code == 0 and "of synthetic" in stdout
    results = json.loads(out.read_text())["results"]
    assert [r["loader"] for r in results] == ["synthetic", *loaders]
    # the same model, batch and precision as the synthetic row, fed from 8 JPEGs
    assert all(r["img_s"] > 0 and r["amp"] == results[0]["amp"] for r in results)
    assert all(r["images"] == 8 for r in results[1:])


def test_fsdp_and_grad_checkpointing_report_what_each_process_holds(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, _ = _run(["--device", "cpu", "--model", "mae_vit_tiny_patch16", "--input_size", 32,
                            "--batch_size", 2, "--steps", 1, "--warmup", 1, "--no_peak", "--amp", "none", "--fsdp",
                            "--grad_checkpointing", "--json", out], capsys)
    assert code == 0 and "fsdp True, grad_checkpointing True" in stdout and "process 0: peak mem" in stdout
    (r,) = json.loads(out.read_text())["results"]
    with torch.device("meta"):
        model = models_mae.mae_vit_tiny_patch16(img_size=32)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    (p,) = r["per_process"]  # one process holds everything: 4 bytes per parameter, 4 per gradient, 8 for AdamW
    assert p["params_gib"] * 2 ** 30 == pytest.approx(4 * total)
    assert p["grads_gib"] * 2 ** 30 == pytest.approx(4 * trainable)
    assert p["optimizer_gib"] * 2 ** 30 == pytest.approx(8 * trainable)
    assert r["processes"] == 1 and r["mem_gib"] > 0 and not torch.distributed.is_initialized()


@pytest.mark.parametrize("flags", [[], ["--fsdp", "--compare"]])
def test_several_processes_without_fsdp_are_a_one_line_error(flags, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, stderr = _run(["--device", "cpu", "--model", "mae_vit_tiny_patch16", "--input_size", 32, *flags], capsys)
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("error: several processes need --fsdp")
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("mode", ["data", "e2e"])
def test_loader_modes_refuse_fsdp_and_several_processes(mode, monkeypatch, capsys):
    code, _, stderr = _run(["--mode", mode, "--device", "cpu", "--fsdp"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and f"--mode {mode} runs in one process without --fsdp" in stderr
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, stderr = _run(["--mode", mode, "--device", "cpu"], capsys)
    assert code == 2 and f"--mode {mode} runs in one process" in stderr and not torch.distributed.is_initialized()
