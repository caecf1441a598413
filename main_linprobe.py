"""Linear probing of a pre-trained MAE encoder: a BatchNorm + linear head on frozen features.

References:
    MAE: https://arxiv.org/abs/2111.06377
    MoCo v3: https://github.com/facebookresearch/moco-v3
"""
import argparse
import sys

import torch
from timm.layers import trunc_normal_

import models_vit
import util.cli as cli
import util.runner as runner
from util.checkpoint import load_pretrained
from util.classification import classification_data, run_classification
from util.dali import linprobe_aug
from util.lars import LARS
from util.logger import log
from util.precision import make_loss_scaler
from util.transforms import LINPROBE_SCALE, crop_scale, linprobe_transform


def get_args_parser() -> argparse.ArgumentParser:
    """Linear-probing flags (reference names and defaults, plus ours)."""
    parser = argparse.ArgumentParser("MAE linear probing for image classification", add_help=False,
                                     description="Train a linear classifier on a frozen MAE encoder.")
    g = cli.add_common_args(
        parser, batch_size=512, epochs=90, model="vit_large_patch16", weight_decay=0.0, blr=0.1,
        min_lr=0.0, warmup_epochs=10, extra_groups=("classification",),
        model_help="name of the model to train (one of: " + ", ".join(models_vit.model_names()) + ")")
    cli.add_classification_args(g, global_pool=False)
    return parser


def main(args: argparse.Namespace) -> dict:
    """Train (or with --eval, evaluate) a linear classifier on frozen encoder features."""
    device = runner.setup(args, "main_linprobe")

    model = runner.build_model(models_vit.create_model, args.model, num_classes=args.nb_classes,
                               global_pool=args.global_pool, img_size=args.input_size, attn=args.attn,
                               patch_embed=args.patch_embed)
    runner.check_input_size(args.input_size, model)
    scale = crop_scale(args, LINPROBE_SCALE)
    dali_augs = (linprobe_aug(True, args.input_size, args.hflip, scale),
                 linprobe_aug(False, args.input_size)) \
        if args.data_loader == "dali" else None
    _, _, data_loader_train, data_loader_val = classification_data(
        # uint8 out of the loaders, normalised on the device (engine_finetune): same numbers, faster loading
        args, linprobe_transform(True, args.input_size, normalize=False, hflip=args.hflip, scale=scale),
        linprobe_transform(False, args.input_size, normalize=False), device, dali_augs)

    if args.finetune and not args.eval:
        load_pretrained(model, args.finetune, args.global_pool)
        # manually initialize fc layer: following MoCo v3
        trunc_normal_(model.head.weight, std=0.01)

    # for linear prob only: a BatchNorm without affine parameters in front of the head
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6),
                                     model.head)
    # freeze all but the head
    for _, p in model.named_parameters():
        p.requires_grad = False
    for _, p in model.head.named_parameters():
        p.requires_grad = True
    if args.eval:
        runner.eval_weights(args, model)

    model, model_without_ddp = runner.prepare_model(model, device, args.distributed, args.compile)

    optimizer = LARS(model_without_ddp.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    log(optimizer)
    loss_scaler = make_loss_scaler(args.amp, device)
    criterion = torch.nn.CrossEntropyLoss()
    log("criterion = %s" % str(criterion))

    return run_classification(
        args, model=model, model_without_ddp=model_without_ddp, optimizer=optimizer, loss_scaler=loss_scaler,
        criterion=criterion, device=device, data_loader_train=data_loader_train,
        data_loader_val=data_loader_val, mixup_fn=None, max_norm=None)


if __name__ == "__main__":
    sys.exit(cli.launch(main, cli.command_line_parser(get_args_parser()).parse_args()))
