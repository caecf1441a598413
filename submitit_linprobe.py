"""Submit linear probing to SLURM (or run it locally) through submitit.

Flags: those of main_linprobe.py plus --ngpus, --nodes, --timeout, --job_dir, --partition,
--use_volta32, --comment and --cluster. See util/submit.py.
"""
import sys

import main_linprobe as trainer
import util.submit as launcher
from util.cli import launch


def parse_args(argv=None):
    """main_linprobe.py's flags plus the launcher's."""
    return launcher.parse_args(trainer.get_args_parser(), "Submitit for MAE linear probe", argv)


class Trainer(launcher.Trainer):
    """Runs main_linprobe.main inside the job; requeues from the newest checkpoint."""

    entry = "main_linprobe"


def main(argv=None):
    """Submit one job and print its id."""
    args = parse_args(argv)
    return launcher.submit(args, Trainer, name="mae")


if __name__ == "__main__":
    sys.exit(launch(lambda _: main(), None))
