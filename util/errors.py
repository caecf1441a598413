"""Exceptions that entry points turn into one-line messages and exit codes."""


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

    def __init__(self, epoch: int, step: int, lr: float, loss: float):
        self.epoch, self.step, self.lr, self.loss = epoch, step, lr, loss
        super().__init__(
            f"loss is {loss} at epoch {epoch}, step {step} (lr {lr:.3e}); stopping training. "
            f"The last good checkpoints are kept: lower --blr, raise --warmup_epochs or try "
            f"--amp bf16/none, then resume."
        )
