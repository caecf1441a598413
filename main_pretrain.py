"""MAE pre-training entry point.

References:
    MAE: https://arxiv.org/abs/2111.06377
    DeiT: https://github.com/facebookresearch/deit
"""
import argparse
import sys
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import param_groups_weight_decay

import models_mae
import util.cli as cli
import util.loaders as loaders
import util.perf as perf
import util.runner as runner
from engine_pretrain import train_one_epoch
from util.config import ModelSettings, Settings, settings_from_flags
from util.sources import open_split
from util.distributed import is_main_process
from util.errors import DataError, UserError
from util.flag_checks import check_pretrain_flags
from util.knn import encoder_features, knn_evaluate, knn_loaders
from util.logger import log
from util.masking import MASK_TYPES, check_mask_type
from util.online_probe import STATE_KEY as PROBE_KEY, OnlineProbe
from util.precision import make_loss_scaler
from util.recipes import PRETRAIN_AUGS, eval_recipe, pretrain_recipe
from util.transforms import torch_transform
from util.visualize import draw_reconstructions, reconstruct, shown_channels


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
    g["ours"].add_argument("--online_probe", action="store_true",
                           help="train a linear probe (BatchNorm + linear, its own AdamW) on the detached class token "
                                "of each training forward, and log its train and val top-1 every epoch "
                                "(labelled data only; see PRETRAIN.md)")
    g["ours"].add_argument("--probe_lr", default=1e-3, type=float, help="the online probe's AdamW learning rate")
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
    g["ours"].add_argument("--vis_channels", default="",
                           help="what the reconstructions show of images with other than 3 channels: three channel "
                                "numbers as an RGB composite (e.g. 3,2,1), or 'grey' for every channel in grey "
                                "(default: 1 channel grey, 3 as RGB, more: channels 0,1,2)")
    return parser


def decoder_sizes(m: ModelSettings) -> Dict[str, int]:
    """--decoder_embed_dim / --decoder_depth / --decoder_num_heads left to the model's defaults, read from the
    model built on the meta device (no memory, no random draws): args.json records what runs."""
    given = dict(decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                 decoder_num_heads=m.decoder_num_heads)
    if all(v is not None for v in given.values()):
        return given
    with torch.device("meta"):
        probe = runner.build_model(models_mae.create_model, m.model)
    defaults = dict(decoder_embed_dim=probe.decoder_embed.out_features, decoder_depth=len(probe.decoder_blocks),
                    decoder_num_heads=probe.decoder_blocks[0].attn.num_heads)
    return {k: defaults[k] if v is None else v for k, v in given.items()}


def fixed_images(dataset, input_size: int, n: int = 8, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """n training images spread over the set, resized and center-cropped (no random augmentation), normalised
    with mean and std."""
    transform = torch_transform(eval_recipe(input_size).normalized(mean, std).for_dataset(dataset), normalize=True)
    step = max(len(dataset) // n, 1)
    picks = list(range(0, len(dataset), step))[:n]
    return torch.stack([transform(dataset.load(i)[0]) for i in picks])


def log_reconstructions(log_writer, model: torch.nn.Module, images: torch.Tensor, epoch: int,
                        mask_ratio: float, device: torch.device, data: Optional[Any] = None,
                        channels: Union[str, Sequence[int], None] = None) -> None:
    """Write the original | masked | reconstruction | pasted figure to TensorBoard as 'reconstruction' (`data`:
    the DataSettings whose mean and std normalised the images; `channels`: util.visualize.shown_channels)."""
    stats = {} if data is None else {"mean": data.mean, "std": data.std}
    figure = draw_reconstructions(reconstruct(model, images.to(device), mask_ratio=mask_ratio, seed=0), mask_ratio,
                                  channels=channels, **stats)
    log_writer.add_image("reconstruction", figure.pixels, epoch, dataformats="HWC")


def knn_monitor(model: torch.nn.Module, knn: Tuple[Any, Any], settings: Settings, log_writer, epoch: int) -> dict:
    """k-NN top-1 / top-5 of the encoder's class token (k 20) on the --knn_data_path loaders."""
    model.eval()
    (top1, top5), = knn_evaluate(encoder_features(model, global_pool=False), *knn, settings.device, [20],
                                 amp=settings.precision.amp).values()
    model.train()
    if log_writer is not None:
        log_writer.add_scalar("knn_acc1", top1, epoch)
        log_writer.add_scalar("knn_acc5", top5, epoch)
    return {"knn_acc1": top1, "knn_acc5": top5}


def online_probe(settings: Settings, mae: torch.nn.Module, dataset_train: Any) -> Tuple[OnlineProbe, Any]:
    """--online_probe: the probe (attached to the MAE's encoder) and the validation loader it is measured on (None
    without a val split)."""
    data = settings.data
    if not dataset_train.classes:
        raise UserError(f"--online_probe needs labelled images (train/<class>/..., labelled shards or a Hugging "
                        f"Face dataset); {data.data_path} has none")
    probe = OnlineProbe(mae.cls_token.shape[-1], len(dataset_train.classes), settings.knn.probe_lr)
    probe.to(settings.device).attach(mae)
    try:
        dataset_val = open_split(data.data_path, "val", data.strict_data, image_column=data.image_column,
                                 label_column=data.label_column, in_chans=data.in_chans)
    except DataError:
        log("--online_probe: no val split in --data_path, only the training accuracy is logged")
        return probe, None
    loader = loaders.eval_loader("torch", dataset_val, eval_recipe(data.input_size).normalized(data.mean, data.std),
                                 data.batch_size, data.num_workers, data.pin_mem, dist_eval=True,
                                 device=settings.device, keep_workers=False)
    return probe, loader


def probe_monitor(probe: OnlineProbe, val_loader: Any, mae: torch.nn.Module, settings: Settings, log_writer,
                  epoch: int, train_stats: Dict[str, float]) -> Dict[str, float]:
    """The online probe's validation top-1 (log.txt 'probe_val_acc1'), and both accuracies to TensorBoard."""
    out = {}
    if val_loader is not None:
        out["probe_val_acc1"] = probe.evaluate(mae, val_loader, settings.device, settings.precision.amp)
        log(f"online probe: top-1 {train_stats['probe_acc1']:.1f}% on the training batches, "
            f"{out['probe_val_acc1']:.1f}% on the {len(val_loader.dataset)} validation images")
    if log_writer is not None:
        log_writer.add_scalar("probe_train_acc1", train_stats["probe_acc1"], epoch)
        for name, value in out.items():
            log_writer.add_scalar(name, value, epoch)
    return out


def main(args: argparse.Namespace) -> None:
    """Pre-train an MAE on the ImageFolder at args.data_path/train."""
    given = settings_from_flags(vars(args))
    check_pretrain_flags(given)
    settings = runner.setup(args, "main_pretrain", resolved=decoder_sizes(given.model))
    device, m, data, optim, ckpt = settings.device, settings.model, settings.data, settings.optim, settings.ckpt

    # define the model first: a wrong name or size fails before any data is read
    model = runner.build_model(models_mae.create_model, m.model, norm_pix_loss=m.norm_pix_loss,
                               img_size=data.input_size, in_chans=data.in_chans, attn=settings.precision.attn,
                               patch_embed=settings.precision.patch_embed, mask_type=m.mask_type,
                               encoder_mask_token=m.encoder_mask_token, loss_on_visible=m.loss_on_visible,
                               decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                               decoder_num_heads=m.decoder_num_heads)
    runner.check_input_size(data.input_size, model)
    try:
        check_mask_type(m.mask_type, m.mask_ratio, model.patch_embed.grid_size)
    except ValueError as e:
        raise UserError(f"--mask_type {m.mask_type}: {e}") from None

    dataset_train = open_split(data.data_path, "train", data.strict_data, unlabeled_ok=True,
                               image_column=data.image_column, label_column=data.label_column, in_chans=data.in_chans)
    log(dataset_train)
    recipe = pretrain_recipe(data.input_size, settings.augment.pretrain_aug, data.hflip,
                             settings.crop_scale).normalized(data.mean, data.std)
    data_loader_train = loaders.train_loader(data.data_loader, dataset_train, recipe, data.batch_size,
                                             data.num_workers, data.pin_mem, data.seed, device, optim.accum_iter)

    p = settings.precision
    model, model_without_ddp = runner.prepare_model(model, device, settings.dist.distributed, p.compile,
                                                    fsdp=settings.dist.fsdp, amp=p.amp,
                                                    grad_checkpointing=p.grad_checkpointing)

    # following timm: set wd as 0 for bias and norm layers
    param_groups = param_groups_weight_decay(model_without_ddp, optim.weight_decay)
    optimizer = perf.adamw(param_groups, optim.lr, device, betas=(0.9, 0.95))
    log(optimizer)
    loss_scaler = make_loss_scaler(p.amp, device)

    # what the epochs show, built before the run writes its first file: a missing k-NN folder fails here
    draws = bool(ckpt.vis_freq and ckpt.log_dir and is_main_process())  # TensorBoard is written by rank 0
    if settings.dist.fsdp and draws:
        log("Reconstructions are not drawn during --fsdp training (the model is sharded); "
            "demo/mae_visualize.py draws them from a checkpoint")
    channels = shown_channels(ckpt.vis_channels, data.in_chans)  # a wrong --vis_channels fails here
    vis_images = fixed_images(dataset_train, data.input_size, mean=data.mean, std=data.std) \
        if draws and not settings.dist.fsdp else None
    k = settings.knn
    knn = knn_loaders(k.knn_data_path or data.data_path, data.input_size, data.batch_size, data.num_workers,
                      data.pin_mem, device, k.knn_max_train, data.strict_data, data.image_column,
                      data.label_column, data.in_chans, data.mean, data.std) if k.knn_freq else None

    probe, probe_val = online_probe(settings, model_without_ddp, dataset_train) if k.online_probe else (None, None)

    run = runner.Run(settings, model, model_without_ddp, optimizer, loss_scaler, data_loader_train,
                     extras={PROBE_KEY: probe} if probe is not None else None)
    log_writer = run.log_writer
    if log_writer is None:
        vis_images = None  # nothing to draw into (a finished run's rerun)

    with run:
        for epoch in run.epochs():
            train_stats = train_one_epoch(model, data_loader_train, optimizer, device, epoch, loss_scaler,
                                          log_writer=log_writer, args=settings.args,
                                          position=run.position(epoch), stop=run, probe=probe)
            last = epoch + 1 == optim.epochs
            if vis_images is not None and (epoch % ckpt.vis_freq == 0 or last):
                log_reconstructions(log_writer, model_without_ddp, vis_images, epoch, m.mask_ratio, device, data,
                                    channels)
            monitored = knn_monitor(model_without_ddp, knn, settings, log_writer, epoch) \
                if knn is not None and (epoch % k.knn_freq == 0 or last) else {}
            if probe is not None:
                monitored.update(probe_monitor(probe, probe_val, model_without_ddp, settings, log_writer, epoch,
                                               train_stats))
            run.end_epoch(epoch, train_stats, monitored=monitored, numbered=epoch % ckpt.save_freq == 0)


if __name__ == "__main__":
    sys.exit(cli.launch(main, cli.command_line_parser(get_args_parser()).parse_args()))
