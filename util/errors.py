"""Exceptions that entry points turn into one-line messages and exit codes."""
import signal


class UserError(Exception):
    """A mistake in the command, data or files the user supplied; reported without a traceback."""

    exit_code = 2


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, unsafe or of another architecture."""


class DataError(UserError):
    """A dataset folder that is missing, empty or unreadable."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last saved checkpoints are kept."""

    exit_code = 1

    def __init__(self, epoch: int, step: int, lr: float, loss: float, skipped: int = 0, why: str = ""):
        self.epoch, self.step, self.lr, self.loss = epoch, step, lr, loss
        what = (f"{skipped} updates in a row had a non-finite loss or gradients (--nan_policy skip, "
                f"--nan_max_skips {skipped}), the last at epoch {epoch}, step {step} (loss {loss}, lr {lr:.3e})"
                if skipped else f"loss is {loss} at epoch {epoch}, step {step} (lr {lr:.3e}){why}")
        super().__init__(
            f"{what}; stopping training. "
            f"The last good checkpoints are kept: lower --blr, raise --warmup_epochs or try "
            f"--amp bf16/none, then resume."
        )


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, file-size limit, permissions); older files are kept."""


class Preempted(Exception):
    """Training stopped on a signal after saving its position; rerunning the command continues from there.

    The exit code is 128 + the signal number, as for a process ended by that signal.
    """

    def __init__(self, signum: int, epoch: int, step: int, saved: bool = True):
        self.signum, self.epoch, self.step = signum, epoch, step
        self.exit_code = 128 + signum
        name = _signal_name(signum)
        where = ("checkpoint-last.pth holds this position; run the same command again to continue from it"
                 if saved else "nothing was saved (--output_dir is empty)")
        super().__init__(f"stopped by {name} at epoch {epoch}, step {step}: {where}")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
