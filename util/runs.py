"""Which run an output folder holds, and whether this run may continue it (the run identity).

A run is its entry point (`entry`: main_pretrain, main_finetune, main_linprobe, recorded in args.json and in
the `args` of every checkpoint it writes) and its run-defining settings: every resolved setting except those
in MAY_CHANGE, which say where and how the same maths is computed, for how long, and how often it prints or
saves. The effective batch size (batch_size x accum_iter x processes) is run-defining as a whole: the
number of processes and the per-process batch may change as long as their product does not.

- `read_folder`: what --output_dir holds (the newest checkpoint's run, else args.json's, else unknown files);
- `settings_of`, `differences`: the run-defining settings of a run and how two runs differ;
- `entry_of`: the entry point of a checkpoint, also of older ones and the reference's (from its weights);
- `check_folder`, `check_explicit_resume`, `check_log_dir`, `check_resumable`: whether this run may continue
  or write where it is pointed, each refusal a one-line UserError with the ways out;
- `remove_run`: --overwrite's deletion of a folder's run files.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from util.checkpoint import CHECKPOINT_RE, find_latest_checkpoint, load_checkpoint
from util.errors import CheckpointError, UserError
from util.logger import log, warn

ENTRIES = {
    "main_pretrain": "an MAE pre-training run of main_pretrain.py",
    "main_finetune": "a fine-tuning run of main_finetune.py",
    "main_linprobe": "a linear-probing run of main_linprobe.py",
}

# settings that may differ between a run and its continuation: how long (epochs), where and how the same maths is
# computed, how the processes split the effective batch, what is printed, logged and saved, and bookkeeping
MAY_CHANGE = frozenset({
    "epochs", "stop_epoch",
    "device", "amp", "compile", "attn", "patch_embed", "fsdp", "grad_checkpointing", "data_loader", "num_workers",
    "pin_mem", "strict_data", "dist_eval",
    "batch_size", "accum_iter", "world_size", "rank", "gpu", "local_rank", "distributed", "dist_backend", "dist_url",
    "dist_on_itp", "dist_timeout",
    "output_dir", "log_dir", "print_freq", "save_freq", "save_every_minutes", "vis_freq", "vis_channels", "knn_freq",
    "log_grad_blocks", "online_probe", "probe_lr", "wandb", "wandb_project", "wandb_name", "wandb_mode",
    # what a non-finite step does: a run stopped by a NaN may continue with --nan_policy skip
    "nan_policy", "nan_max_skips", "nan_max_rollbacks",
    "knn_data_path", "knn_max_train",
    "resume", "start_epoch", "auto_resume", "overwrite", "eval", "entry",
    # the submitit launchers' own flags
    "ngpus", "nodes", "timeout", "job_dir", "partition", "use_volta32", "comment", "cluster",
})
PATHS = ("data_path", "finetune")  # compared as real paths: absolute (older checkpoints recorded them as given),
# with symbolic links resolved (a link to the data is the same data)
HF_COLUMNS = ("image_column", "label_column")  # run-defining only where --data_path is a Hugging Face dataset
# settings that older versions saved as None (meaning: the model's or the stage's default) and that are now
# resolved before they are recorded: a None saved then is not a difference
RESOLVED_SINCE = frozenset({"crop_scale", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"})
EFF_BATCH = "eff_batch_size"
RUN_FILES = ("args.json", "log.txt", "wandb_run_id")  # wandb_run_id: util/tracking.py


def settings_of(args: Dict[str, Any]) -> Dict[str, Any]:
    """The run-defining settings of a run's args (a plain dict): all but MAY_CHANGE, plus the effective batch."""
    out = {k: v for k, v in args.items() if k not in MAY_CHANGE}
    for k in PATHS:
        if isinstance(out.get(k), str) and out[k] and "://" not in out[k]:
            out[k] = os.path.realpath(out[k])  # recorded absolute since; older relative ones from here
    if not (isinstance(out.get("data_path"), str) and os.path.isfile(os.path.join(out["data_path"],
                                                                                  "dataset_dict.json"))):
        for k in HF_COLUMNS:  # not read from other sources
            out.pop(k, None)
    if all(isinstance(args.get(k), int) for k in ("batch_size", "accum_iter", "world_size")):
        out[EFF_BATCH] = args["batch_size"] * args["accum_iter"] * args["world_size"]
    return out


def _batch(args: Dict[str, Any]) -> str:
    return (f"{settings_of(args)[EFF_BATCH]} (--batch_size {args['batch_size']} x --accum_iter {args['accum_iter']} "
            f"x {args['world_size']} process(es))")


def _keep_batch(saved: Dict[str, Any], current: Dict[str, Any]) -> str:
    """'; --batch_size 2 keeps it': the per-process batch that gives the saved effective batch here, if any."""
    per_step = current["accum_iter"] * current["world_size"]
    eff = settings_of(saved)[EFF_BATCH]
    return f"; --batch_size {eff // per_step} keeps it" if eff % per_step == 0 else ""


def differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """'--blr 0.001 there, 0.002 here' for each run-defining setting both runs record with different values.

    Settings only one of them records (a flag added since, or the reference's checkpoints) are not compared,
    nor those an older version saved unresolved (None) and this one resolves; the lr is left out when --blr
    or the effective batch differs (it follows from them).
    """
    a, b = settings_of(saved), settings_of(current)
    keys = [k for k in sorted(a.keys() & b.keys()) if _normal(a[k]) != _normal(b[k])
            and not (k in RESOLVED_SINCE and a[k] is None)]
    if "lr" in keys and ("blr" in keys or EFF_BATCH in keys) and saved.get("blr") is not None:
        keys.remove("lr")
    return [f"the effective batch size {_batch(saved)} there, {_batch(current)} here{_keep_batch(saved, current)}"
            if k == EFF_BATCH else f"--{k} {a[k]!r} there, {b[k]!r} here" for k in keys]


_BOOKKEEPING = {"resume", "start_epoch", "auto_resume", "overwrite", "eval", "entry", "rank", "gpu", "local_rank",
                "distributed", "dist_backend", "dist_url", "output_dir", "log_dir", "job_dir"}


def changed(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """The settings that may change on resume and did, as '--epochs 10 -> 20' (for the log)."""
    return [f"--{k} {saved[k]!r} -> {current[k]!r}" for k in sorted(MAY_CHANGE - _BOOKKEEPING)
            if k in saved and k in current and _normal(saved[k]) != _normal(current[k])]


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def entry_of(checkpoint: Dict[str, Any]) -> str:
    """The entry point that wrote a checkpoint: recorded in its args, or (older files, the reference's) told from
    its weights: a decoder is pre-training, a BatchNorm head linear probing, any other head fine-tuning."""
    args = checkpoint.get("args") or {}
    if args.get("entry"):
        return str(args["entry"])
    model = checkpoint.get("model")
    if not isinstance(model, dict):
        return entry_of_args(args)
    if any(k.startswith("decoder_") for k in model):
        return "main_pretrain"
    if "head.0.running_mean" in model or "head.1.weight" in model:
        return "main_linprobe"
    if "head.weight" in model:
        return "main_finetune"
    return entry_of_args(args)


def entry_of_args(args: Dict[str, Any]) -> str:
    """The entry point of a run's args (recorded, or told from flags only it has; '' when unknown)."""
    if args.get("entry"):
        return str(args["entry"])
    for flag, entry in (("mask_ratio", "main_pretrain"), ("smoothing", "main_finetune"), ("nb_knn", "main_knn"),
                        ("nb_classes", "main_linprobe")):
        if flag in args:
            return entry
    return ""


def describe(entry: str) -> str:
    """'an MAE pre-training run of main_pretrain.py', ..., for messages."""
    return ENTRIES.get(entry, f"a run of {entry}.py" if entry else "a run of unknown kind")


@dataclass
class FolderRun:
    """What an output folder holds: the run's files, and its entry point and args where they can be read."""

    files: List[str]  # names of the run files present (checkpoints, log.txt, args.json)
    entry: str = ""
    args: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None  # the newest loadable checkpoint
    epoch: Optional[int] = None  # its epoch

    def summary(self) -> str:
        """'checkpoint-last.pth after 5 epoch(s) and 3 more file(s)' (or the files' names) for messages."""
        if self.checkpoint is None:
            return ", ".join(self.files)
        more = len(self.files) - 1
        return f"{Path(self.checkpoint).name} after {self.epoch + 1} epoch(s)" + \
            (f" and {more} more file(s)" if more else "")


def run_files(output_dir: str) -> List[str]:
    """The names of the files a training run writes (checkpoints, log.txt, args.json) present in output_dir."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_file() and (CHECKPOINT_RE.match(p.name) or p.name in RUN_FILES))


def read_folder(output_dir: str) -> Optional[FolderRun]:
    """The run in output_dir (None when it holds none of a run's files).

    Its entry point and args come from the newest loadable checkpoint, else from args.json; an unreadable
    args.json or a log.txt alone is a run of unknown kind.
    """
    files = run_files(output_dir)
    if not files:
        return None
    run = FolderRun(files)
    latest = find_latest_checkpoint(output_dir)
    if latest is not None:
        checkpoint = load_checkpoint(str(latest), mmap=True)
        run.checkpoint, run.epoch = str(latest), int(checkpoint.get("epoch", -1))
        run.args, run.entry = dict(checkpoint.get("args") or {}), entry_of(checkpoint)
        return run
    try:
        with open(os.path.join(output_dir, "args.json")) as f:
            saved = json.load(f)
        if isinstance(saved, dict):
            run.args, run.entry = saved, entry_of_args(saved)
    except (OSError, ValueError):
        pass
    return run


def check_resumable(checkpoint: Dict[str, Any], path: str, entry: str, eval_only: bool = False) -> None:
    """A CheckpointError when `checkpoint` was written by another entry point than `entry`, naming the right flag."""
    other = entry_of(checkpoint)
    if not other or other == entry:
        return
    if eval_only:
        hint = ("a pre-training checkpoint has no classifier to evaluate: fine-tune or probe it first"
                if other == "main_pretrain" else f"evaluate it with {other}.py --eval --resume {path}")
    elif entry == "main_pretrain":
        hint = "main_pretrain.py resumes only its own checkpoints"
    else:
        hint = f"to start from its encoder, use --finetune {path}"
    raise CheckpointError(f"--resume {path} is a checkpoint of {describe(other)}, not of {entry}.py: {hint}")


def _inside(path: str, folder: str) -> bool:
    """Whether the file `path` lies directly in `folder`."""
    return bool(path) and "://" not in path and os.path.dirname(os.path.abspath(path)) == os.path.abspath(folder)


def _dir_flag(settings: Dict[str, Any]) -> str:
    # the submitit launchers write into --job_dir (their --output_dir follows it)
    return "--job_dir" if "job_dir" in settings else "--output_dir"


def check_folder(folder: FolderRun, output_dir: str, auto_resume: bool, entry: str, settings: Dict[str, Any],
                 overwrite: bool) -> None:
    """No --resume: the run in output_dir must be this run (to be auto-resumed), unless --overwrite replaces it;
    a UserError that names what the folder holds, what differs and the ways out otherwise."""
    flag = _dir_flag(settings)
    holds = f"{flag} {output_dir} holds {describe(folder.entry)} ({folder.summary()})"
    new_dir = f"use a new {flag} for this run"
    finetune = settings.get("finetune") or ""
    own_init = _inside(finetune, output_dir)  # --finetune reads a checkpoint of that very run
    if overwrite:
        if own_init:
            raise UserError(f"--overwrite would delete the run in {flag} {output_dir}, whose checkpoint --finetune "
                            f"{finetune} starts from: {new_dir}")
        log(f"{holds}: --overwrite deletes its files when training starts")
        return
    replace = "" if own_init else ", or add --overwrite to delete it and start afresh"
    if not auto_resume:
        raise UserError(f"{holds}; --no_auto_resume would start afresh over it: {new_dir}{replace}")
    if folder.entry != entry:
        hint = f" (--finetune {folder.checkpoint} from a new {flag} starts from its encoder)" \
            if folder.entry == "main_pretrain" and folder.checkpoint and not finetune else ""
        raise UserError(f"{holds}, not of {entry}.py, which would write over it: {new_dir}{hint}{replace}")
    diffs = differences(folder.args, settings)
    if diffs:
        cont = f", --resume {folder.checkpoint} to continue that run with this command's settings" \
            if folder.checkpoint else ""
        raise UserError(f"{holds} with other run-defining settings ({'; '.join(diffs)}): {new_dir}{cont}{replace}")


def check_explicit_resume(resume: str, folder: Optional[FolderRun], output_dir: str, entry: str,
                          settings: Dict[str, Any], overwrite: bool) -> Tuple[str, Dict[str, Any]]:
    """--resume PATH: (the checkpoint to continue, its contents loaded with mmap): PATH, or output_dir's own
    newest checkpoint when the same command already ran there; after checking that it is of the same entry point, that no other run's folder
    is written over, and warning about settings that differ."""
    flag = _dir_flag(settings)
    if folder is not None:
        inside = _inside(resume, output_dir)
        if inside and overwrite:
            raise UserError(f"--overwrite would delete the run in {flag} {output_dir}, whose checkpoint --resume "
                            f"{resume} continues: drop one of the two")
        if not inside and not overwrite:
            if folder.entry == entry and not differences(folder.args, settings):
                # this command ran before and wrote there: continue its progress, not --resume's older state
                if folder.checkpoint is not None:
                    log(f"{flag} {output_dir} already holds this run, continued from --resume {resume}: continuing "
                        f"from its {Path(folder.checkpoint).name}")
                    resume = folder.checkpoint
            else:
                raise UserError(f"{flag} {output_dir} holds {describe(folder.entry)} ({folder.summary()}); "
                                f"continuing --resume {resume} there would write over it: use a new {flag}, drop "
                                f"--resume to continue the run there, or add --overwrite to delete it")
    checkpoint = load_checkpoint(resume, mmap=True)
    check_resumable(checkpoint, resume, entry)
    diffs = differences(checkpoint.get("args") or {}, settings)
    if diffs:
        warn(f"--resume {resume} continues a run whose settings differ from this command's ({'; '.join(diffs)}): "
             f"continuing with this command's settings")
    return resume, checkpoint


def check_log_dir(other: Optional[FolderRun], log_dir: str, output_dir: str) -> None:
    """A separate --log_dir must not be another run's folder (the reference's default, ./output_dir, often is):
    this run's TensorBoard events would mix with that run's, and a resume would purge its curves."""
    if other is not None:
        raise UserError(f"--log_dir {log_dir} holds {describe(other.entry)} ({other.summary()}): this run's "
                        f"TensorBoard events would mix with that run's; set --log_dir to this run's folder "
                        f"({output_dir or 'a new one'})")


def remove_run(output_dir: str, log_dir: str) -> List[str]:
    """--overwrite: delete the run files of output_dir, and the TensorBoard event files of log_dir when it is
    output_dir (a separate log_dir may hold other runs' events); their names."""
    removed = []
    for name in run_files(output_dir):
        os.remove(os.path.join(output_dir, name))
        removed.append(name)
    if log_dir and os.path.abspath(log_dir) == os.path.abspath(output_dir):
        for p in Path(log_dir).iterdir():
            if p.is_file() and p.name.startswith("events.out.tfevents."):
                p.unlink()
                removed.append(p.name)
    return removed
