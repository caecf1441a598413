"""Layer-wise learning-rate decay for ViT fine-tuning.

References:
    ELECTRA: https://arxiv.org/abs/2003.10555
    BEiT: https://arxiv.org/abs/2106.08254
"""
from typing import Dict, Iterable, List

import torch.nn as nn


def param_groups_lrd(
    model: nn.Module,
    weight_decay: float = 0.05,
    no_weight_decay_list: Iterable[str] = (),
    layer_decay: float = 0.75,
) -> List[Dict]:
    """Parameter groups with per-layer `lr_scale` = layer_decay ** (num_layers - layer_id).

    Args:
        model: a ViT with `blocks`.
        weight_decay: decay for parameters with more than one dimension.
        no_weight_decay_list: names that never get weight decay.
        layer_decay: multiplicative decay per layer from the top.
    """
    no_weight_decay_list = set(no_weight_decay_list)
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: Dict[str, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.0
        else:
            g_decay, this_decay = "decay", weight_decay
        layer_id = get_layer_id_for_vit(name, num_layers)
        group_name = f"layer_{layer_id}_{g_decay}"
        if group_name not in groups:
            groups[group_name] = {
                "lr_scale": layer_scales[layer_id],
                "weight_decay": this_decay,
                "params": [],
            }
        groups[group_name]["params"].append(param)
    return list(groups.values())


def get_layer_id_for_vit(name: str, num_layers: int) -> int:
    """Layer id of a parameter: 0 for embeddings, i+1 for blocks.i, num_layers for the rest."""
    if name in ("cls_token", "pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers
