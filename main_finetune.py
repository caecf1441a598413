"""Fine-tuning a pre-trained MAE encoder for image classification.

References:
    MAE: https://arxiv.org/abs/2111.06377
    DeiT: https://github.com/facebookresearch/deit
    BEiT: https://github.com/microsoft/unilm/tree/master/beit
"""
import argparse
import sys

import torch
from timm.data.mixup import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
import util.cli as cli
import util.lr_decay as lrd
import util.perf as perf
import util.runner as runner
from util.checkpoint import load_pretrained
from util.classification import classification_data, evaluate_once, train_and_evaluate
from util.config import AugmentSettings, Settings
from util.errors import UserError
from util.logger import log
from util.precision import make_loss_scaler
from util.recipes import Recipe, eval_recipe, finetune_recipe


def get_args_parser() -> argparse.ArgumentParser:
    """Fine-tuning flags (reference names and defaults, plus ours)."""
    parser = argparse.ArgumentParser("MAE fine-tuning for image classification", add_help=False,
                                     description="Fine-tune a pre-trained MAE encoder for image classification.")
    g = cli.add_common_args(
        parser, batch_size=64, epochs=50, model="vit_large_patch16", weight_decay=0.05, blr=1e-3,
        min_lr=1e-6, warmup_epochs=5, extra_groups=("augmentation", "random erase", "mixup", "classification"),
        model_help="name of the model to train (one of: " + ", ".join(models_vit.model_names()) + ")")
    g["model"].add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="drop path rate")
    g["optimizer"].add_argument("--clip_grad", type=float, default=None, metavar="NORM",
                                help="clip the gradient norm to NORM (default: no clipping)")
    g["optimizer"].add_argument("--layer_decay", type=float, default=0.75,
                                help="layer-wise lr decay (from ELECTRA / BEiT)")
    g["model"].add_argument("--finetune_blocks", type=int, default=None, metavar="K",
                            help="partial fine-tuning (paper Fig. 9): train only the last K blocks, the final norm "
                                 "and the head (default: every block, as the reference)")

    aug = g["augmentation"]
    aug.add_argument("--color_jitter", type=float, default=None, metavar="PCT",
                     help="color jitter factor (used only without Auto/RandAugment)")
    aug.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                     help='AutoAugment / RandAugment policy, e.g. "v0", "original" or a rand-... string')
    aug.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")

    erase = g["random erase"]
    erase.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erase probability")
    erase.add_argument("--remode", type=str, default="pixel", help='random erase mode ("pixel", "rand", "const")')
    erase.add_argument("--recount", type=int, default=1, help="random erase count")
    erase.add_argument("--resplit", action="store_true", default=False,
                       help="do not random-erase the first (clean) augmentation split")

    mix = g["mixup"]
    mix.add_argument("--mixup", type=float, default=0, help="mixup alpha; mixup is on when > 0")
    mix.add_argument("--cutmix", type=float, default=0, help="cutmix alpha; cutmix is on when > 0")
    mix.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                     help="cutmix min/max ratio; overrides alpha and turns cutmix on when set")
    mix.add_argument("--mixup_prob", type=float, default=1.0,
                     help="probability of performing mixup or cutmix when either/both is on")
    mix.add_argument("--mixup_switch_prob", type=float, default=0.5,
                     help="probability of switching to cutmix when both mixup and cutmix are on")
    mix.add_argument("--mixup_mode", type=str, default="batch",
                     help='how to apply mixup/cutmix params: per "batch", "pair" or "elem"')

    cli.add_scaling_args(g["ours"])
    cli.add_classification_args(g, global_pool=True)
    return parser


def build_mixup(augment: AugmentSettings, batch_size: int, nb_classes: int):
    """timm Mixup/CutMix (label smoothing inside) when enabled, else None."""
    a = augment
    mixup_active = a.mixup > 0 or a.cutmix > 0. or a.cutmix_minmax is not None
    if not mixup_active:
        return None
    if batch_size % 2:
        raise UserError(f"mixup/cutmix need an even --batch_size, got {batch_size}")
    log("Mixup is activated!")
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, cutmix_minmax=a.cutmix_minmax,
                 prob=a.mixup_prob, switch_prob=a.mixup_switch_prob, mode=a.mixup_mode,
                 label_smoothing=a.smoothing, num_classes=nb_classes)


def train_recipe(settings: Settings) -> Recipe:
    """The fine-tuning augmentation of these settings (util/recipes.py), for either loader."""
    a = settings.augment
    return finetune_recipe(settings.data.input_size, a.aa, a.color_jitter, a.reprob, a.remode, a.recount,
                           settings.data.hflip, settings.crop_scale)


def main(args: argparse.Namespace) -> dict:
    """Fine-tune (or with --eval, evaluate) a ViT on args.data_path/{train,val}."""
    settings = runner.setup(args, "main_finetune")
    device, m, data = settings.device, settings.model, settings.data

    model = runner.build_model(models_vit.create_model, m.model, num_classes=m.nb_classes,
                               drop_path_rate=m.drop_path, global_pool=m.global_pool, img_size=data.input_size,
                               in_chans=data.in_chans, attn=settings.precision.attn,
                               patch_embed=settings.precision.patch_embed)
    runner.check_input_size(data.input_size, model)
    # the training augmentation only when training: an --aa that DALI cannot run must not stop an --eval run
    data_loader_train, data_loader_val = classification_data(
        settings, None if settings.ckpt.eval else train_recipe(settings), eval_recipe(data.input_size))
    mixup_fn = build_mixup(settings.augment, data.batch_size, m.nb_classes)

    if m.finetune and not settings.ckpt.eval:
        load_pretrained(model, m.finetune, m.global_pool)
        # manually initialize fc layer
        trunc_normal_(model.head.weight, std=2e-5)
    elif settings.ckpt.eval:
        runner.eval_weights(settings, model)
    if m.finetune_blocks is not None:
        try:
            model.train_last_blocks(m.finetune_blocks)
        except ValueError as e:
            raise UserError(f"--finetune_blocks {m.finetune_blocks}: {e}") from None
        log(f"Partial fine-tuning: the last {m.finetune_blocks} blocks, the final norm and the head train")

    p, optim = settings.precision, settings.optim
    model, model_without_ddp = runner.prepare_model(model, device, settings.dist.distributed, p.compile,
                                                    fsdp=settings.dist.fsdp, amp=p.amp,
                                                    grad_checkpointing=p.grad_checkpointing)
    if settings.ckpt.eval:
        return evaluate_once(settings, model, model_without_ddp, data_loader_val)

    # build optimizer with layer-wise lr decay (lrd)
    param_groups = lrd.param_groups_lrd(model_without_ddp, optim.weight_decay,
                                        no_weight_decay_list=model_without_ddp.no_weight_decay(),
                                        layer_decay=optim.layer_decay)
    optimizer = perf.adamw(param_groups, optim.lr, device)
    loss_scaler = make_loss_scaler(p.amp, device)

    if mixup_fn is not None:
        # smoothing is handled with mixup label transform
        criterion = SoftTargetCrossEntropy()
    elif settings.augment.smoothing > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=settings.augment.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    log("criterion = %s" % str(criterion))

    return train_and_evaluate(
        settings, model=model, model_without_ddp=model_without_ddp, optimizer=optimizer, loss_scaler=loss_scaler,
        criterion=criterion, data_loader_train=data_loader_train, data_loader_val=data_loader_val,
        mixup_fn=mixup_fn, max_norm=optim.clip_grad)


if __name__ == "__main__":
    sys.exit(cli.launch(main, cli.command_line_parser(get_args_parser()).parse_args()))
