"""One pre-training step, in one process (batch 2b) or under torchrun (batch b per process).

Run by tests/test_main_pretrain.py; rank 0 writes to argv[1] {"weights": the state dict after the step,
"grads": the gradient of every trainable parameter that the AdamW step applied (reduced over processes)}.
Masks come from a fixed function of each image, so both layouts mask the same patches.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models_mae  # noqa: E402
import util.misc as misc  # noqa: E402
from engine_pretrain import train_one_epoch  # noqa: E402
from util.runner import wrap_model  # noqa: E402

PER_PROCESS = 3


class ContentMaskedMAE(models_mae.MaskedAutoencoderViT):
    """Masks are chosen from the image content, not from the random stream."""

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        noise = self.patchify(imgs).sum(-1)  # [N, L], a fixed function of each sample
        return super().forward(imgs, mask_ratio, noise=noise)


def init_model() -> ContentMaskedMAE:
    """The model both layouts start from (seeded)."""
    torch.manual_seed(0)
    return ContentMaskedMAE(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def main(out_path: str) -> None:
    args = argparse.Namespace(device="cpu", dist_url="env://", dist_on_itp=False, dist_timeout=5)
    misc.init_distributed_mode(args)
    world, rank = misc.get_world_size(), misc.get_rank()

    g = torch.Generator().manual_seed(123)
    images = torch.randn(2 * PER_PROCESS, 3, 32, 32, generator=g)
    n = images.shape[0] // world
    local = images[rank * n:(rank + 1) * n]

    model = init_model()
    model_without_ddp = model
    model = wrap_model(model, torch.device("cpu"), args.distributed, compile=False)
    optimizer = torch.optim.AdamW(model_without_ddp.parameters(), lr=1e-3, betas=(0.9, 0.95))
    grads = {}

    def keep_gradients(_optimizer, _args, _kwargs):  # at the step, before the update
        grads.update({name: p.grad.detach().clone() for name, p in model_without_ddp.named_parameters()
                      if p.grad is not None})

    optimizer.register_step_pre_hook(keep_gradients)
    targs = argparse.Namespace(accum_iter=1, mask_ratio=0.75, lr=1e-3, min_lr=0.0, warmup_epochs=0,
                               epochs=1, amp="none", print_freq=1)
    loader = [(local, torch.zeros(n, dtype=torch.long))]
    train_one_epoch(model, loader, optimizer, torch.device("cpu"), 0,
                    misc.NativeScalerWithGradNormCount("cpu", enabled=False), args=targs)
    if rank == 0:
        torch.save({"weights": model_without_ddp.state_dict(), "grads": grads}, out_path)
    if args.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
