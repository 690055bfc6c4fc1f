"""Start-up shared by the scripts: the dump folder (locked by the scripts that
resume), the log, the checkpoint to resume from and the seed."""
import fcntl
import os
import shlex
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

from src.distributed import broadcast_int, is_main_process, main_process_first
from src.errors import UsageError, hold_until_exit
from src.logger import get_logger, setup_logging
from src.seeding import run_seed, seed_everything
from src.train.resume import RunCheckpoint

LOCK_FILE = ".lock"


def prepare_dump_path(path, lock=False):
    """Create the dump folder on rank 0 and prove it writable before any real output;
    with `lock`, rank 0 also takes the folder's lock (`lock_dump_path`)."""

    def create():
        if not is_main_process():
            return
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as err:
            raise UsageError(f"cannot write to --dump_path {path}: {err.strerror or err}")
        if lock:
            lock_dump_path(path)

    main_process_first(create)


def lock_dump_path(path):
    """Hold an exclusive lock (flock) on `path`/.lock until the script ends, so that two
    runs cannot share a dump folder; the file names the holder (pid, host). A second
    run gets a UsageError naming it. The kernel drops the lock when its process dies,
    even by SIGKILL, so a killed run never blocks its own restart."""
    lock = open(os.path.join(path, LOCK_FILE), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "its pid and host are not written yet"
        lock.close()
        raise UsageError(f"--dump_path {path} is in use by another run ({holder}): wait for "
                         f"it to end or use another --dump_path") from None
    except OSError as err:  # a file system without flock (e.g. Lustre without -o flock)
        lock.close()
        get_logger().warning(f"cannot lock --dump_path {path} ({err.strerror or err}): a "
                             f"second run on this folder would not be noticed")
        return
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
               f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    hold_until_exit(lock)  # closing the file releases the lock


@dataclass
class Started:
    """What `start_run` found: the log, the run's seed, its checkpoint file (None for
    the scripts that do not resume) and the checkpoint to resume from (None: a new run)."""
    log: object
    seed: int
    checkpoint_file: RunCheckpoint = None
    resumed: dict = None


def start_run(run, processes, rules=None, workers=0):
    """Create --dump_path (and lock it if the script resumes), start the log (rank 0:
    out.log and stdout), find the run's checkpoint (when the script resumes, as
    train.resume.ResumeRules `rules` say), seed, and record the command line and every
    flag in the log. `run` is a config.Run, `processes` a distributed.Processes.

    An unseeded run draws its seed once (rank 0's, shared) and keeps it in its
    checkpoints, so that it, too, resumes exactly; a resumed one adopts it.
    """
    prepare_dump_path(run.dump_path, lock=rules is not None)
    checkpoint_file = (RunCheckpoint(os.path.join(run.dump_path, rules.name), run.flags,
                                     processes) if rules else None)
    log = setup_logging(run.dump_path, processes.rank)
    log.info("command: " + shlex.join(sys.argv))
    started = Started(log, run.seed, checkpoint_file)
    if rules:
        started.resumed = started.checkpoint_file.load(rules)
        saved_seed = (started.resumed or {}).get("args", {}).get("seed")
        if run.seed is None and saved_seed is not None:
            started.seed = saved_seed
    started.seed = broadcast_int(run_seed(started.seed), processes.device)
    if started.checkpoint_file:  # the checkpoints record the seed the run drew or adopted
        started.checkpoint_file.flags = {**run.flags, "seed": started.seed}
    seed_everything(started.seed)
    log.info(f"{processes.world_size} process(es) on {processes.device}, {run.precision}; "
             f"arguments: {dict(run.flags, seed=started.seed)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if workers > cores:
        log.warning(f"--workers {workers} exceeds the {cores} CPU cores this process may "
                    f"use: data loading may be slow")
    return started
