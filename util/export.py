"""Export a checkpoint for use elsewhere: timm, Hugging Face, or the reference's release format.

The checkpoint (ours or the reference's; pre-training, fine-tuning or linear probing) is first loaded
strictly into this code's model, so an export never silently drops or invents a weight:

- timm: `model.safetensors` (the encoder, or the classifier, in timm's names, which are ours) and timm's
  `config.json`, written by timm's own `save_for_hf`;
- hf: a `ViTMAEForPreTraining` folder for an MAE, a `ViTForImageClassification` folder for a class-token
  classifier (`config.json` + `model.safetensors` in the Hugging Face Hub's names);
- encoder: `model.pth` holding `{'model': state dict}`, as the reference's released weights.
"""
import os
from typing import Any, Dict, Optional, Tuple

import timm
import torch
from safetensors.torch import save_file
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import models_mae
import models_vit
from util.checkpoint import atomic_save, load_checkpoint, load_state_dict_strict
from util.errors import CheckpointError, UserError
from util.formats import ours_to_hf
from util.logger import log
from util.transforms import eval_crop_pct

FORMATS = ("timm", "hf", "encoder")
# width -> size name, as in our model names (timm has no "micro")
SIZES = {96: "micro", 192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1408: "giant"}
TIMM_PLAIN_VIT = "vit_base_patch16_224"  # timm's plain ViT, for widths timm has no name for (model_args size it)
HF_INSTALL = "pip install -r requirements-hf.txt"


def _is_decoder(key: str) -> bool:
    """Weights only pre-training uses: the decoder, its mask token, and --encoder_mask_token's."""
    return key.startswith(("decoder_", "mask_token", "encoder_mask_token"))


def _fold_linear_probe_head(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A linear probe's head (BatchNorm without affine parameters, then Linear) as one Linear; equal up to
    float rounding."""
    batch_norm = {k for k in state_dict if k.startswith("head.0.")}
    if batch_norm != {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked"}:
        raise CheckpointError(f"the head is not a linear probe's (BatchNorm without affine parameters, with running "
                              f"statistics, then Linear): found {sorted(batch_norm)}; it cannot be exported as one Linear")
    out = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    inv_std = (state_dict["head.0.running_var"].double() + 1e-6).rsqrt()
    weight = state_dict["head.1.weight"].double() * inv_std
    out["head.weight"] = weight.float()
    out["head.bias"] = (state_dict["head.1.bias"].double() - weight @ state_dict["head.0.running_mean"].double()).float()
    log("Folded the linear probe's BatchNorm into its Linear head (equal up to float rounding)")
    return out


def load_for_export(path: str, model_name: Optional[str] = None) -> Tuple[str, torch.nn.Module, Dict[str, Any]]:
    """(kind, model, saved args) of a checkpoint: kind 'mae' (with decoder), 'classifier' or 'encoder'."""
    checkpoint = load_checkpoint(path)
    state_dict = checkpoint.get("model", checkpoint)
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    if not isinstance(state_dict, dict) or not all(k in state_dict for k in needed):
        raise CheckpointError(f"{path} holds no MAE or ViT weights (no 'model' state dict with "
                              f"{', '.join(needed)})")
    saved = checkpoint.get("args") or {}
    width = state_dict["cls_token"].shape[-1]
    patch = state_dict["patch_embed.proj.weight"].shape[-1]
    in_chans = state_dict["patch_embed.proj.weight"].shape[1]
    grid = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
    img_size = saved.get("input_size") or grid * patch
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    if "head.1.weight" in state_dict:
        state_dict = _fold_linear_probe_head(state_dict)
    if "decoder_embed.weight" in state_dict:
        kind = "mae"
    elif "head.weight" in state_dict:
        kind = "classifier"
    else:
        kind = "encoder"
    name = model_name or saved.get("model")
    if name is None:
        if width not in SIZES:
            raise UserError(f"cannot tell the model of {path} (width {width}); name it with --model")
        name = f"vit_{SIZES[width]}_patch{patch}"
    if kind == "mae":
        name = name if name.startswith("mae_") else "mae_" + name
        decoder = dict(decoder_depth=len({k.split(".")[1] for k in state_dict if k.startswith("decoder_blocks.")}),
                       decoder_embed_dim=state_dict["decoder_embed.weight"].shape[0])
        if saved.get("decoder_num_heads"):
            decoder["decoder_num_heads"] = saved["decoder_num_heads"]
        model = models_mae.create_model(name, img_size=img_size, in_chans=in_chans, depth=depth, **decoder,
                                        encoder_mask_token="encoder_mask_token" in state_dict,
                                        norm_pix_loss=bool(saved.get("norm_pix_loss", False)),
                                        mask_type=saved.get("mask_type", "random"))
    else:
        name = name[len("mae_"):].split("_dec")[0] if name.startswith("mae_") else name
        num_classes = state_dict["head.weight"].shape[0] if kind == "classifier" else 0
        model = models_vit.create_model(name, img_size=img_size, in_chans=in_chans, depth=depth,
                                        num_classes=num_classes, global_pool="fc_norm.weight" in state_dict)
    load_state_dict_strict(model, state_dict, path)
    return kind, model.eval(), saved


def encoder_state_dict(kind: str, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The weights an export carries: an MAE's encoder (no decoder), or the whole classifier / encoder."""
    return {k: v for k, v in model.state_dict().items() if not (kind == "mae" and _is_decoder(k))}


def _layout(model: torch.nn.Module) -> Dict[str, Any]:
    block = model.blocks[0]
    return dict(img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
                in_chans=model.patch_embed.proj.in_channels, embed_dim=model.cls_token.shape[-1],
                depth=len(model.blocks), num_heads=block.attn.num_heads, mlp_dim=block.mlp.fc1.out_features)


def timm_architecture(width: int, patch: int) -> str:
    """The timm ViT name for this width and patch where timm has one (`vit_giant_patch14_224`), else the one of
    this width (`vit_tiny_patch16_224` for ViT-Ti/4), else timm's plain ViT; the export's model_args give the
    sizes either way."""
    size = SIZES.get(width)
    candidates = (f"vit_{size}_patch{patch}_224", f"vit_{size}_patch16_224") if size else ()
    return next((name for name in candidates if timm.is_model(name)), TIMM_PLAIN_VIT)


def export_timm(kind: str, model: torch.nn.Module, output_dir: str, mean: Optional[Any] = None,
                std: Optional[Any] = None) -> None:
    """model.safetensors + config.json for timm.create_model (local-dir:, hf-hub:, or pretrained_cfg_overlay);
    the pretrained config's mean and std are the run's (--mean / --std; ImageNet's when it recorded none)."""
    lay = _layout(model)
    classifier = kind == "classifier"
    global_pool = "avg" if classifier and getattr(model, "global_pool", "") == "avg" else "token"
    # every size, so that the architecture name's own defaults decide nothing
    model_args = dict(img_size=lay["img_size"], patch_size=lay["patch_size"], in_chans=lay["in_chans"],
                      embed_dim=lay["embed_dim"], depth=lay["depth"], num_heads=lay["num_heads"],
                      mlp_ratio=lay["mlp_dim"] / lay["embed_dim"],
                      num_classes=model.num_classes if classifier else 0, global_pool=global_pool)
    with torch.device("meta"):  # not initialised: every weight is then ours
        timm_model = timm.create_model(
            timm_architecture(lay["embed_dim"], lay["patch_size"]), pretrained=False, **model_args,
            pretrained_cfg_overlay=dict(tag="mae", mean=tuple(mean or IMAGENET_DEFAULT_MEAN),
                                        std=tuple(std or IMAGENET_DEFAULT_STD),
                                        crop_pct=eval_crop_pct(lay["img_size"]), interpolation="bicubic",
                                        license=None))
    timm_model.load_state_dict(encoder_state_dict(kind, model), strict=True, assign=True)
    # model_args also where this timm's save_for_hf does not record the factory's arguments itself
    timm.models.save_for_hf(timm_model, output_dir, model_args=model_args, safe_serialization=True)


def export_hf(kind: str, model: torch.nn.Module, output_dir: str, mask_ratio: float = 0.75) -> None:
    """A Hugging Face ViTMAEForPreTraining (MAE) or ViTForImageClassification (class-token classifier) folder."""
    if kind == "encoder":
        raise UserError("this checkpoint holds an encoder without a decoder: --format hf writes "
                        "ViTMAEForPreTraining, which needs one; use --format timm or --format encoder")
    if kind == "mae" and hasattr(model, "encoder_mask_token"):
        raise UserError("this MAE was pre-trained with --encoder_mask_token, which Hugging Face's ViTMAE does not "
                        "have; use --format timm or --format encoder (the encoder alone)")
    if kind == "classifier" and model.global_pool == "avg":
        raise UserError("a global-pool classifier (mean of the patch tokens, then fc_norm) has no exact Hugging "
                        "Face counterpart (ViTForImageClassification classifies the class token); use "
                        "--format timm")
    try:
        import transformers  # optional: only this export needs it
    except ImportError:
        raise UserError(f"--format hf needs the transformers package: {HF_INSTALL}") from None
    lay = _layout(model)
    common = dict(hidden_size=lay["embed_dim"], num_hidden_layers=lay["depth"], num_attention_heads=lay["num_heads"],
                  intermediate_size=lay["mlp_dim"], image_size=lay["img_size"], patch_size=lay["patch_size"],
                  num_channels=lay["in_chans"], qkv_bias=True, layer_norm_eps=1e-6,
                  hidden_act="gelu")
    if kind == "mae":
        dec = model.decoder_blocks[0]
        config = transformers.ViTMAEConfig(
            **common, decoder_hidden_size=model.decoder_embed.out_features,
            decoder_num_hidden_layers=len(model.decoder_blocks), decoder_num_attention_heads=dec.attn.num_heads,
            decoder_intermediate_size=dec.mlp.fc1.out_features, mask_ratio=mask_ratio,
            norm_pix_loss=model.norm_pix_loss, architectures=["ViTMAEForPreTraining"])
    else:
        config = transformers.ViTConfig(**common, num_labels=model.num_classes,
                                        architectures=["ViTForImageClassification"])
    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    save_file(ours_to_hf(model.state_dict()), os.path.join(output_dir, "model.safetensors"),
              metadata={"format": "pt"})


def export_encoder(kind: str, model: torch.nn.Module, output_dir: str) -> None:
    """model.pth with {'model': state dict}: an MAE's encoder, or the classifier, as the reference releases."""
    atomic_save({"model": encoder_state_dict(kind, model)}, os.path.join(output_dir, "model.pth"))


def export(checkpoint: str, fmt: str, output_dir: str, model_name: Optional[str] = None) -> str:
    """Write `checkpoint` in format `fmt` to `output_dir`; return a one-line description."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt}")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is not empty; export into a new folder (old files there could "
                        f"be loaded instead of the export)")
    kind, model, saved = load_for_export(checkpoint, model_name)
    if fmt == "timm":
        export_timm(kind, model, output_dir, saved.get("mean"), saved.get("std"))
    elif fmt == "hf":
        export_hf(kind, model, output_dir, mask_ratio=float(saved.get("mask_ratio", 0.75)))
    else:
        export_encoder(kind, model, output_dir)
    return f"wrote the {kind} of {checkpoint} in {fmt} format to {output_dir}: {', '.join(sorted(os.listdir(output_dir)))}"
