"""Where a run's numbers go besides log.txt: TensorBoard (--log_dir) and, with --wandb, Weights & Biases.

`Writers` stands behind TensorBoard's SummaryWriter interface (add_scalar, add_image, flush, close, log_dir), so the
loops write once. W&B gets the per-update scalars against `epoch_1000x` (the x-axis TensorBoard uses: 1000ths of
an epoch), each epoch's log.txt row against `epoch`, and the reconstruction pictures. The W&B run is named from
--wandb_project / --wandb_name, carries the resolved settings as its config, and its id is kept in
<output_dir>/wandb_run_id, so that a resumed run (auto-resume, --resume, a requeued job) continues the same W&B
run. `wandb` is optional (requirements-wandb.txt) and imported only with --wandb; --wandb_mode offline (or
WANDB_MODE=offline) writes the run under <output_dir>/wandb without a network, for `wandb sync` later.
"""
import os
import uuid
from typing import Any, Dict, Iterable, List, Optional, Tuple

from util.logger import log
from util.optional import require_package

RUN_ID_FILE = "wandb_run_id"
WANDB_MODES = ("online", "offline")


def _run_id(output_dir: str) -> Optional[str]:
    path = os.path.join(output_dir, RUN_ID_FILE)
    if output_dir and os.path.isfile(path):
        with open(path) as f:
            return f.read().strip() or None
    return None


def start_wandb(project: str, name: str, mode: Optional[str], output_dir: str, config: Dict[str, Any]) -> Any:
    """A W&B run (rank 0 only), continuing the one this output_dir already logged to."""
    require_package("wandb", "--wandb", extra="requirements-wandb.txt")
    import wandb

    run_id = _run_id(output_dir)
    folder = output_dir or os.getcwd()
    os.makedirs(folder, exist_ok=True)
    run = wandb.init(project=project, name=name, config=config, dir=folder, id=run_id or uuid.uuid4().hex[:12],
                     resume="allow", mode=mode or os.environ.get("WANDB_MODE") or "online")
    if output_dir and run_id is None:
        with open(os.path.join(output_dir, RUN_ID_FILE), "w") as f:
            f.write(run.id + "\n")
    run.define_metric("epoch_1000x")
    run.define_metric("step/*", step_metric="epoch_1000x")
    run.define_metric("epoch")
    for prefix in ("train_*", "test_*", "knn_*", "n_parameters", "reconstruction"):
        run.define_metric(prefix, step_metric="epoch")
    log(f"Weights & Biases: run {run.id} of project {project} ({'continued' if run_id else 'new'}, "
        f"{run.settings.mode} mode, in {folder})")
    return run


class Writers:
    """TensorBoard's SummaryWriter (or None) and a W&B run (or None) behind one SummaryWriter-like interface."""

    def __init__(self, tensorboard: Optional[Any] = None, wandb_run: Optional[Any] = None):
        self.tensorboard, self.wandb = tensorboard, wandb_run

    @property
    def log_dir(self) -> str:
        if self.tensorboard is not None:
            return self.tensorboard.log_dir
        return self.wandb.dir

    def add_scalar(self, tag: str, value: Any, step: int) -> None:
        """A scalar for TensorBoard (W&B gets the epoch's values with its log.txt row instead)."""
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)

    def add_step_scalars(self, rows: Iterable[Tuple[str, float, int]]) -> None:
        """(tag, value, epoch_1000x) rows of the training loop: to both."""
        by_step: Dict[int, Dict[str, float]] = {}
        for tag, value, step in rows:
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(tag, value, step)
            by_step.setdefault(step, {})[f"step/{tag}"] = value
        if self.wandb is not None:
            for step, values in sorted(by_step.items()):
                self.wandb.log({**values, "epoch_1000x": step})

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, image, step, dataformats=dataformats)
        if self.wandb is not None:
            import wandb
            self.wandb.log({tag: wandb.Image(image), "epoch": step})

    def epoch_row(self, row: Dict[str, Any]) -> None:
        """An epoch's log.txt row (with its 'epoch'), to W&B."""
        if self.wandb is not None:
            self.wandb.log(dict(row))

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def writers(tensorboard: Optional[Any], wandb_run: Optional[Any]) -> Optional[Writers]:
    """Writers over what there is, or None when neither logs."""
    return Writers(tensorboard, wandb_run) if tensorboard is not None or wandb_run is not None else None


__all__: List[str] = ["RUN_ID_FILE", "WANDB_MODES", "Writers", "start_wandb", "writers"]
