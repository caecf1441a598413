"""When to stop or save in the middle of an epoch: a scheduler's signal, or a wall-clock cadence.

SLURM sends SIGTERM (pre-emption), or the signal asked for with `--signal` (SIGUSR1, or SIGUSR2 for
submitit jobs) before the time limit. While training, a `StopGuard` only notes such a signal; at the
next optimizer step boundary every rank asks `poll()`, one collective makes all of them agree on the
same step, and the runner saves the position inside the epoch before stopping. `--save_every_minutes`
uses the same agreement to save every M minutes without stopping, so a hard kill loses at most M minutes.
Under submitit, any stop signal ends in submitit's requeue handler (installed for SIGUSR2), which
requeues the job; elsewhere the run raises Preempted.
"""
import datetime
import os
import signal
import threading
import time
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from util.distributed import get_world_size, is_dist_avail_and_initialized
from util.errors import Preempted
from util.logger import log

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopGuard:
    """Notes stop signals during training and tells, at a step boundary, whether to save and/or stop.

    Use as a context manager around the training loop: it installs its handlers on entry and puts the
    previous ones back on exit. `poll()` is a collective in distributed runs (a tiny all-reduce over
    gloo), so every rank must call it at the same steps.
    """

    def __init__(self, save_every_minutes: Optional[float] = None, timeout_minutes: float = 30,
                 requeue_signal: int = signal.SIGUSR2):
        self.signum = 0
        self.save_every_s = save_every_minutes * 60 if save_every_minutes else None
        self.timeout = datetime.timedelta(minutes=timeout_minutes)
        self.requeue_signal = requeue_signal
        self._last_save = time.monotonic()
        self._previous: Dict[int, Any] = {}
        self._group = None
        self._pid = os.getpid()
        self._reported = False

    def __enter__(self) -> "StopGuard":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        if get_world_size() > 1 and dist.get_backend() != "gloo":
            # a CPU collective: no wait on the GPU stream
            self._group = dist.new_group(backend="gloo", timeout=self.timeout)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum: int, _frame: Any) -> None:
        # only a flag: printing here could re-enter a write the signal interrupted. Loader workers forked
        # while the guard is on inherit this handler and ignore the signal: the main process stops them.
        if os.getpid() == self._pid and not self.signum:
            self.signum = signum

    def poll(self) -> Tuple[int, bool]:
        """(the stop signal, 0 if none; whether a cadence save is due), the same on every rank."""
        if self.signum and not self._reported:
            self._reported = True
            log(f"received {signal.Signals(self.signum).name}: saving and stopping after this optimizer step",
                force=True)
        due = self.save_every_s is not None and time.monotonic() - self._last_save >= self.save_every_s
        if get_world_size() > 1 and is_dist_avail_and_initialized():
            flags = torch.tensor([self.signum, int(due)], dtype=torch.int64)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
            return int(flags[0]), bool(flags[1])
        return self.signum, due

    def saved(self) -> None:
        """A checkpoint was just written: the cadence starts again."""
        self._last_save = time.monotonic()

    def barrier(self) -> None:
        """Wait for every rank (after a save that only rank 0 writes, before anyone exits)."""
        if get_world_size() > 1 and is_dist_avail_and_initialized():
            dist.barrier(group=self._group)

    def stop(self, signum: int, epoch: int, step: int, saved: bool = True) -> None:
        """End training after the position was saved: hand over to the requeue handler that was there
        before (submitit's, on its signal SIGUSR2, for any stop signal; it requeues the job and exits on
        rank 0), then raise Preempted."""
        requeue = self._previous.get(self.requeue_signal)
        self.__exit__()
        if callable(requeue):
            requeue(self.requeue_signal, None)
        raise Preempted(signum, epoch, step, saved)
