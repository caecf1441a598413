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
from util.classification import classification_data, evaluate_once, train_and_evaluate
from util.lars import LARS
from util.logger import log
from util.precision import make_loss_scaler
from util.recipes import linprobe_recipe


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
    settings = runner.setup(args, "main_linprobe")
    device, m, data = settings.device, settings.model, settings.data

    model = runner.build_model(models_vit.create_model, m.model, num_classes=m.nb_classes,
                               global_pool=m.global_pool, img_size=data.input_size, in_chans=data.in_chans,
                               attn=settings.precision.attn, patch_embed=settings.precision.patch_embed)
    runner.check_input_size(data.input_size, model)
    data_loader_train, data_loader_val = classification_data(
        settings, linprobe_recipe(True, data.input_size, data.hflip, settings.crop_scale),
        linprobe_recipe(False, data.input_size))

    if m.finetune and not settings.ckpt.eval:
        load_pretrained(model, m.finetune, m.global_pool)
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
    if settings.ckpt.eval:
        runner.eval_weights(settings, model)

    model, model_without_ddp = runner.prepare_model(model, device, settings.dist.distributed,
                                                    settings.precision.compile)
    if settings.ckpt.eval:
        return evaluate_once(settings, model, model_without_ddp, data_loader_val)

    optimizer = LARS(model_without_ddp.head.parameters(), lr=settings.optim.lr,
                     weight_decay=settings.optim.weight_decay)
    log(optimizer)
    loss_scaler = make_loss_scaler(settings.precision.amp, device)
    criterion = torch.nn.CrossEntropyLoss()
    log("criterion = %s" % str(criterion))

    return train_and_evaluate(
        settings, model=model, model_without_ddp=model_without_ddp, optimizer=optimizer, loss_scaler=loss_scaler,
        criterion=criterion, data_loader_train=data_loader_train, data_loader_val=data_loader_val)


if __name__ == "__main__":
    sys.exit(cli.launch(main, cli.command_line_parser(get_args_parser()).parse_args()))
