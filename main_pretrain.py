"""MAE pre-training entry point.

References:
    MAE: https://arxiv.org/abs/2111.06377
    DeiT: https://github.com/facebookresearch/deit
"""
import argparse
import sys

import torch
from timm.optim import param_groups_weight_decay

import models_mae
import util.cli as cli
import util.perf as perf
import util.runner as runner
from engine_pretrain import train_one_epoch
from util.dali import pretrain_aug
from util.datasets import build_dataset
from util.errors import UserError
from util.knn import encoder_features, knn_evaluate, knn_loaders
from util.logger import log
from util.precision import make_loss_scaler
from util.resume import restore
from util.masking import MASK_TYPES, check_mask_type
from util.transforms import PRETRAIN_AUGS, PRETRAIN_SCALE, crop_scale, eval_transform, pretrain_transform
from util.visualize import draw_reconstructions, reconstruct


def get_args_parser() -> argparse.ArgumentParser:
    """Pre-training flags (reference names and defaults, plus ours)."""
    parser = argparse.ArgumentParser("MAE pre-training", add_help=False,
                                     description="Pre-train a masked autoencoder on an ImageFolder.")
    g = cli.add_common_args(
        parser, batch_size=64, epochs=400, model="mae_vit_large_patch16", weight_decay=0.05,
        blr=1e-3, min_lr=0.0, warmup_epochs=40,
        model_help="name of the model to train (one of: " + ", ".join(models_mae.model_names()) + ")",
        extra_groups=("ablations",))
    g["model"].add_argument("--mask_ratio", default=0.75, type=float,
                            help="masking ratio (fraction of removed patches)")
    g["model"].add_argument("--norm_pix_loss", action="store_true",
                            help="use (per-patch) normalized pixels as targets for computing the loss")
    parser.set_defaults(norm_pix_loss=False)
    ablation = g["ablations"]
    ablation.add_argument("--mask_type", default="random", choices=MASK_TYPES,
                          help="which patches are removed (paper Table 1f): random (the reference), block "
                               "(BEiT-style rectangles) or grid (the top-left patch of every 2x2 cell stays; "
                               "--mask_ratio 0.75 only)")
    ablation.add_argument("--decoder_embed_dim", default=None, type=int,
                          help="decoder width (Table 1b; default: the model's, 512 for base/large/huge)")
    ablation.add_argument("--decoder_depth", default=None, type=int,
                          help="decoder blocks (Table 1a; default: the model's, 8 for base/large/huge)")
    ablation.add_argument("--decoder_num_heads", default=None, type=int,
                          help="decoder attention heads (default: the model's, 16 for base/large/huge)")
    ablation.add_argument("--encoder_mask_token", action="store_true",
                          help="the encoder sees every patch, a learned mask token in place of the removed ones "
                               "(Table 1c, 'w/ [M]'; slower and worse, to reproduce that row)")
    ablation.add_argument("--loss_on_visible", action="store_true",
                          help="average the loss over every patch, not only the removed ones")
    g["ours"].add_argument("--knn_freq", default=0, type=int, metavar="N",
                           help="k-NN evaluation of the encoder (class token, k 20, DINO's weighting) every N epochs "
                                "and at the last; 0 turns it off")
    g["ours"].add_argument("--knn_data_path", default=None,
                           help="ImageFolder with train/ and val/ for --knn_freq (default: --data_path)")
    g["ours"].add_argument("--knn_max_train", default=10000, type=int, metavar="N",
                           help="use at most N training images (a fixed random subset) for --knn_freq")
    ablation.add_argument("--pretrain_aug", default="crop_rand", choices=PRETRAIN_AUGS,
                          help="pre-training augmentation (Table 1e): none, crop_fixed, crop_rand (the reference: "
                               "random resized crop 0.2-1 + flip), crop_rand_color (+ color jitter); see PRETRAIN.md")
    cli.add_scaling_args(g["ours"])
    g["ours"].add_argument("--save_freq", default=20, type=int, metavar="N",
                           help="write checkpoint-{epoch}.pth every N epochs (and at the last); "
                                "checkpoint-last.pth is written every epoch")
    g["ours"].add_argument("--vis_freq", default=20, type=int, metavar="N",
                           help="log reconstructions of 8 fixed training images to TensorBoard every N epochs "
                                "(and at the last); 0 turns it off")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Pre-training flag values that cannot work."""
    if not 0.0 <= args.mask_ratio < 1.0:
        raise UserError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.save_freq < 1:
        raise UserError(f"--save_freq must be at least 1, got {args.save_freq}")
    if args.knn_freq < 0 or args.knn_max_train < 1:
        raise UserError(f"--knn_freq must be 0 (off) or more and --knn_max_train at least 1, got "
                        f"{args.knn_freq} and {args.knn_max_train}")
    if args.vis_freq < 0:
        raise UserError(f"--vis_freq must be 0 (off) or more, got {args.vis_freq}")
    if args.fsdp and args.knn_freq:
        raise UserError("--knn_freq is not supported with --fsdp (the encoder is sharded); drop --knn_freq and run "
                        "main_knn.py on a checkpoint instead")
    for flag in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.decoder_embed_dim and args.decoder_num_heads and args.decoder_embed_dim % args.decoder_num_heads:
        raise UserError(f"--decoder_embed_dim {args.decoder_embed_dim} is not divisible by --decoder_num_heads "
                        f"{args.decoder_num_heads}")


def resolve_decoder(args: argparse.Namespace) -> None:
    """--decoder_embed_dim / --decoder_depth / --decoder_num_heads left to the model's defaults, read from the
    model built on the meta device (no memory, no random draws): args.json records what runs."""
    if all(getattr(args, k) is not None for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")):
        return
    with torch.device("meta"):
        probe = runner.build_model(models_mae.create_model, args.model)
    defaults = dict(decoder_embed_dim=probe.decoder_embed.out_features, decoder_depth=len(probe.decoder_blocks),
                    decoder_num_heads=probe.decoder_blocks[0].attn.num_heads)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def fixed_images(dataset, input_size: int, n: int = 8) -> torch.Tensor:
    """n training images spread over the set, resized and center-cropped (no random augmentation)."""
    transform = eval_transform(input_size)
    step = max(len(dataset) // n, 1)
    picks = list(range(0, len(dataset), step))[:n]
    return torch.stack([transform(dataset.load(i)[0]) for i in picks])


def log_reconstructions(log_writer, model: torch.nn.Module, images: torch.Tensor, epoch: int,
                        mask_ratio: float, device: torch.device) -> None:
    """Write the original | masked | reconstruction | pasted figure to TensorBoard as 'reconstruction'."""
    figure = draw_reconstructions(reconstruct(model, images.to(device), mask_ratio=mask_ratio, seed=0), mask_ratio)
    log_writer.add_image("reconstruction", figure.pixels, epoch, dataformats="HWC")


def main(args: argparse.Namespace) -> None:
    """Pre-train an MAE on the ImageFolder at args.data_path/train."""
    check_args(args)
    resolve_decoder(args)
    device = runner.setup(args, "main_pretrain")

    # define the model first: a wrong name or size fails before any data is read
    decoder = {k: getattr(args, k) for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
               if getattr(args, k) is not None}
    model = runner.build_model(models_mae.create_model, args.model, norm_pix_loss=args.norm_pix_loss,
                               img_size=args.input_size, attn=args.attn, patch_embed=args.patch_embed,
                               mask_type=args.mask_type, encoder_mask_token=args.encoder_mask_token,
                               loss_on_visible=args.loss_on_visible, **decoder)
    runner.check_input_size(args.input_size, model)
    try:
        check_mask_type(args.mask_type, args.mask_ratio, model.patch_embed.grid_size)
    except ValueError as e:
        raise UserError(f"--mask_type {args.mask_type}: {e}") from None

    # uint8 out of the loader, normalised on the device (engine_pretrain): same numbers, faster loading
    scale = crop_scale(args, PRETRAIN_SCALE)
    dataset_train = build_dataset(True, args, transform=pretrain_transform(
        args.input_size, normalize=False, aug=args.pretrain_aug, hflip=args.hflip, scale=scale))
    log(dataset_train)
    dali_aug = pretrain_aug(args.input_size, args.pretrain_aug, args.hflip, scale) \
        if args.data_loader == "dali" else None
    data_loader_train = runner.train_loader(args, dataset_train, dali_aug, device)

    model, model_without_ddp = runner.prepare_model(model, device, args.distributed, args.compile, fsdp=args.fsdp,
                                                    amp=args.amp, grad_checkpointing=args.grad_checkpointing)

    # following timm: set wd as 0 for bias and norm layers
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = perf.adamw(param_groups, args.lr, device, betas=(0.9, 0.95))
    log(optimizer)
    loss_scaler = make_loss_scaler(args.amp, device)

    position = runner.position_in_epoch(restore(args, model_without_ddp, optimizer, loss_scaler), dataset_train, args)
    runner.start_run(args)
    log_writer = runner.tensorboard_writer(args.log_dir, args.start_epoch, position, len(data_loader_train),
                                           enabled=runner.epochs_left(args) > 0)

    if args.fsdp and args.vis_freq and log_writer is not None:
        log("Reconstructions are not drawn during --fsdp training (the model is sharded); "
            "demo/mae_visualize.py draws them from a checkpoint")
    vis_images = fixed_images(dataset_train, args.input_size) \
        if log_writer is not None and args.vis_freq and not args.fsdp else None
    knn = knn_loaders(args.knn_data_path or args.data_path, args.input_size, args.batch_size, args.num_workers,
                      args.pin_mem, args.knn_max_train, args.strict_data) if args.knn_freq else None

    def knn_monitor(epoch: int) -> dict:
        if knn is None or (epoch % args.knn_freq and epoch + 1 != args.epochs):
            return {}
        model_without_ddp.eval()
        (top1, top5), = knn_evaluate(encoder_features(model_without_ddp, global_pool=False), *knn, device, [20],
                                     amp=args.amp).values()
        model_without_ddp.train()
        if log_writer is not None:
            log_writer.add_scalar("knn_acc1", top1, epoch)
            log_writer.add_scalar("knn_acc5", top5, epoch)
        return {"knn_acc1": top1, "knn_acc5": top5}

    def train_and_show(epoch: int, **resume) -> dict:
        stats = train_one_epoch(model, data_loader_train, optimizer, device, epoch, loss_scaler,
                                log_writer=log_writer, args=args, **resume)
        if vis_images is not None and (epoch % args.vis_freq == 0 or epoch + 1 == args.epochs):
            log_reconstructions(log_writer, model_without_ddp, vis_images, epoch, args.mask_ratio, device)
        return stats

    runner.train_loop(
        args, model=model, model_without_ddp=model_without_ddp, optimizer=optimizer,
        loss_scaler=loss_scaler, data_loader_train=data_loader_train, train_one_epoch=train_and_show,
        log_writer=log_writer, numbered_every=args.save_freq, position=position, monitor=knn_monitor)
    if log_writer is not None:
        log_writer.close()


if __name__ == "__main__":
    sys.exit(cli.launch(main, cli.command_line_parser(get_args_parser()).parse_args()))
