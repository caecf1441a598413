"""benchmark.py: the analytic FLOP count, the step benchmark and the input-pipeline benchmark."""
import json

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import benchmark
import models_mae
import models_vit
import util.perf as perf
from tests.helpers import run_script


def _counted_forward_flops(model, x, **kwargs):
    # torch's own counter sees every matmul the forward pass runs (the explicit attention included)
    perf.set_attention(model, "math")
    with FlopCounterMode(display=False) as counter:
        model(x, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_mae_flops_match_torch_flop_counter(mask_ratio):
    model = models_mae.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                                            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)
    x = torch.randn(2, 3, 32, 32)
    assert 2 * benchmark.mae_flops(model, mask_ratio) == _counted_forward_flops(model, x, mask_ratio=mask_ratio)


def test_vit_flops_match_torch_flop_counter():
    model = models_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                                         num_classes=10, global_pool=True)
    x = torch.randn(3, 3, 32, 32)
    assert 3 * benchmark.vit_flops(model) == _counted_forward_flops(model, x)


def test_compare_runs_baseline_then_defaults(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script("benchmark.py", "--device", "cpu", "--model", "mae_vit_tiny_patch16", "--input_size", 32,
                      "--batch_size", 2, "--steps", 1, "--warmup", 1, "--compare", "--json", out)
    assert "speed-up over baseline" in proc.stdout
    base, default = json.loads(out.read_text())["results"]
    assert (base["config"], base["amp"], base["attn"], base["patch_embed"], base["optimizer"]) == \
        ("baseline", "none", "math", "conv", "default")
    assert (default["config"], default["patch_embed"], default["optimizer"]) == ("default", "linear", "fused")
    assert base["img_s"] > 0 and default["img_s"] > 0 and 0 < default["utilisation"]


def test_data_mode_times_generated_jpegs(tmp_path):
    out = tmp_path / "data.json"
    proc = run_script("benchmark.py", "--mode", "data", "--data_images", 8, "--batch_size", 4, "--num_workers", 0,
                      "--steps", 2, "--warmup", 1, "--json", out)
    assert "img/s" in proc.stdout
    result = json.loads(out.read_text())["results"][0]
    assert result["images"] == 8 and result["img_s"] > 0


def test_data_mode_errors_are_one_line(tmp_path):
    proc = run_script("benchmark.py", "--mode", "data", "--data_path", tmp_path / "missing", "--num_workers", 0,
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--data_path" in proc.stderr


def test_cpu_peak_memory_sees_a_new_allocation():
    benchmark.reset_cpu_peak_memory()
    before = benchmark.cpu_peak_memory_gib()
    block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
    assert benchmark.cpu_peak_memory_gib() >= before + 60 / 1024
    del block


def test_generated_jpegs_are_imagenet_sized(tmp_path):
    root = benchmark.make_jpeg_folder(str(tmp_path), 3, classes=2)
    files = sorted((tmp_path / "train").rglob("*.jpg"))
    assert len(files) == 3 and root == str(tmp_path)
    with Image.open(files[0]) as img:
        assert (img.format, img.size) == ("JPEG", (500, 375))
