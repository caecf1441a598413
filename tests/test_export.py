"""export.py / util/export.py: timm and Hugging Face exports round-trip bit-exactly, compute what our models
compute, and fine-tuning starts from them as from our own checkpoint. Weights are perturbed away from
their initial values, so that a wrong mapping cannot hide behind zeros and ones."""
import argparse
import json
import os

import pytest
import timm
import torch

import export
import util.export as export_lib
import main_finetune
import models_mae
import models_vit
from helpers import TINY_CLS, load, read_log, run_entry
from util import formats
from util.checkpoint import load_pretrained
from util.errors import CheckpointError
from util.resume import save_model


def _perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.05)
    return model.eval()


def _save(net, out, **args):
    save_model(argparse.Namespace(output_dir=str(out), **args), 0, net, net, torch.optim.AdamW(net.parameters()), None)
    return str(out / "checkpoint-0.pth")


@pytest.fixture(scope="module", params=["mae_vit_tiny_patch16", "mae_vit_small_patch16"])
def mae(request, tmp_path_factory):
    model = _perturb(models_mae.create_model(request.param, img_size=32, norm_pix_loss=True), 1)
    path = _save(model, tmp_path_factory.mktemp("mae"), model=request.param, input_size=32,
                 norm_pix_loss=True, mask_ratio=0.75)
    return model, path


@pytest.fixture(scope="module", params=[True, False], ids=["global_pool", "cls_token"])
def classifier(request, tmp_path_factory):
    model = _perturb(models_vit.vit_tiny_patch16(img_size=32, num_classes=5, global_pool=request.param), 2)
    path = _save(model, tmp_path_factory.mktemp("cls"), model="vit_tiny_patch16", input_size=32,
                 global_pool=request.param)
    return model, path


def _export(path, fmt, out):
    return run_entry(export, "--checkpoint", path, "--format", fmt, "--output_dir", out, check=False)


def _encoder(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}


# ----------------------------------------------------------------------------
# timm

def test_mae_to_timm_round_trip_and_features(mae, tmp_path):
    model, path = mae
    assert _export(path, "timm", tmp_path / "timm").returncode == 0
    back = formats.read_weights(str(tmp_path / "timm"), "timm")
    expected = _encoder(model)
    assert back.keys() == expected.keys() and all(torch.equal(back[k], expected[k]) for k in expected)
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    width = model.cls_token.shape[-1]
    assert (config["architecture"], config["num_classes"]) == (f"vit_{export_lib.SIZES[width]}_patch16_224", 0)
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # every patch visible, in order: the encoder's output for the whole image
        ours = model.forward_encoder(x, 0.0, noise=torch.arange(4.0).expand(2, 4))[0]
        torch.testing.assert_close(theirs.forward_features(x), ours, rtol=1e-5, atol=1e-5)
    # the other documented route: an architecture name plus the file
    named = timm.create_model(config["architecture"], pretrained=True, num_classes=0, img_size=32,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors")))
    assert all(torch.equal(named.state_dict()[k], expected[k]) for k in expected)


def test_classifier_to_timm_gives_the_same_logits(classifier, tmp_path):
    model, path = classifier
    assert _export(path, "timm", tmp_path / "timm").returncode == 0
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert theirs.global_pool == model.global_pool and theirs.num_classes == 5
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)


def test_linear_probe_head_is_folded_for_export(tmp_path):
    model = models_vit.vit_tiny_patch16(img_size=32, num_classes=4)
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(192, affine=False, eps=1e-6), model.head)
    _perturb(model, 3)
    model.head[0].running_var.uniform_(0.5, 2.0)
    path = _save(model, tmp_path / "lp", model="vit_tiny_patch16", input_size=32, global_pool=False)
    proc = _export(path, "timm", tmp_path / "timm")
    assert proc.returncode == 0 and "Folded the linear probe's BatchNorm" in proc.stdout
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-4, atol=1e-4)


def test_encoder_format_is_the_reference_release_layout(mae, tmp_path):
    model, path = mae
    assert _export(path, "encoder", tmp_path / "enc").returncode == 0
    released = load(tmp_path / "enc" / "model.pth")
    assert set(released) == {"model"} and released["model"].keys() == _encoder(model).keys()
    size = export_lib.SIZES[model.cls_token.shape[-1]]
    vit = models_vit.create_model(f"vit_{size}_patch16", img_size=32, num_classes=3, global_pool=False)
    load_pretrained(vit, str(tmp_path / "enc" / "model.pth"), global_pool=False)
    assert torch.equal(vit.blocks[3].mlp.fc2.weight, model.blocks[3].mlp.fc2.weight)


# ----------------------------------------------------------------------------
# Hugging Face

def _assert_hf_mae_computes_ours(model, folder):
    """ViTMAEForPreTraining loads `folder` with an empty loading report and computes our loss, predictions and
    mask for the same noise."""
    import transformers

    theirs, info = transformers.ViTMAEForPreTraining.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info  # an empty loading report
    theirs.eval()
    size = model.patch_embed.img_size[0]
    x, noise = torch.randn(2, 3, size, size), torch.rand(2, model.patch_embed.num_patches)
    with torch.no_grad():
        loss, pred, mask = model(x, mask_ratio=0.75, noise=noise)
        out = theirs(pixel_values=x, noise=noise)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, pred, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.mask, mask)


def test_mae_to_hugging_face_round_trip_and_forward(mae, tmp_path):
    pytest.importorskip("transformers")
    model, path = mae
    assert _export(path, "hf", tmp_path / "hf").returncode == 0
    back = formats.read_weights(str(tmp_path / "hf"), "hf")
    expected = model.state_dict()
    assert back.keys() == expected.keys() and all(torch.equal(back[k], expected[k]) for k in expected)
    _assert_hf_mae_computes_ours(model, tmp_path / "hf")


def test_classifier_to_hugging_face(classifier, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, path = classifier
    proc = _export(path, "hf", tmp_path / "hf")
    if model.global_pool == "avg":  # no exact counterpart: one line pointing to timm
        assert proc.returncode == 2 and "no exact Hugging Face counterpart" in proc.stderr
        assert "--format timm" in proc.stderr and "Traceback" not in proc.stderr
        return
    assert proc.returncode == 0
    theirs, info = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "hf"),
                                                                         output_loading_info=True)
    assert not any(info.values()), info
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(pixel_values=x).logits, model(x), rtol=1e-5, atol=1e-5)
    back = formats.read_weights(str(tmp_path / "hf"), "hf")
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_hf_export_without_transformers_names_the_install(mae, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    proc = _export(mae[1], "hf", tmp_path / "hf")
    assert proc.returncode == 2 and "pip install -r requirements-hf.txt" in proc.stderr


# ----------------------------------------------------------------------------
# fine-tuning from the exported files

@pytest.mark.e2e
def test_finetuning_from_timm_and_hugging_face_exports_matches_our_checkpoint(cls_data, pretrained, tmp_path):
    pytest.importorskip("transformers")
    for fmt in ("timm", "hf"):
        assert _export(pretrained, fmt, tmp_path / fmt).returncode == 0
    sources = {"pth": pretrained, "timm": tmp_path / "timm" / "model.safetensors", "hf": tmp_path / "hf"}
    losses = {}
    for name, source in sources.items():
        out = tmp_path / f"ft_{name}"
        proc = run_entry(main_finetune, *TINY_CLS, "--data_path", cls_data, "--nb_classes", "3", "--epochs", "1",
                         "--amp", "none", "--finetune", source, "--output_dir", out, "--log_dir", "")
        assert f"Load pre-trained checkpoint from: {source}" in proc.stdout
        losses[name] = read_log(out)[0]["train_loss"]
    assert losses["timm"] == losses["pth"] and losses["hf"] == losses["pth"]


def test_export_help_and_bad_checkpoint(tmp_path):
    import util.cli as cli

    with pytest.raises(SystemExit) as e:
        cli.command_line_parser(export.get_args_parser()).parse_args(["--help"])
    assert e.value.code == 0
    (tmp_path / "x.pth").write_text("hello")
    proc = _export(tmp_path / "x.pth", "timm", tmp_path / "out")
    assert proc.returncode == 2 and "cannot read checkpoint" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_foreign_safetensors_for_finetune_names_the_mismatch(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.randn(8, 3, 7, 7), "fc.weight": torch.randn(10, 8)}, foreign)
    vit = models_vit.vit_tiny_patch16(img_size=32, num_classes=3)
    with pytest.raises(CheckpointError, match="does not fit the model .*missing keys: cls_token"):
        load_pretrained(vit, str(foreign), global_pool=True)


def test_hugging_face_folder_with_pytorch_model_bin_is_read_weights_only(mae, tmp_path):
    model, _ = mae
    folder = tmp_path / "hf_bin"
    folder.mkdir()
    torch.save(formats.ours_to_hf(model.state_dict()), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    size = export_lib.SIZES[model.cls_token.shape[-1]]
    vit = models_vit.create_model(f"vit_{size}_patch16", img_size=32, num_classes=3, global_pool=False)
    load_pretrained(vit, str(folder), global_pool=False)
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in _encoder(model).items())


def test_export_refuses_a_non_empty_folder_and_a_foreign_head(mae, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "pytorch_model.bin").write_bytes(b"old")
    proc = _export(mae[1], "timm", tmp_path / "used")
    assert proc.returncode == 2 and "--output_dir" in proc.stderr and "is not empty" in proc.stderr
    model = models_vit.vit_tiny_patch16(img_size=32, num_classes=4)
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(192), model.head)  # affine: not a linear probe's
    path = _save(model, tmp_path / "bn", model="vit_tiny_patch16", input_size=32, global_pool=False)
    proc = _export(path, "timm", tmp_path / "out")
    assert proc.returncode == 2 and "cannot be exported as one Linear" in proc.stderr


def test_mae_with_encoder_mask_token_exports_its_encoder_to_timm_only(tmp_path):
    model = _perturb(models_mae.mae_vit_tiny_patch16(img_size=32, encoder_mask_token=True, decoder_embed_dim=64,
                                                     decoder_num_heads=2), 4)
    path = _save(model, tmp_path / "m", model="mae_vit_tiny_patch16", input_size=32, decoder_num_heads=2)
    assert _export(path, "timm", tmp_path / "timm").returncode == 0
    back = formats.read_weights(str(tmp_path / "timm"), "timm")
    assert "encoder_mask_token" not in back and back.keys() == _encoder(model).keys() - {"encoder_mask_token"}
    proc = _export(path, "hf", tmp_path / "hf")
    assert proc.returncode == 2 and "--encoder_mask_token" in proc.stderr


# ----------------------------------------------------------------------------
# every registered model, at one block and a 2x2 grid but its own width (which picks timm's name)

TIMM_NAMES = {  # registered ViT (and MAE encoder) -> the timm architecture its export names
    "vit_micro_patch4": "vit_base_patch16_224",  # no timm name of width 96: the plain ViT, sized by model_args
    "vit_tiny_patch4": "vit_tiny_patch16_224",  # no patch-4 names in timm: the one of this width
    "vit_tiny_patch16": "vit_tiny_patch16_224",
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
    "vit_giant_patch14": "vit_giant_patch14_224",
}


def _constructors(module):
    """One name per constructor (aliases are the same function)."""
    return sorted({module.MODELS[name].__name__ for name in module.model_names()})


def _random(build, seed, **kwargs):
    """build(**kwargs) with random weights instead of initialised ones (cheap at ViT-g's width): N(0, 0.05),
    LayerNorm scales N(1, 0.05)."""
    with torch.device("meta"):
        model = build(**kwargs)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.normal_(0.0, 0.05)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(1.0)
    return model.eval()


def _grid_2x2(name):
    """The image size that makes a 2x2 grid of the registered model's patches."""
    return 2 * (14 if "patch14" in name else 4 if "patch4" in name else 16)


def _small_mae(name, seed):
    """The registered MAE `name` with one encoder and one decoder block, on a 2x2 grid."""
    return _random(models_mae.MODELS[name], seed, img_size=_grid_2x2(name), depth=1, decoder_depth=1)


def _timm_builds(folder, expected_architecture):
    """The export built both documented ways: from the folder, and from its architecture name with model_args
    and the file."""
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == expected_architecture and timm.is_model(expected_architecture)
    by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True)
    # the class count in the overlay too: timm drops a head whose count differs from the name's default (1000)
    by_name = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                                pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"),
                                                            num_classes=config["num_classes"]))
    return by_folder.eval(), by_name.eval()


@pytest.mark.parametrize("name", _constructors(models_mae))
def test_every_registered_mae_exports_its_encoder_to_timm(name, tmp_path):
    model = _small_mae(name, 5)
    size = model.patch_embed.img_size[0]
    path = _save(model, tmp_path / "m", model=name, input_size=size)
    export_lib.export(path, "timm", str(tmp_path / "timm"))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():  # every patch visible, in order: the encoder's output for the whole image
        ours = model.forward_encoder(x, 0.0, noise=torch.arange(4.0).expand(2, 4))[0]
        for theirs in _timm_builds(tmp_path / "timm", TIMM_NAMES[name[len("mae_"):].split("_dec")[0]]):
            assert theirs.num_classes == 0
            torch.testing.assert_close(theirs.forward_features(x), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", _constructors(models_vit))
def test_every_registered_vit_exports_to_timm(name, tmp_path):
    size = _grid_2x2(name)
    model = _random(models_vit.MODELS[name], 6, img_size=size, depth=1, num_classes=5, global_pool=False)
    path = _save(model, tmp_path / "v", model=name, input_size=size, global_pool=False)
    export_lib.export(path, "timm", str(tmp_path / "timm"))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for theirs in _timm_builds(tmp_path / "timm", TIMM_NAMES[name]):
            assert theirs.global_pool == "token" and theirs.num_classes == 5
            torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mae_vit_micro_patch4_dec64d2b", "mae_vit_giant_patch14_dec512d8b"])
def test_patch4_and_giant_maes_export_to_hugging_face(name, tmp_path):
    # ViT-g's MLP ratio 48/11 (decoder's 4) travels as intermediate_size (6144) and decoder_intermediate_size
    pytest.importorskip("transformers")
    model = _small_mae(name, 7)
    path = _save(model, tmp_path / "m", model=name, input_size=model.patch_embed.img_size[0], mask_ratio=0.75)
    export_lib.export(path, "hf", str(tmp_path / "hf"))
    _assert_hf_mae_computes_ours(model, tmp_path / "hf")
