"""The typed, frozen settings of a run: one dataclass per concern, filled from the resolved flags.

util/settings.py resolves the flags and builds a `Settings` with `settings_from_flags`; this module only
defines the shape:

    settings.data        DataSettings        what is read and how it is loaded
    settings.model       ModelSettings       which network, its stage flags, the weights it starts from
    settings.augment     AugmentSettings     the stage's augmentation flags (util/recipes.py builds from them)
    settings.optim       OptimSettings       optimiser and schedule, the epochs this run trains
    settings.precision   PrecisionSettings   device, --amp, compile, kernels
    settings.dist        DistSettings        process group, FSDP
    settings.ckpt        CheckpointSettings  what is resumed, written and logged
    settings.knn         KnnSettings         k-NN evaluation
    settings.launcher    LauncherSettings    the submitit launchers' flags
    settings.args        every flag as resolved, flat and read-only: args.json, checkpoint["args"], and the
                         `args` of the reference's functions (save_model, adjust_learning_rate, train_one_epoch)

Each flag belongs to exactly one group under its own name (settings.optim.blr is --blr). A group's defaults
stand for flags an entry point does not have (k-NN has no --blr); the record `settings.args` holds only
the flags that ran.
"""
import argparse
from dataclasses import dataclass, fields
from typing import Any, List, Mapping, Optional, Tuple

import torch

from util.recipes import FINETUNE_SCALE, STAGE_SCALE


class FrozenArgs(argparse.Namespace):
    """The resolved flags as a read-only Namespace: `vars()` and attribute reads work, writes raise."""

    def __init__(self, values: Mapping[str, Any]):
        self.__dict__.update(values)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"run settings are resolved once (util/settings.py): cannot set {name}")

    __delattr__ = __setattr__


@dataclass(frozen=True)
class DataSettings:
    data_path: str = ""
    input_size: int = 224
    batch_size: int = 64
    num_workers: int = 10
    pin_mem: bool = True
    data_loader: str = "torch"
    strict_data: bool = False
    seed: int = 0
    hflip: float = 0.5
    crop_scale: Optional[Tuple[float, float]] = None
    dist_eval: bool = False
    image_column: str = "image"
    label_column: str = "label"
    in_chans: int = 3
    mean: Optional[Tuple[float, ...]] = None  # resolved: ImageNet's for 3 channels (util/settings.resolve_stats)
    std: Optional[Tuple[float, ...]] = None


@dataclass(frozen=True)
class ModelSettings:
    model: str = ""
    nb_classes: int = 1000
    drop_path: float = 0.0
    global_pool: bool = False
    finetune: str = ""
    finetune_blocks: Optional[int] = None
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    mask_type: str = "random"
    decoder_embed_dim: Optional[int] = None
    decoder_depth: Optional[int] = None
    decoder_num_heads: Optional[int] = None
    encoder_mask_token: bool = False
    loss_on_visible: bool = False


@dataclass(frozen=True)
class AugmentSettings:
    pretrain_aug: str = "crop_rand"
    color_jitter: Optional[float] = None
    aa: Optional[str] = None
    smoothing: float = 0.0
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    resplit: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: Optional[List[float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"


@dataclass(frozen=True)
class OptimSettings:
    epochs: int = 1
    accum_iter: int = 1
    lr: float = 0.0
    blr: float = 0.0
    min_lr: float = 0.0
    warmup_epochs: int = 0
    weight_decay: float = 0.0
    clip_grad: Optional[float] = None
    layer_decay: float = 1.0
    start_epoch: int = 0
    stop_epoch: Optional[int] = None
    nan_policy: str = "stop"
    nan_max_skips: int = 5
    nan_max_rollbacks: int = 3

    @property
    def end_epoch(self) -> int:
        """The epoch this run stops before: --epochs, or --stop_epoch when that comes first."""
        return self.epochs if self.stop_epoch is None else min(self.stop_epoch, self.epochs)

    @property
    def epochs_left(self) -> int:
        """Epochs this run trains (0 for the rerun of a finished run)."""
        return max(self.end_epoch - self.start_epoch, 0)


@dataclass(frozen=True)
class PrecisionSettings:
    device: str = "cpu"
    amp: str = "none"
    compile: bool = False
    attn: str = "auto"
    patch_embed: str = "auto"
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class DistSettings:
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    gpu: Optional[int] = None
    local_rank: int = -1
    fsdp: bool = False
    dist_url: str = "env://"
    dist_on_itp: bool = False
    dist_timeout: float = 30.0


@dataclass(frozen=True)
class CheckpointSettings:
    output_dir: str = ""
    log_dir: str = ""
    resume: str = ""
    auto_resume: bool = True
    overwrite: bool = False
    eval: bool = False
    save_freq: int = 1
    save_every_minutes: Optional[float] = None
    print_freq: int = 20
    vis_freq: int = 0
    vis_channels: str = ""
    log_grad_blocks: bool = False
    wandb: bool = False
    wandb_project: str = "mae"
    wandb_name: Optional[str] = None
    wandb_mode: Optional[str] = None


@dataclass(frozen=True)
class KnnSettings:
    knn_freq: int = 0
    knn_data_path: Optional[str] = None
    knn_max_train: int = 10000
    nb_knn: Tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    online_probe: bool = False
    probe_lr: float = 1e-3


@dataclass(frozen=True)
class LauncherSettings:
    """The submitit launchers' flags (util/submit.py), recorded as they ran."""
    ngpus: int = 8
    nodes: int = 2
    timeout: int = 4320
    job_dir: str = ""
    partition: str = ""
    use_volta32: bool = False
    comment: str = ""
    cluster: Optional[str] = None


GROUPS = {"data": DataSettings, "model": ModelSettings, "augment": AugmentSettings, "optim": OptimSettings,
          "precision": PrecisionSettings, "dist": DistSettings, "ckpt": CheckpointSettings, "knn": KnnSettings,
          "launcher": LauncherSettings}
RECORD_ONLY = {"entry", "dist_backend"}  # in args.json, not in a group: Settings.entry, the process group's backend


@dataclass(frozen=True)
class Settings:
    entry: str
    data: DataSettings
    model: ModelSettings
    augment: AugmentSettings
    optim: OptimSettings
    precision: PrecisionSettings
    dist: DistSettings
    ckpt: CheckpointSettings
    knn: KnnSettings
    launcher: LauncherSettings
    args: FrozenArgs

    @property
    def device(self) -> torch.device:
        return torch.device(self.precision.device)

    @property
    def crop_scale(self) -> Tuple[float, float]:
        """The training crop's area range (resolved to the stage's default when not given)."""
        return tuple(self.data.crop_scale or STAGE_SCALE.get(self.entry, FINETUNE_SCALE))


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _group(cls: type, flags: Mapping[str, Any]) -> Any:
    # lists (crop_scale, nb_knn, cutmix_minmax) as tuples: a group shares no mutable value with anything
    return cls(**{f.name: _frozen(flags[f.name]) for f in fields(cls) if f.name in flags})


def settings_from_flags(flags: Mapping[str, Any]) -> Settings:
    """The typed view of an already resolved flag dict (args.json's, a checkpoint's `args`)."""
    return Settings(entry=flags.get("entry", ""), args=FrozenArgs(flags),
                    **{name: _group(cls, flags) for name, cls in GROUPS.items()})
