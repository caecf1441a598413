"""SLURM (and local) job submission through submitit, shared by the three submitit_*.py launchers.

A job runs one task per GPU (or per CPU process); each task reads its rank, local device and the
world size from submitit's job environment and meets the others through a file in the job folder.
On timeout or pre-emption the job requeues itself and resumes from the newest checkpoint.
"""
import argparse
import importlib
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import submitit

from util.checkpoint import find_latest_checkpoint
from util.cli import command_line_parser
from util.config import settings_from_flags
from util.errors import Preempted
from util.flag_checks import check_common_flags, check_fsdp_flags, check_pretrain_flags
from util.logger import log

DEFAULT_JOB_DIR = os.path.join("submitit_jobs", "%j")
REQUEUE_GRACE_S = 60  # how long a non-zero rank of a stopped job waits for rank 0's requeue to end it


def add_launcher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The reference launcher flags, plus --cluster, in their own --help group."""
    group = parser.add_argument_group("launcher parameters", "where and how the job runs")
    group.add_argument("--ngpus", default=8, type=int,
                       help="number of GPUs to request on each node (processes per node with --device cpu)")
    group.add_argument("--nodes", default=2, type=int, help="number of nodes to request")
    group.add_argument("--timeout", default=4320, type=int, help="duration of the job, in minutes")
    group.add_argument("--job_dir", default="", type=str,
                        help=f"job folder; '%%j' becomes the job id. Default: ./{DEFAULT_JOB_DIR.replace('%', '%%')}. "
                             f"Multi-node jobs need it on a filesystem every node sees.")
    group.add_argument("--partition", default="learnfair", type=str, help="partition where to submit")
    group.add_argument("--use_volta32", action="store_true", help="request 32G V100 GPUs")
    group.add_argument("--comment", default="", type=str, help="comment to pass to the scheduler")
    group.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                        help="where to run: slurm, local (processes on this machine) or debug (in this "
                             "process); default: slurm when available, else local")
    return parser


def parse_args(entry_parser: argparse.ArgumentParser, description: str, argv=None) -> argparse.Namespace:
    """The entry point's flags plus the launcher's (--help lists both)."""
    parser = command_line_parser(entry_parser, description)
    add_launcher_args(parser)
    return parser.parse_args(argv)


def shared_folder(job_dir: str) -> Path:
    """The folder of all jobs: job_dir without its '%j' part (made if missing)."""
    p = Path(job_dir)
    folder = p.parent if "%j" in p.name else p
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def remove_pattern_folder(job_dir: str) -> None:
    """submitit leaves an empty folder named after the pattern ('%j' itself) at each submission: remove it."""
    literal = Path(job_dir)
    if "%j" in literal.name and literal.is_dir() and not any(literal.iterdir()):
        try:
            literal.rmdir()
        except OSError:  # another submission is using it right now
            pass


def get_init_file(job_dir: str) -> Path:
    """A fresh rendezvous file path for torch.distributed's file:// init."""
    init_file = shared_folder(job_dir) / f"{uuid.uuid4().hex}_init"
    if init_file.exists():
        os.remove(str(init_file))
    return init_file


class Trainer:
    """The submitted callable: sets up ranks from the job environment and runs the entry point.

    Subclasses name the entry-point module in `entry`; `checkpoint()` is what submitit calls on
    timeout or pre-emption.
    """

    entry = "main_pretrain"

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self) -> Any:
        trainer = importlib.import_module(self.entry)
        remove_pattern_folder(self.args.job_dir)  # also the one a requeue's submission left
        self._setup_gpu_args()
        try:
            return trainer.main(self.args)
        except Preempted:
            if self.args.rank != 0 and submitit.JobEnvironment().name() == "slurm":
                # submitit's requeue runs on rank 0 and ends the whole job; a task that exits first with an
                # error could end the job step before rank 0 has requeued it
                time.sleep(REQUEUE_GRACE_S)
            raise

    def checkpoint(self):
        """Requeue this job, resuming from the newest checkpoint in its output folder."""
        self.args.dist_url = get_init_file(self.args.job_dir).as_uri()
        output_dir = self._output_dir()
        latest = find_latest_checkpoint(output_dir) if output_dir else None
        if latest is not None:
            self.args.resume = str(latest)
        self.args.overwrite = False  # --overwrite replaced what was there before the job: never its own progress
        log(f"Requeuing {self.entry}, resuming from {self.args.resume or 'scratch'}")
        empty_trainer = type(self)(self.args)
        return submitit.helpers.DelayedSubmission(empty_trainer)

    def _output_dir(self) -> Optional[str]:
        out = str(self.args.output_dir)
        if "%j" in out:
            try:
                out = out.replace("%j", str(submitit.JobEnvironment().job_id))
            except RuntimeError:  # not inside a job: nothing to resolve against
                return None
        return out

    def _setup_gpu_args(self) -> None:
        job_env = submitit.JobEnvironment()
        self.args.output_dir = str(self.args.output_dir).replace("%j", str(job_env.job_id))
        self.args.log_dir = self.args.output_dir
        self.args.gpu = job_env.local_rank
        self.args.rank = job_env.global_rank
        self.args.world_size = job_env.num_tasks
        if job_env.num_tasks > 1:
            # read by util.distributed.init_distributed_mode; the rendezvous is args.dist_url (a file)
            os.environ.update(RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks),
                              LOCAL_RANK=str(job_env.local_rank))
        log(f"Process group: {job_env.num_tasks} tasks, rank: {job_env.global_rank}", force=True)


def check_before_submitting(args: argparse.Namespace, entry: str) -> None:
    """The entry point's flag checks (util/flag_checks.py), here, before a job waits in the queue for them."""
    given = settings_from_flags(vars(args))
    # the job's nodes may have packages this one lacks (DALI): those are checked where the job runs
    check_common_flags(replace(given, data=replace(given.data, data_loader="torch")))
    check_fsdp_flags(given)
    if entry == "main_pretrain":
        check_pretrain_flags(given)


def submit(args: argparse.Namespace, trainer_cls: type, name: str = "mae"):
    """Check the flags, create the executor from the launcher flags, submit trainer_cls(args) and print the
    job id."""
    check_before_submitting(args, trainer_cls.entry)
    if args.job_dir == "":
        args.job_dir = DEFAULT_JOB_DIR
    args.job_dir = os.path.abspath(args.job_dir)
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster=args.cluster, slurm_max_num_timeout=30)

    cpu = (args.device or "").startswith("cpu")
    num_gpus_per_node = args.ngpus
    kwargs = {}
    if args.use_volta32:
        kwargs["slurm_constraint"] = "volta32gb"
    if args.comment:
        kwargs["slurm_comment"] = args.comment
    executor.update_parameters(
        mem_gb=40 * num_gpus_per_node,
        gpus_per_node=0 if cpu else num_gpus_per_node,
        tasks_per_node=num_gpus_per_node,  # one task per GPU
        cpus_per_task=10,
        nodes=args.nodes,
        timeout_min=args.timeout,
        # below are cluster dependent parameters
        slurm_partition=args.partition,
        slurm_signal_delay_s=120,
        **kwargs,
    )
    executor.update_parameters(name=name)

    # the job unpickles the trainer and imports the entry point from this repository
    repo = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if repo not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([repo, *paths])

    args.dist_url = get_init_file(args.job_dir).as_uri()
    args.output_dir = args.job_dir
    trainer = trainer_cls(args)
    job = executor.submit(trainer)
    remove_pattern_folder(args.job_dir)
    print("Submitted job_id:", job.job_id)
    if args.cluster == "debug":  # submitit runs a debug job in this process, when its result is asked for
        job.result()
    return job
