"""Start-up shared by the three scripts: the dump folder, the log, the checkpoint to
resume from and the seed."""
import os
import shlex
import sys
import tempfile

from src.checkpoint import plain_args
from src.distributed import broadcast_int, is_main_process, main_process_first
from src.errors import UsageError
from src.logger import setup_logging
from src.resume import RunCheckpoint
from src.seeding import run_seed, seed_everything


def prepare_dump_path(path):
    """Create the dump folder on rank 0 and prove it writable before any real output."""

    def create():
        if not is_main_process():
            return
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as err:
            raise UsageError(f"cannot write to --dump_path {path}: {err.strerror or err}")

    main_process_first(create)


def start_run(args, checkpoint_name=None, required=()):
    """Create --dump_path, start the log (rank 0: out.log and stdout), find the run's
    checkpoint `checkpoint_name` (if the script resumes), seed, and record the command
    line and every argument in the log. Returns (logger, RunCheckpoint or None, the
    checkpoint to resume from or None).

    An unseeded run draws its seed once (rank 0's, shared) and keeps it in its
    checkpoints, so that it, too, resumes exactly.
    """
    prepare_dump_path(args.dump_path)
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
