"""Stopping on request: SIGTERM, SIGINT and SIGUSR1 end a run at the next step with a
checkpoint, and under SLURM a SIGUSR1 requeues the job.

A handler only records the signal; the training loop shares it with every process
through the all-reduce it does at each step, so it does not matter whether the signal
reached one process, all of them, or torchrun (which forwards it to each). The scripts
install the handlers first thing, so a signal that comes while the data loads is
recorded too, and the run stops before its first step.
"""
import contextlib
import os
import signal
import subprocess

from src.logger import get_logger

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """Records SIGTERM / SIGINT / SIGUSR1 while active (a context manager). A second
    SIGINT stops at once (KeyboardInterrupt), for a user who does not want to wait,
    except while a checkpoint is written (`deferred`)."""

    def __init__(self):
        self.received = set()
        self.previous = {}
        self.writing = False

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def _record(self, signum, _frame):
        if signum == signal.SIGINT and signum in self.received and not self.writing:
            raise KeyboardInterrupt
        self.received.add(signum)

    @contextlib.contextmanager
    def deferred(self):
        """While a checkpoint is written, a second Ctrl-C is only recorded: the write
        completes and the run then stops as for the first signal."""
        self.writing = True
        try:
            yield
        finally:
            self.writing = False

    def flags(self):
        """(stop, requeue) as numbers to all-reduce: requeue means SIGUSR1."""
        return float(bool(self.received)), float(signal.SIGUSR1 in self.received)


def requeue_slurm_job():
    """`scontrol requeue $SLURM_JOB_ID` (call it on one process, after the checkpoint
    is on disk); without SLURM_JOB_ID it does nothing."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    log = get_logger()
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60,
                       capture_output=True, text=True)
        log.info(f"SLURM job {job} requeued")
    except (OSError, subprocess.SubprocessError) as err:
        log.warning(f"could not requeue SLURM job {job}: {err}; resubmit the same command")
