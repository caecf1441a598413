"""Vision Transformer classifier for fine-tuning and linear probing MAE encoders.

References:
    ViT: https://arxiv.org/abs/2010.11929
    timm: https://github.com/huggingface/pytorch-image-models
"""
from functools import partial
from typing import Callable, Dict

import torch
import torch.nn as nn
import timm.models.vision_transformer

from util.layers import patch_embed_layer, run_blocks, use_attention
from util.registry import lookup, names, register

MODELS: Dict[str, Callable] = {}


class Blocks(nn.Sequential):
    """The transformer blocks in order; with `grad_checkpointing` each block is checkpointed, non-reentrant."""

    grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x through the blocks; with grad checkpointing each block keeps only its input for the backward."""
        return run_blocks(self, x, self.grad_checkpointing)


class VisionTransformer(timm.models.vision_transformer.VisionTransformer):
    """timm ViT with the MAE code's boolean `global_pool`.

    global_pool=True: mean of the patch tokens (cls excluded), then `fc_norm`; no final `norm`.
    global_pool=False: final `norm`, then the cls token.
    `attn` ('sdpa' or 'math') and `patch_embed` ('conv' or 'linear') choose how attention and the patch
    embedding are computed (same parameters and maths; see util/layers.py).
    """

    def __init__(self, global_pool: bool = False, attn: str = "sdpa", patch_embed: str = "conv", **kwargs):
        if isinstance(global_pool, str):  # timm-style value passed through
            global_pool = global_pool == "avg"
        kwargs.setdefault("fc_norm", None)
        kwargs.setdefault("embed_layer", patch_embed_layer(patch_embed))
        super().__init__(global_pool="avg" if global_pool else "token", **kwargs)
        self.blocks = Blocks(*self.blocks)  # same children, same state-dict keys
        use_attention(self.blocks, attn)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's pooling, fc_norm and head; [N, 1+L, D] -> [N, num_classes] (features [N, D] with pre_logits or
        num_classes=0), always a tensor of its own: the cls token (global_pool=False) is `x[:, 0]`, a view,
        and without a head to compute from it an FSDP2 root would return that view and warn."""
        features = super().forward_head(x, pre_logits=True)  # [N, D]
        if pre_logits or isinstance(self.head, nn.Identity):
            return features.clone()
        return self.head(features)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block, non-reentrant whatever timm's version and its
        TIMM_REENTRANT_CKPT (timm's own checkpoint_seq path stays off)."""
        super().set_grad_checkpointing(enable)
        self.grad_checkpointing = False
        self.blocks.grad_checkpointing = enable

    def train_last_blocks(self, k: int) -> None:
        """Partial fine-tuning (MAE paper, Fig. 9): only the last k blocks, the final norm / fc_norm and the
        head train; the patch embedding, tokens, position table and earlier blocks are frozen (no
        gradients, so no optimizer state) and run without drop path."""
        if not 0 <= k <= len(self.blocks):
            raise ValueError(f"the model has {len(self.blocks)} blocks; train the last 0 to {len(self.blocks)}")
        frozen = [self.patch_embed, *self.blocks[:len(self.blocks) - k]]
        for module in frozen:
            module.requires_grad_(False)
        self.cls_token.requires_grad_(False)
        self.pos_embed.requires_grad_(False)
        for block in self.blocks[:len(self.blocks) - k]:
            block.drop_path1, block.drop_path2 = nn.Identity(), nn.Identity()  # a fixed feature extractor


def _build(defaults: dict, kwargs: dict) -> VisionTransformer:
    cfg = dict(mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(defaults)
    cfg.update(kwargs)
    return VisionTransformer(**cfg)


@register(MODELS)
def vit_tiny_patch16(**kwargs) -> VisionTransformer:
    """ViT-Ti/16: width 192, depth 12, 3 heads."""
    return _build(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register(MODELS)
def vit_micro_patch4(**kwargs) -> VisionTransformer:
    """The encoder of mae_vit_micro_patch4: width 96, depth 6, 3 heads, 4-px patches, 32-px images."""
    return _build(dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3), kwargs)


@register(MODELS)
def vit_tiny_patch4(**kwargs) -> VisionTransformer:
    """ViT-Ti/4: width 192, depth 12, 3 heads, 4-px patches, 32-px images."""
    return _build(dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3), kwargs)


@register(MODELS)
def vit_small_patch16(**kwargs) -> VisionTransformer:
    """ViT-S/16: width 384, depth 12, 6 heads."""
    return _build(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register(MODELS)
def vit_base_patch16(**kwargs) -> VisionTransformer:
    """ViT-B/16: width 768, depth 12, 12 heads."""
    return _build(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register(MODELS)
def vit_large_patch16(**kwargs) -> VisionTransformer:
    """ViT-L/16: width 1024, depth 24, 16 heads."""
    return _build(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


@register(MODELS)
def vit_huge_patch14(**kwargs) -> VisionTransformer:
    """ViT-H/14: width 1280, depth 32, 16 heads."""
    return _build(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), kwargs)


@register(MODELS)
def vit_giant_patch14(**kwargs) -> VisionTransformer:
    """ViT-g/14: width 1408, depth 40, 16 heads, MLP 6144 (ratio 48/11)."""
    return _build(dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11), kwargs)


def create_model(name: str, **kwargs) -> VisionTransformer:
    """Build a registered ViT by name; unknown names raise an error listing the choices."""
    return lookup(MODELS, name, "ViT")(**kwargs)


def model_names():
    """All registered ViT model names."""
    return names(MODELS)
