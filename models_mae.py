"""Masked autoencoder with a Vision Transformer backbone.

References:
    MAE: https://arxiv.org/abs/2111.06377
    timm: https://github.com/huggingface/pytorch-image-models
"""
from functools import partial
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from util.layers import patch_embed_layer, run_blocks, use_attention
from util.masking import block_noise, check_mask_type, grid_noise
from util.pos_embed import get_2d_sincos_pos_embed
from util.registry import lookup, names, register

MODELS: Dict[str, Callable] = {}


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT encoder and a narrow ViT decoder that predicts pixels.

    The reference's arguments, plus how to compute two layers (same parameters and maths either way;
    util/perf.py picks the faster per device): `attn` 'sdpa' (fused) or 'math' (explicit softmax), and
    `patch_embed` 'conv' (timm's convolution) or 'linear' (patchify + one matmul). The paper's ablations:
    `mask_type` 'random' (the reference), 'block' or 'grid' (util/masking.py); `encoder_mask_token`: the
    encoder sees every patch, a learned token in place of the removed ones (Table 1c, "w/ [M]"; adds the
    `encoder_mask_token` parameter); `loss_on_visible`: the loss averages over all patches, not only the
    removed ones. `decoder_mlp_ratio` (default: `mlp_ratio`) lets a wide encoder keep the usual decoder
    (ViT-g's MLP ratio is 48/11, its decoder's 4). `set_grad_checkpointing()` recomputes each block's
    activations in the backward pass instead of keeping them (same results, less memory).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=nn.LayerNorm, norm_pix_loss=False,
                 attn: str = "sdpa", patch_embed: str = "conv", mask_type: str = "random",
                 encoder_mask_token: bool = False, loss_on_visible: bool = False,
                 decoder_mlp_ratio: Optional[float] = None):
        super().__init__()
        self.grad_checkpointing = False
        # --------------------------------------------------------------------------
        # MAE encoder specifics
        self.patch_embed = patch_embed_layer(patch_embed)(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)

        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        # --------------------------------------------------------------------------

        # --------------------------------------------------------------------------
        # MAE decoder specifics
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)

        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)

        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio if decoder_mlp_ratio is None else decoder_mlp_ratio,
                  qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])

        self.decoder_norm = norm_layer(decoder_embed_dim)
        p_h, p_w = self.patch_embed.patch_size
        self.decoder_pred = nn.Linear(decoder_embed_dim, p_h * p_w * in_chans, bias=True)
        # --------------------------------------------------------------------------
        use_attention([*self.blocks, *self.decoder_blocks], attn)

        if encoder_mask_token:  # only then: the default keys stay the reference's
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        check_mask_type(mask_type, 0.75 if mask_type == "grid" else 0.5, self.patch_embed.grid_size)
        self.mask_type = mask_type
        self.loss_on_visible = loss_on_visible
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Fixed sin-cos position tables, Xavier patch embedding, N(0, 0.02) tokens, Xavier Linears."""
        grid_h, grid_w = self.patch_embed.grid_size
        self.pos_embed.data.copy_(_sincos_table(self.pos_embed.shape[-1], grid_h, grid_w))
        self.decoder_pos_embed.data.copy_(_sincos_table(self.decoder_pos_embed.shape[-1], grid_h, grid_w))

        # initialise patch_embed like nn.Linear (instead of nn.Conv2d)
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)

        self.apply(self._init_weights)
        if hasattr(self, "encoder_mask_token"):  # last: every other weight as without it
            torch.nn.init.normal_(self.encoder_mask_token, std=.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block, encoder and decoder (timm's method name)."""
        self.grad_checkpointing = enable

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """x through the blocks; with grad checkpointing each block keeps only its input for the backward."""
        return run_blocks(blocks, x, self.grad_checkpointing)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> [N, L, p*p*C], channel fastest inside a patch."""
        p_h, p_w = self.patch_embed.patch_size
        n, c, H, W = imgs.shape
        if H % p_h or W % p_w:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p_h}x{p_w}")
        h, w = H // p_h, W // p_w
        x = imgs.reshape(n, c, h, p_h, w, p_w)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p_h * p_w * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L, p*p*C] -> [N, C, H, W] (inverse of patchify for this model's grid)."""
        p_h, p_w = self.patch_embed.patch_size
        h, w = self.patch_embed.grid_size
        if h * w != x.shape[1]:
            raise ValueError(f"expected {h * w} patches for a {h}x{w} grid, got {x.shape[1]}")
        c = x.shape[2] // (p_h * p_w)
        x = x.reshape(x.shape[0], h, w, p_h, p_w, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p_h, w * p_w)

    def random_masking(self, x: torch.Tensor, mask_ratio: float,
                       noise: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the int(L*(1-mask_ratio)) tokens with the smallest noise.

        Args:
            x: [N, L, D] patch tokens.
            mask_ratio: fraction of tokens to remove.
            noise: optional [N, L] values replacing the uniform draw (deterministic masks).

        Returns:
            x_masked [N, len_keep, D], mask [N, L] (0 keep, 1 remove), ids_restore [N, L].
        """
        N, L, D = x.shape  # batch, length, dim
        len_keep = int(L * (1 - mask_ratio))

        if noise is None:
            noise = torch.rand(N, L, device=x.device)  # noise in [0, 1]
        elif noise.shape != (N, L):
            raise ValueError(f"noise must have shape {(N, L)}, got {tuple(noise.shape)}")
        noise = noise.to(x.device)

        # sort noise for each sample: small is keep, large is remove
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)

        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))

        # binary mask in the original order: 0 is keep, 1 is remove
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float,
                        noise: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [N, C, H, W] -> (latent [N, 1+len_keep, D], mask [N, L], ids_restore [N, L]).

        With encoder_mask_token the latent holds every patch ([N, 1+L, D], removed ones replaced by the
        learned token) and ids_restore is the identity.
        """
        x = self.patch_embed(x)  # [N, L, D]
        if noise is None and self.mask_type != "random":
            check_mask_type(self.mask_type, mask_ratio, self.patch_embed.grid_size)
            grid, n = self.patch_embed.grid_size, x.shape[0]
            noise = grid_noise(n, grid, x.device) if self.mask_type == "grid" else \
                block_noise(n, grid, mask_ratio, x.device)
        if hasattr(self, "encoder_mask_token"):
            _, mask, _ = self.random_masking(x, mask_ratio, noise)
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.encoder_mask_token.to(x.dtype) * w  # [N, L, D]
            ids_restore = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            x = x + self.pos_embed[:, 1:, :]
        else:
            x = x + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)

        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)  # [N, 1+len_keep, D]

        x = self._run_blocks(self.blocks, x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+len_keep, D] -> per-patch pixel predictions [N, L, p*p*C]."""
        x = self.decoder_embed(x)  # [N, 1+len_keep, Dd]

        # append mask tokens and restore the original patch order
        n_mask = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.expand(x.shape[0], n_mask, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token, [N, L, Dd]
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)  # cls token back in front, [N, 1+L, Dd]

        x = x + self.decoder_pos_embed
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # [N, 1+L, p*p*C]
        # without the cls token, as a tensor of its own: the slice is a view (and so can be nn.Linear's output on a
        # 3-D input, depending on the kernel), and an FSDP2 root returning a view warns (an in-place op on it
        # would skip FSDP's backward hook)
        return x[:, 1:, :].clone(memory_format=torch.contiguous_format)  # [N, L, p*p*C]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches only.

        Args:
            imgs: [N, C, H, W]
            pred: [N, L, p*p*C]
            mask: [N, L], 0 is keep, 1 is remove
        """
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = (pred.float() - target.float()) ** 2
        loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
        if self.loss_on_visible:
            return loss.mean()  # every patch, visible ones too
        return (loss * mask).sum() / mask.sum().clamp(min=1)  # mean loss on removed patches

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75,
                noise: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (loss, pred [N, L, p*p*C], mask [N, L])."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def _sincos_table(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """[1, 1 + grid_h*grid_w, dim] fixed table with a zero cls row."""
    table = get_2d_sincos_pos_embed(dim, (grid_h, grid_w), cls_token=True)
    return torch.from_numpy(table).float().unsqueeze(0)


def _build(defaults: dict, kwargs: dict) -> MaskedAutoencoderViT:
    cfg = dict(mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(defaults)
    cfg.update(kwargs)
    return MaskedAutoencoderViT(**cfg)


@register(MODELS, "mae_vit_tiny_patch16")
def mae_vit_tiny_patch16_dec128d4b(**kwargs) -> MaskedAutoencoderViT:
    """ViT-Ti/16 encoder (192 wide, 12 deep, 3 heads), decoder 128 wide, 4 deep, 4 heads."""
    return _build(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                       decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4), kwargs)


@register(MODELS, "mae_vit_micro_patch4")
def mae_vit_micro_patch4_dec64d2b(**kwargs) -> MaskedAutoencoderViT:
    """For 32-px images (an 8x8 grid): encoder 96 wide, 6 deep, 3 heads, 4-px patches; decoder 64 wide, 2
    deep, 4 heads. Small enough to pre-train on a laptop CPU (the quickstart)."""
    return _build(dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
                       decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4), kwargs)


@register(MODELS, "mae_vit_tiny_patch4")
def mae_vit_tiny_patch4_dec128d4b(**kwargs) -> MaskedAutoencoderViT:
    """ViT-Ti/4 for 32-px images (an 8x8 grid, e.g. CIFAR): encoder 192 wide, 12 deep, 3 heads; decoder 128
    wide, 4 deep, 4 heads."""
    return _build(dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                       decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4), kwargs)


@register(MODELS, "mae_vit_small_patch16")
def mae_vit_small_patch16_dec256d4b(**kwargs) -> MaskedAutoencoderViT:
    """ViT-S/16 encoder (384 wide, 12 deep, 6 heads), decoder 256 wide, 4 deep, 8 heads."""
    return _build(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                       decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8), kwargs)


@register(MODELS, "mae_vit_base_patch16")
def mae_vit_base_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    """ViT-B/16 encoder (768, 12, 12), decoder 512 wide, 8 deep, 16 heads."""
    return _build(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                       decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16), kwargs)


@register(MODELS, "mae_vit_large_patch16")
def mae_vit_large_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    """ViT-L/16 encoder (1024, 24, 16), decoder 512 wide, 8 deep, 16 heads."""
    return _build(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                       decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16), kwargs)


@register(MODELS, "mae_vit_huge_patch14")
def mae_vit_huge_patch14_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    """ViT-H/14 encoder (1280, 32, 16), decoder 512 wide, 8 deep, 16 heads."""
    return _build(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                       decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16), kwargs)


@register(MODELS, "mae_vit_giant_patch14")
def mae_vit_giant_patch14_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    """ViT-g/14 encoder (1408, 40, 16, MLP 6144), decoder 512 wide, 8 deep, 16 heads (MLP 2048)."""
    return _build(dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11,
                       decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_ratio=4), kwargs)


# set recommended archs: the aliases as module attributes, so that models_mae.__dict__[name] finds every name
# (tests/test_models_mae.py checks that these and the registry's aliases agree)
mae_vit_micro_patch4 = mae_vit_micro_patch4_dec64d2b
mae_vit_tiny_patch4 = mae_vit_tiny_patch4_dec128d4b
mae_vit_tiny_patch16 = mae_vit_tiny_patch16_dec128d4b
mae_vit_small_patch16 = mae_vit_small_patch16_dec256d4b
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b  # decoder: 512 dim, 8 blocks
mae_vit_giant_patch14 = mae_vit_giant_patch14_dec512d8b  # decoder: 512 dim, 8 blocks


def create_model(name: str, **kwargs) -> MaskedAutoencoderViT:
    """Build a registered MAE model by name; unknown names raise an error listing the choices."""
    return lookup(MODELS, name, "MAE")(**kwargs)


def model_names():
    """All registered MAE model names (constructors and aliases)."""
    return names(MODELS)
