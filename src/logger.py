"""Logging on rank 0 only: `out.log` + stdout for text, TensorBoard for scalars."""
import json
import logging
import os
import sys

LOGGER_NAME = "resa"


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
    """

    def __init__(self, log_dir, enabled, purge_step=None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only on rank 0
            self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def add(self, step, prefix="", **scalars):
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(prefix + name, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
