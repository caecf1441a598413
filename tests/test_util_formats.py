"""util/formats.py: telling formats apart by content, and Hugging Face names in every naming family."""
import json

import pytest
import torch
from safetensors.torch import save_file

import models_mae
from util import formats
from util.errors import CheckpointError


@pytest.fixture(scope="module")
def mae_state():
    torch.manual_seed(0)
    model = models_mae.MaskedAutoencoderViT(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3,
                                            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    return {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}


def test_ours_to_hf_and_back_is_bit_exact(mae_state):
    hf = formats.ours_to_hf(mae_state)
    assert "vit.encoder.layer.1.attention.attention.key.weight" in hf
    assert "decoder.decoder_layers.0.attention.attention.value.bias" in hf
    assert hf["vit.encoder.layer.0.attention.attention.query.weight"].shape == (48, 48)
    back = formats.hf_to_ours(hf)
    assert back.keys() == mae_state.keys()
    assert all(torch.equal(back[k], mae_state[k]) for k in mae_state)


@pytest.mark.parametrize("family", ["converter", "transformers5", "saved_by_transformers5"])
def test_every_hugging_face_naming_family_reads_the_same(mae_state, family):
    hub = formats.ours_to_hf(mae_state)
    renames = {
        "converter": [("attention.attention.", "attention.self.")],
        "transformers5": [("vit.encoder.layer.", "vit.layers."), ("attention.attention.query", "attention.q_proj"),
                          ("attention.attention.key", "attention.k_proj"),
                          ("attention.attention.value", "attention.v_proj"),
                          ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"),
                          ("output.dense", "mlp.fc2")],
        "saved_by_transformers5": [("decoder.decoder_layers.", "decoder.decoder_encoder.layer.")],
    }[family]
    other = {}
    for k, v in hub.items():
        for a, b in renames:
            k = k.replace(a, b)
        other[k] = v
    assert other.keys() != hub.keys()
    back = formats.hf_to_ours(other)
    assert back.keys() == mae_state.keys() and all(torch.equal(back[k], mae_state[k]) for k in mae_state)


def test_unknown_hugging_face_names_are_refused(mae_state):
    with pytest.raises(CheckpointError, match="unknown Hugging Face weight name vit.text_projection.weight"):
        formats.hf_to_ours({**formats.ours_to_hf(mae_state), "vit.text_projection.weight": torch.zeros(2, 2)})


def test_formats_are_told_apart_by_content_not_name(mae_state, tmp_path):
    torch.save({"model": mae_state}, tmp_path / "weights.safetensors")  # a torch file, misleading name
    save_file(mae_state, tmp_path / "timm.pth")  # timm names, misleading name
    save_file(formats.ours_to_hf(mae_state), tmp_path / "hf.bin")
    (tmp_path / "notes.pth").write_text("not weights")
    assert formats.detect_format(str(tmp_path / "weights.safetensors")) == "torch"
    assert formats.detect_format(str(tmp_path / "timm.pth")) == "timm"
    assert formats.detect_format(str(tmp_path / "hf.bin")) == "hf"
    with pytest.raises(CheckpointError, match="cannot tell what .*notes.pth holds.*accepted: a PyTorch checkpoint"):
        formats.detect_format(str(tmp_path / "notes.pth"))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="not a timm or Hugging Face"):
        formats.detect_format(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    assert formats.detect_format(str(folder)) == "hf"
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224"}))
    assert formats.detect_format(str(folder)) == "timm"
    with pytest.raises(CheckpointError, match="no model.safetensors .or pytorch_model.bin. in"):
        formats.read_weights(str(folder), "timm")
    alone = tmp_path / "alone"  # weights without a config.json: judged by the file
    alone.mkdir()
    save_file(mae_state, alone / "model.safetensors")
    assert formats.detect_format(str(alone)) == "timm"
    assert formats.detect_format("https://example.org/mae_pretrain_vit_base.pth") == "torch"  # fetched later


def test_a_header_length_that_looks_like_a_pickle_is_still_safetensors(tmp_path):
    # the 8-byte header length comes first: 128 (mod 256) makes the first byte 0x80, a pickle's opcode
    for n in range(1, 64):
        path = tmp_path / f"w{n}.safetensors"
        save_file({"cls_token": torch.zeros(1, 1, 4), "x" * n: torch.zeros(1)}, path)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length of 128 mod 256 found")
    assert formats.detect_format(str(path)) == "timm"


def test_vit_model_pooler_is_left_out(mae_state):
    encoder = {k: v for k, v in mae_state.items() if not k.startswith(("decoder", "mask_token"))}
    hf = {**formats.ours_to_hf(encoder), "pooler.dense.weight": torch.zeros(48, 48), "pooler.dense.bias": torch.zeros(48)}
    assert formats.hf_to_ours(hf).keys() == encoder.keys()


def test_truncated_safetensors_is_a_clear_error(mae_state, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(mae_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert formats.detect_format(str(path)) == "timm"  # the header is intact
    with pytest.raises(CheckpointError, match="not a complete safetensors file"):
        formats.read_weights(str(path), "timm")
