"""Weights in other formats: what a file or folder holds, timm / Hugging Face weights in this code's names,
and this code's names in Hugging Face's.

- ours and the reference's: a torch checkpoint (.pth), read by util/checkpoint.py;
- timm: `model.safetensors`, alone or in a folder with timm's config.json; timm's VisionTransformer names
  are ours, so only the decoder of an MAE is left out;
- Hugging Face: a folder with config.json (`model_type` vit_mae or vit) and model.safetensors. Reading
  accepts the names of the official MAE converter, of the Hub's checkpoints and of transformers 5;
  writing uses the Hub's names, which every transformers release since 4 loads.
Safetensors files hold tensors and a JSON header only: reading them never runs code.
"""
import json
import os
import re
import struct
from typing import Dict, List, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from util.errors import CheckpointError

ACCEPTED = ("a PyTorch checkpoint (.pth, ours or the reference's), a timm model.safetensors or folder, "
            "or a Hugging Face ViTMAE / ViT folder")
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # zip archive (torch >= 1.6), pickle (older torch.save)

# Hugging Face key (any naming) -> ours; {i} is a block index, {p} weight or bias
_HF_TO_OURS: List[Tuple[str, str]] = [
    (r"(?:vit\.)?embeddings\.cls_token", "cls_token"),
    (r"(?:vit\.)?embeddings\.position_embeddings", "pos_embed"),
    (r"(?:vit\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(?:vit\.)?layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
    (r"decoder\.mask_token", "mask_token"),
    (r"decoder\.decoder_pos_embed", "decoder_pos_embed"),
    (r"decoder\.(decoder_embed|decoder_norm|decoder_pred)\.(weight|bias)", r"\1.\2"),
]
_HF_BLOCK = re.compile(r"^(?:(?:vit\.)?(?:encoder\.layer|layers)|decoder\.(?:decoder_layers|decoder_encoder\.layers?))"
                       r"\.(\d+)\.(.+)$")
_HF_IN_BLOCK: List[Tuple[str, str]] = [
    (r"attention\.(?:attention|self)\.(query|key|value)\.(weight|bias)", r"attn.\1.\2"),
    (r"attention\.([qkv])_proj\.(weight|bias)", r"attn.\1.\2"),
    (r"attention\.output\.dense\.(weight|bias)", r"attn.proj.\1"),
    (r"attention\.o_proj\.(weight|bias)", r"attn.proj.\1"),
    (r"layernorm_before\.(weight|bias)", r"norm1.\1"),
    (r"layernorm_after\.(weight|bias)", r"norm2.\1"),
    (r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"mlp.fc1.\1"),
    (r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"mlp.fc2.\1"),
]
_QKV = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return struct.unpack("<Q", head[:8])[0] <= os.path.getsize(path) - 8


def _safetensors_keys(path: str) -> List[str]:
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise CheckpointError(f"cannot read {path}: its safetensors header is damaged") from None
    return [k for k in header if k != "__metadata__"]


def _hf_names(keys: List[str]) -> bool:
    return any(k.startswith(("vit.", "decoder.decoder", "embeddings.", "encoder.layer", "classifier.")) for k in keys)


def detect_format(path: str) -> str:
    """'torch', 'timm' or 'hf' for a checkpoint path (file, folder or https URL), judged from its content."""
    if path.startswith(("https://", "http://")):
        return "torch"  # fetched and checked by util.checkpoint.load_checkpoint
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}; check the path")
    if os.path.isdir(path):
        config = _folder_config(path)
        if "architecture" in config:
            return "timm"
        if config.get("model_type") in ("vit_mae", "vit"):
            return "hf"
        weights = os.path.join(path, "model.safetensors")
        if not config and os.path.isfile(weights):
            return detect_format(weights)
        raise CheckpointError(f"{path} is a folder but not a timm or Hugging Face ViT / ViTMAE model folder "
                              f"(no config.json saying so); accepted: {ACCEPTED}")
    # safetensors first: its header length may start with a byte that looks like a pickle (0x80)
    if _is_safetensors(path):
        return "hf" if _hf_names(_safetensors_keys(path)) else "timm"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(TORCH_MAGIC):
        return "torch"
    raise CheckpointError(f"cannot tell what {path} holds: not a PyTorch checkpoint, a safetensors file or a "
                          f"model folder; accepted: {ACCEPTED}")


def _folder_config(path: str) -> Dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return {}
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError:
        raise CheckpointError(f"cannot read {config_path}: not JSON") from None
    return config if isinstance(config, dict) else {}


def weights_file(path: str) -> str:
    """The file that holds a folder's weights: model.safetensors, else a Hugging Face pytorch_model.bin
    (read weights-only, like every torch checkpoint); a file path stays as it is."""
    if not os.path.isdir(path):
        return path
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise CheckpointError(f"no model.safetensors (or pytorch_model.bin) in {path}: sharded weights are not read; "
                          f"save the model as one file")


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with a clear error if it is damaged."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: not a complete safetensors file ({e})") from None


def hf_to_ours(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A Hugging Face ViTMAE / ViT state dict in this code's names (query, key and value joined into qkv)."""
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[str, List[torch.Tensor]] = {}
    for key, value in state_dict.items():
        if re.fullmatch(r"(?:vit\.)?pooler\.dense\.(weight|bias)", key):
            continue  # ViTModel's pooler: MAE classifiers pool the tokens themselves
        name = next((re.sub(f"^{pattern}$", repl, key) for pattern, repl in _HF_TO_OURS
                     if re.fullmatch(pattern, key)), None)
        block = _HF_BLOCK.match(key) if name is None else None
        if block is not None:
            prefix = ("decoder_blocks" if key.startswith("decoder.") else "blocks") + f".{block.group(1)}."
            rest = next((re.sub(f"^{pattern}$", repl, block.group(2)) for pattern, repl in _HF_IN_BLOCK
                         if re.fullmatch(pattern, block.group(2))), None)
            if rest is not None and rest.split(".")[1] in _QKV:
                _, part, kind = rest.split(".")
                qkv.setdefault(f"{prefix}attn.qkv.{kind}", [None, None, None])[_QKV[part]] = value
                continue
            name = prefix + rest if rest is not None else None
        if name is None:
            raise CheckpointError(f"unknown Hugging Face weight name {key}: not a ViTMAE / ViT checkpoint")
        out[name] = value
    for name, parts in qkv.items():
        if any(p is None for p in parts):
            raise CheckpointError(f"Hugging Face checkpoint lacks part of the attention weights for {name}")
        out[name] = torch.cat(parts, dim=0)
    return out


def ours_to_hf(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This code's MAE or ViT state dict in the Hugging Face Hub's names (qkv split into query/key/value)."""
    top = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
           "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed"}
    in_block = {"attn.proj": "attention.output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after",
                "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        block = re.fullmatch(r"(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in top:
            out[top[key]] = value
        elif block is not None:
            where, i, module, kind = block.groups()
            prefix = f"vit.encoder.layer.{i}." if where == "blocks" else f"decoder.decoder_layers.{i}."
            if module == "attn.qkv":
                for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[f"{prefix}attention.attention.{part}.{kind}"] = chunk.clone()
            elif module in in_block:
                out[f"{prefix}{in_block[module]}.{kind}"] = value
            else:
                raise CheckpointError(f"no Hugging Face name for {key}")
        elif key.startswith("patch_embed.proj."):
            out["vit.embeddings.patch_embeddings.projection." + key.rsplit(".", 1)[1]] = value
        elif key in ("norm.weight", "norm.bias"):
            out["vit.layernorm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(("decoder_embed.", "decoder_norm.", "decoder_pred.")):
            out["decoder." + key] = value
        elif key.startswith("head."):
            out["classifier." + key.rsplit(".", 1)[1]] = value
        else:
            raise CheckpointError(f"no Hugging Face name for {key}")
    return {k: v.contiguous() for k, v in out.items()}


def read_weights(path: str, fmt: str) -> Dict[str, torch.Tensor]:
    """The state dict, in this code's names, of a timm or Hugging Face safetensors file or folder."""
    state_dict = read_safetensors(weights_file(path))
    return hf_to_ours(state_dict) if fmt == "hf" else state_dict
