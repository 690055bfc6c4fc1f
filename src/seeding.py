"""Seeds that depend only on what is computed, never on where or when it runs.

The views of sample i in epoch e come from a generator seeded by (seed, epoch, i)
alone: they do not depend on the number of loader workers, on which worker drew the
sample, or on the point where a run was resumed. That is what makes a resumed run
continue the uninterrupted one bit for bit.
"""
import hashlib
import os
import random

import numpy as np
import torch

from src.distributed import get_rank


def sample_seed(seed, epoch, index):
    """A 63-bit seed, a well-mixed function of (seed, epoch, index) alone."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generator(seed, epoch, index):
    """A CPU torch.Generator for the random choices of sample `index` in `epoch`."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


def run_seed(seed):
    """The run's seed: `seed`, or a fresh random one when None (stored in checkpoints,
    so that even an unseeded run resumes exactly)."""
    return int.from_bytes(os.urandom(4), "little") if seed is None else seed


def seed_everything(seed):
    """Seed python, numpy and torch with `seed` + rank.

    Model weights still agree across ranks: DDP copies rank 0's at construction.
    """
    seed = seed + get_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
