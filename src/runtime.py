"""Start-up shared by the scripts: the dump folder (locked by the scripts that
resume), the log, the checkpoint to resume from and the seed."""
import fcntl
import os
import shlex
import socket
import sys
import tempfile
import time

from src.checkpoint import plain_args
from src.distributed import broadcast_int, is_main_process, main_process_first
from src.errors import UsageError, hold_until_exit
from src.logger import get_logger, setup_logging
from src.resume import RunCheckpoint
from src.seeding import run_seed, seed_everything

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


def start_run(args, checkpoint_name=None, required=()):
    """Create --dump_path (and lock it if the script resumes), start the log (rank 0:
    out.log and stdout), find the run's checkpoint `checkpoint_name` (if the script
    resumes), seed, and record the command line and every argument in the log. Returns
    (logger, RunCheckpoint or None, the checkpoint to resume from or None).

    An unseeded run draws its seed once (rank 0's, shared) and keeps it in its
    checkpoints, so that it, too, resumes exactly.
    """
    prepare_dump_path(args.dump_path, lock=checkpoint_name is not None)
    log = setup_logging(args.dump_path, args.rank)
    log.info("command: " + shlex.join(sys.argv))
    run = checkpoint = None
    if checkpoint_name:
        run = RunCheckpoint(os.path.join(args.dump_path, checkpoint_name), args)
        checkpoint = run.load(required)
    args.seed = broadcast_int(run_seed(args.seed), args.device)
    seed_everything(args.seed)
    log.info(f"{args.world_size} process(es) on {args.device}, {args.precision}; "
             f"arguments: {plain_args(args)}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.workers > cores:
        log.warning(f"--workers {args.workers} exceeds the {cores} CPU cores this process may "
                    f"use: data loading may be slow")
    return log, run, checkpoint
