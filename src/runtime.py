"""Start-up chores shared by the three scripts: seeding and the dump folder."""
import os
import random
import tempfile

import numpy as np
import torch

from src.distributed import get_rank, is_main_process, main_process_first
from src.errors import UsageError


def seed_everything(seed):
    """Seed python, numpy and torch; each rank gets its own stream for augmentations.

    Model weights still agree across ranks: DDP copies rank 0's at construction.
    """
    if seed is None:
        return
    seed = seed + get_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
