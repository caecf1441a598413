"""Fine-tuning and linear probing share these around engine_finetune: their data, and the epoch loop.

    data_loader_train, data_loader_val = classification_data(settings, train_recipe, val_recipe)
    ...  # the entry point builds its model, optimizer, loss scaler and criterion
    return train_and_evaluate(settings, ...)   # or, with --eval, evaluate_once(settings, ...)
"""
from typing import Any, Dict, Optional, Tuple

import torch

import util.loaders as loaders
from engine_finetune import evaluate, train_one_epoch
from util.config import Settings
from util.datasets import ImageFolder, check_same_classes
from util.errors import UserError
from util.logger import log
from util.recipes import Recipe
from util.resume import restore
from util.runner import Run
from util.sources import open_split


def classification_data(settings: Settings, train_recipe: Optional[Recipe], val_recipe: Recipe
                        ) -> Tuple[Optional[Any], Any]:
    """The training loader (None with --eval) and the validation loader of data_path/{train,val}, each rendering
    its stage's recipe with --data_loader; checks that both splits hold the same class folders (or every label
    after a difference would shift) and --nb_classes."""
    data, device = settings.data, settings.device
    dataset_train, dataset_val = (open_split(data.data_path, split, data.strict_data, image_column=data.image_column,
                                             label_column=data.label_column, in_chans=data.in_chans)
                                  for split in ("train", "val"))
    log(dataset_train)
    log(dataset_val)
    check_same_classes(dataset_train, dataset_val)
    n_found = len(dataset_train.classes)
    if settings.model.nb_classes < n_found:
        what = "class folders" if isinstance(dataset_train, ImageFolder) else "classes"
        raise UserError(f"--nb_classes {settings.model.nb_classes} is smaller than the {n_found} {what} in "
                        f"{dataset_train.root}; use --nb_classes {n_found}")
    loader_train = None
    if not settings.ckpt.eval:
        train_recipe = train_recipe.normalized(data.mean, data.std)
        loader_train = loaders.train_loader(data.data_loader, dataset_train, train_recipe, data.batch_size,
                                            data.num_workers, data.pin_mem, data.seed, device,
                                            settings.optim.accum_iter)
    loader_val = loaders.eval_loader(data.data_loader, dataset_val, val_recipe.normalized(data.mean, data.std),
                                     data.batch_size, data.num_workers,
                                     data.pin_mem, data.dist_eval, device)
    return loader_train, loader_val


def _evaluate(settings: Settings, model: torch.nn.Module, data_loader_val: Any) -> Dict[str, float]:
    test_stats = evaluate(data_loader_val, model, settings.device, amp=settings.precision.amp)
    log(f"Accuracy of the network on the {len(data_loader_val.dataset)} test images: {test_stats['acc1']:.1f}%")
    return test_stats


def _count_parameters(model: torch.nn.Module) -> int:
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log("number of params (M): %.2f" % (n_parameters / 1.e6))
    return n_parameters


def evaluate_once(settings: Settings, model: torch.nn.Module, model_without_ddp: torch.nn.Module,
                  data_loader_val: Any) -> Dict[str, float]:
    """--eval: load --resume (when given; --finetune was loaded by the entry point) and evaluate."""
    _count_parameters(model_without_ddp)
    restore(settings.ckpt.resume, True, model_without_ddp, None, None)
    return _evaluate(settings, model, data_loader_val)


def train_and_evaluate(settings: Settings, *, model: torch.nn.Module, model_without_ddp: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, loss_scaler: Any, criterion: torch.nn.Module,
                       data_loader_train: Any, data_loader_val: Any, mixup_fn: Any = None,
                       max_norm: Optional[float] = None) -> Dict[str, float]:
    """The epochs of fine-tuning or linear probing: train, evaluate, log, save; return the last test stats."""
    device = settings.device
    n_parameters = _count_parameters(model_without_ddp)
    run = Run(settings, model, model_without_ddp, optimizer, loss_scaler, data_loader_train,
              extra_log={"n_parameters": n_parameters})
    log_writer = run.log_writer
    max_accuracy, test_stats = 0.0, {}
    with run:
        for epoch in run.epochs():
            train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch, loss_scaler,
                                          max_norm, mixup_fn, log_writer=log_writer, args=settings.args,
                                          position=run.position(epoch), stop=run)
            test_stats = _evaluate(settings, model, data_loader_val)
            max_accuracy = max(max_accuracy, test_stats["acc1"])
            log(f"Max accuracy: {max_accuracy:.2f}%")
            if log_writer is not None:
                log_writer.add_scalar("perf/test_acc1", test_stats["acc1"], epoch)
                log_writer.add_scalar("perf/test_acc5", test_stats["acc5"], epoch)
                log_writer.add_scalar("perf/test_loss", test_stats["loss"], epoch)
            run.end_epoch(epoch, train_stats, test_stats)
    return test_stats
