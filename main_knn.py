"""k-NN classification with the frozen features of a pre-trained (or fine-tuned) MAE encoder.

    python main_knn.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth --data_path ${IMAGENET_DIR}

Under torchrun every process extracts the features of its shard of train/ and val/ (each image once), and
the shards are gathered before the vote.

References:
    DINO: https://github.com/facebookresearch/dino (eval_knn.py: the protocol)
    MAE: https://arxiv.org/abs/2111.06377
"""
import argparse
import json
import os
import sys

import models_vit
import util.cli as cli
import util.runner as runner
from util.checkpoint import load_pretrained
from util.distributed import is_main_process
from util.errors import UserError
from util.knn import knn_evaluate, knn_ks, knn_loaders
from util.logger import log

KNN_LOG = "knn_log.txt"  # one line per evaluation, appended


def get_args_parser() -> argparse.ArgumentParser:
    """k-NN flags (the reference's style; defaults as DINO's k-NN evaluation)."""
    parser = argparse.ArgumentParser("MAE k-NN evaluation", add_help=False,
                                     description="k-NN classification (DINO's protocol) with a frozen encoder.")
    g = cli.add_common_args(
        parser, batch_size=128, model="vit_large_patch16", extra_groups=("k-NN",), training=False,
        model_help="name of the ViT whose encoder is evaluated (one of: " + ", ".join(models_vit.model_names()) + ")")
    knn = g["k-NN"]
    knn.add_argument("--finetune", default="", help="the checkpoint to evaluate: pre-training or fine-tuning; ours, "
                                                    "the reference's, timm's or Hugging Face's")
    knn.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int, metavar="K",
                     help="numbers of nearest neighbours to evaluate")
    knn.add_argument("--temperature", default=0.07, type=float, help="vote weight exp(cosine similarity / T)")
    knn.add_argument("--global_pool", action="store_true",
                     help="features: the mean of the patch tokens (then fc_norm where the checkpoint has one)")
    knn.add_argument("--cls_token", action="store_false", dest="global_pool",
                     help="features: the class token after the final norm (the default, as in linear probing)")
    knn.set_defaults(global_pool=False)
    return parser


def main(args: argparse.Namespace) -> dict:
    """Evaluate --finetune's encoder by k-NN on --data_path/{train,val}; return {k: (top1, top5)}."""
    if not args.finetune:
        raise UserError("--finetune is required: the checkpoint whose encoder is evaluated")
    try:
        ks = knn_ks(args.nb_knn)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.temperature <= 0:
        raise UserError(f"--temperature must be more than 0, got {args.temperature}")
    settings = runner.setup(args, "main_knn")
    device, m, data = settings.device, settings.model, settings.data

    model = runner.build_model(models_vit.create_model, m.model, num_classes=0, global_pool=m.global_pool,
                               in_chans=data.in_chans,
                               img_size=data.input_size, attn=settings.precision.attn,
                               patch_embed=settings.precision.patch_embed)
    runner.check_input_size(data.input_size, model)
    load_pretrained(model, m.finetune, m.global_pool)
    model.to(device).eval()

    train_loader, val_loader = knn_loaders(data.data_path, data.input_size, data.batch_size, data.num_workers,
                                           data.pin_mem, device, strict=data.strict_data,
                                           image_column=data.image_column, label_column=data.label_column,
                                           in_chans=data.in_chans, mean=data.mean, std=data.std)
    log(f"k-NN on {len(train_loader.dataset)} training and {len(val_loader.dataset)} validation images")
    results = knn_evaluate(model, train_loader, val_loader, device, ks, settings.knn.temperature,
                           settings.precision.amp)
    output_dir = settings.ckpt.output_dir
    if output_dir and is_main_process():  # its own file: --output_dir may hold a training run
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, KNN_LOG), "a") as f:
            f.write(json.dumps({"checkpoint": m.finetune, **{f"{k}nn_top1": r[0] for k, r in results.items()},
                                **{f"{k}nn_top5": r[1] for k, r in results.items()}}) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(cli.launch(main, cli.command_line_parser(get_args_parser()).parse_args()))
