"""Logging on rank 0 only: `out.log` + stdout for text, TensorBoard (and, when asked
and installed, Weights & Biases) for scalars."""
import json
import logging
import os
import secrets
import sys

from tqdm import tqdm

LOGGER_NAME = "resa"
WANDB_RUN = "wandb_run.json"   # in --dump_path: the W&B run that a restart continues


def setup_logging(dump_path, rank):
    """Rank 0 logs INFO to stdout and dump_path/out.log; other ranks only warnings."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    if rank == 0:
        logger.setLevel(logging.INFO)
        handlers = [logging.StreamHandler(sys.stdout),
                    logging.FileHandler(os.path.join(dump_path, "out.log"))]
    else:
        logger.setLevel(logging.WARNING)
        handlers = [logging.StreamHandler(sys.stderr)]
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def get_logger():
    return logging.getLogger(LOGGER_NAME)


def progress(iterable, total, desc, initial=0):
    """A tqdm bar with ETA where the log shows info lines (rank 0, see setup_logging);
    sparse updates when stderr is not a terminal."""
    return tqdm(iterable, total=total, desc=desc, initial=initial,
                disable=not get_logger().isEnabledFor(logging.INFO), dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def save_results(dump_path, name, results):
    """Write the final scores as JSON next to out.log (rank 0), for scripts and tables."""
    path = os.path.join(dump_path, name)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


class ScalarWriter:
    """TensorBoard scalars from rank 0; a no-op elsewhere (and when disabled).

    Every scalar's step is the global training iteration. A resumed run passes the step
    it resumes from (0 for a run that starts afresh) as `purge_step`: TensorBoard then
    drops what an interrupted run had logged from that step on, so each step shows once.
    They go to `run.dump_path`/tb (`run` is a config.Run) and, when its
    `wandb_project` is set, also to Weights & Biases, with the same names and steps
    (see `start_wandb`).
    """

    def __init__(self, run, enabled, purge_step=None):
        self.writer = self.wandb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only on rank 0
            self.writer = SummaryWriter(os.path.join(run.dump_path, "tb"), purge_step=purge_step)
            if run.wandb_project:
                self.wandb = start_wandb(run, resumed=bool(purge_step))

    def add(self, step, prefix="", **scalars):
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(prefix + name, value, step)
        if self.wandb is not None:
            self.wandb.log({prefix + name: value for name, value in scalars.items()}, step=step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(run, resumed):
    """The W&B run of project `run.wandb_project` named `run.env_name`, or None when
    the optional wandb package is missing or W&B does not start (then TensorBoard
    alone). Its id is kept in dump_path/wandb_run.json: a resumed run continues that
    W&B run (steps W&B already holds are not rewritten), a fresh start begins a new
    one. WANDB_MODE=offline is wandb's own setting: it logs into dump_path/wandb with
    no network."""
    log = get_logger()
    try:
        import wandb
    except ImportError:
        log.info("wandb is not installed: the scalars go to TensorBoard only (pip install "
                 "wandb to mirror them to Weights & Biases)")
        return None
    run_id = (resumed and saved_wandb_id(run.dump_path)) or secrets.token_hex(4)
    save_results(run.dump_path, WANDB_RUN, {"id": run_id})
    try:
        wandb_run = wandb.init(project=run.wandb_project, name=run.env_name, id=run_id,
                               resume="allow", dir=run.dump_path, config=run.flags)
    except Exception as err:  # no network, no login, a wandb error: TensorBoard goes on
        log.warning(f"Weights & Biases did not start ({type(err).__name__}: {err}); the "
                    f"scalars go to TensorBoard only (WANDB_MODE=offline needs no network)")
        return None
    log.info(f"Weights & Biases: project {run.wandb_project}, run {run.env_name} (id "
             f"{run_id}, {'continued' if resumed else 'new'})")
    return wandb_run


def saved_wandb_id(dump_path):
    """The W&B run id kept in dump_path/wandb_run.json, or None (no file, unreadable)."""
    try:
        with open(os.path.join(dump_path, WANDB_RUN)) as f:
            return json.load(f).get("id")
    except (OSError, ValueError, AttributeError):
        return None
