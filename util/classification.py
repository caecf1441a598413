"""Fine-tuning and linear probing around engine_finetune: data and loaders, then --eval or the epoch loop."""
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from engine_finetune import evaluate, train_one_epoch
from util.dali import DaliAug, make_eval_loader
from util.datasets import ImageFolder, build_dataset, check_same_classes
from util.errors import UserError
from util.logger import log
from util.resume import restore
from util.runner import epochs_left, position_in_epoch, start_run, tensorboard_writer, train_loader, train_loop


def classification_data(args: Any, train_transform: Callable, val_transform: Callable, device: torch.device,
                        dali_augs: Optional[Tuple[DaliAug, DaliAug]] = None
                        ) -> Tuple[ImageFolder, ImageFolder, Optional[DataLoader], DataLoader]:
    """Train/val ImageFolders and their loaders (no training loader with --eval); checks that both splits hold
    the same class folders (or every label after a difference would shift) and --nb_classes.

    The torch loaders apply the transforms; with --data_loader dali, `dali_augs` (training, validation)
    say what the DALI pipelines do instead.
    """
    dataset_train = build_dataset(True, args, transform=train_transform)
    dataset_val = build_dataset(False, args, transform=val_transform)
    log(dataset_train)
    log(dataset_val)
    check_same_classes(dataset_train, dataset_val)
    n_found = len(dataset_train.classes)
    if args.nb_classes < n_found:
        raise UserError(f"--nb_classes {args.nb_classes} is smaller than the {n_found} class folders in "
                        f"{dataset_train.root}; use --nb_classes {n_found}")
    kind = getattr(args, "data_loader", "torch")
    train_aug, val_aug = dali_augs or (None, None)
    loader_train = None if args.eval else train_loader(args, dataset_train, train_aug, device)
    loader_val = make_eval_loader(kind, dataset_val, val_aug, args.batch_size, args.num_workers, args.pin_mem,
                                  args.dist_eval, device)
    return dataset_train, dataset_val, loader_train, loader_val


def run_classification(args: Any, *, model: torch.nn.Module, model_without_ddp: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, loss_scaler: Any, criterion: torch.nn.Module,
                       device: torch.device, data_loader_train: Optional[DataLoader],
                       data_loader_val: DataLoader, mixup_fn: Any = None,
                       max_norm: Optional[float] = None) -> Dict[str, float]:
    """Resume, then either --eval once or train with evaluation every epoch; return the last test stats."""
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    log("number of params (M): %.2f" % (n_parameters / 1.e6))
    resumed = restore(args, model_without_ddp, optimizer, loss_scaler)
    position = None if args.eval else position_in_epoch(resumed, data_loader_train.dataset, args)
    del resumed  # the position is all the loop needs: do not hold the checkpoint's tensors
    n_val = len(data_loader_val.dataset)

    def eval_epoch() -> Dict[str, float]:
        test_stats = evaluate(data_loader_val, model, device, amp=args.amp)
        log(f"Accuracy of the network on the {n_val} test images: {test_stats['acc1']:.1f}%")
        return test_stats

    if args.eval:
        return eval_epoch()

    start_run(args)
    log_writer = tensorboard_writer(args.log_dir, args.start_epoch, position, len(data_loader_train),
                                    enabled=epochs_left(args) > 0)
    state = {"max_accuracy": 0.0, "last": {}}

    def eval_and_track(epoch: int) -> Dict[str, float]:
        test_stats = eval_epoch()
        state["max_accuracy"] = max(state["max_accuracy"], test_stats["acc1"])
        log(f"Max accuracy: {state['max_accuracy']:.2f}%")
        if log_writer is not None:
            log_writer.add_scalar("perf/test_acc1", test_stats["acc1"], epoch)
            log_writer.add_scalar("perf/test_acc5", test_stats["acc5"], epoch)
            log_writer.add_scalar("perf/test_loss", test_stats["loss"], epoch)
        state["last"] = test_stats
        return test_stats

    train_loop(
        args, model=model, model_without_ddp=model_without_ddp, optimizer=optimizer, loss_scaler=loss_scaler,
        data_loader_train=data_loader_train,
        train_one_epoch=lambda epoch, **resume: train_one_epoch(model, criterion, data_loader_train, optimizer,
                                                                device, epoch, loss_scaler, max_norm, mixup_fn,
                                                                log_writer=log_writer, args=args, **resume),
        evaluate=eval_and_track, log_writer=log_writer, numbered_every=1,
        extra_log={"n_parameters": n_parameters}, position=position)
    if log_writer is not None:
        log_writer.close()
    return state["last"]
