"""Samplers and data loaders, kept apart from the datasets and the training step.

Training batches are cut from one seeded order of the whole dataset per epoch; sample i
of epoch e is transformed with randomness seeded by (seed, e, i) alone (see
src/seeding.py). So what a step sees depends only on (seed, epoch, iteration): not on
the number of loader workers, nor on where a run was resumed, nor, for a fixed total
batch, on the number of processes.
"""
import functools
import signal
import warnings
from collections import namedtuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from src.distributed import get_rank, get_world_size
from src.errors import UnreadableImage, UsageError
from src.seeding import sample_generator, sample_seed

MAX_SUBSTITUTES = 20  # unreadable samples in a row before a batch gives up
Batch = namedtuple("Batch", "data bad_files reads")  # what a training loader yields


class GlobalBatchSampler(Sampler):
    """Per-process batches of (epoch, index) keys.

    Each epoch, the indices are shuffled with a generator seeded by seed + epoch (the
    order DistributedSampler draws); global batch b is order[b*N : (b+1)*N] with
    N = batch_size x world size, and process r takes its r-th share. With `drop_last`
    (pretraining, as the authors) the incomplete global batch is dropped; without it
    (eval_linear) the order is padded with its first indices to a multiple of the
    world size, as DistributedSampler pads, and the last batch is smaller.
    `start_at(i)` makes the next epoch's iteration begin at batch i: a resumed run
    skips the done batches without loading them.
    """

    def __init__(self, size, batch_size, seed, drop_last=True):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = get_rank(), get_world_size()
        self.drop_last = drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def start_at(self, iteration):
        self.start = iteration

    def __len__(self):
        total = self.batch_size * self.world_size
        if self.drop_last:
            return self.size // total
        padded = -(-self.size // self.world_size) * self.world_size
        return -(-padded // total)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if not self.drop_last:
            padded = -(-self.size // self.world_size) * self.world_size
            order += order[:padded - self.size]
        total = self.batch_size * self.world_size
        start, self.start = self.start, 0
        for b in range(start, len(self)):
            batch = order[b * total:(b + 1) * total]
            share = len(batch) // self.world_size
            yield [(self.epoch, i) for i in batch[self.rank * share:(self.rank + 1) * share]]


class SeededSamples(Dataset):
    """Items keyed by (epoch, index): the dataset's item `index`, its transform's
    randomness seeded by (seed, epoch, index), with the bad files met on the way.

    An unreadable image (src.errors.UnreadableImage) is replaced by another sample drawn
    deterministically from (seed, epoch, index), so a run with bad files stays exact.
    Torchvision's transforms draw from torch's global generator: it is forked, so the
    caller's random state is untouched.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        bad = []
        substitutes = sample_generator(self.seed, epoch, index)
        for attempt in range(MAX_SUBSTITUTES):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index) + attempt)
                try:
                    return self.dataset[index], bad
                except UnreadableImage as err:
                    bad.append(err.path)
            index = int(torch.randint(len(self.dataset), (), generator=substitutes))
        return None, bad


def collate_samples(items, collate=default_collate):
    """Batch(data, bad_files, reads); `data` is `collate` of the items, `reads` counts
    every file opened.

    A sample that found no readable substitute takes a copy of a readable sample of
    the same batch (still a function of the batch alone); `data` is None only when no
    sample of the batch could be read.
    """
    bad = [path for _, paths in items for path in paths]
    data = [item for item, _ in items]
    readable = [item for item in data if item is not None]
    filled = [item if item is not None else readable[i % len(readable)]
              for i, item in enumerate(data)] if readable else None
    return Batch(collate(filled) if filled else None, bad, len(items) + len(bad))


def quiet_worker(_worker_id):
    """Loader workers ignore the signals that stop a run: the training process decides
    when to stop, and a worker killed first would crash the step in progress. So the
    process that owns them must stop them (Loader.close); torch's watchdog ends a
    worker within 5 s of its parent's death."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


class Loader(DataLoader):
    """A DataLoader (persistent workers when it has workers) that its user closes, on
    every way out of the loop that reads it (`with loader:` or `close()`).

    Left to the garbage collector, the workers of an iterator that an exception's
    traceback keeps alive would meet interpreter exit, where torch skips their
    shutdown and multiprocessing waits forever for workers that ignore SIGTERM.
    """

    def __init__(self, dataset, workers, **kwargs):
        super().__init__(dataset, num_workers=workers, worker_init_fn=quiet_worker,
                         persistent_workers=workers > 0,
                         pin_memory=torch.cuda.is_available(), **kwargs)

    def close(self):
        """Stop the worker processes now (torch's own shutdown of its iterator); the
        next iteration starts new ones."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def check_batch_fits(size, batch_size):
    """A UsageError unless one full global batch fits in the `size` training samples."""
    world_size = get_world_size()
    if size < batch_size * world_size:
        raise UsageError(f"--batch_size {batch_size} x {world_size} process(es) is larger "
                         f"than the {size} training samples")


def train_loader(dataset, batch_size, workers, seed, drop_last=True, collate=default_collate):
    """Loader of Batch tuples over `dataset`; see GlobalBatchSampler and SeededSamples.
    Call `loader.batch_sampler.set_epoch(e)` (and `start_at(i)` to resume) before
    iterating."""
    sampler = GlobalBatchSampler(len(dataset), batch_size, seed, drop_last)
    with warnings.catch_warnings():  # more workers than cores: start_run logs it instead
        warnings.filterwarnings("ignore", "This DataLoader will create")
        return Loader(SeededSamples(dataset, seed), workers, batch_sampler=sampler,
                      collate_fn=functools.partial(collate_samples, collate=collate))


class ShardSampler(Sampler):
    """Indices rank, rank+W, ...: every sample exactly once over all processes, no padding."""

    def __init__(self, length):
        self.indices = list(range(get_rank(), length, get_world_size()))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class WithIndex(Dataset):
    """Returns (index, item...) so features gathered from many processes can be put back
    in dataset order."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (i, *self.dataset[i])


def eval_loader(dataset, batch_size, workers):
    """Sharded, ordered loader over (index, image, label), without duplicates; close
    it after use (a Loader)."""
    return Loader(WithIndex(dataset), workers, batch_size=batch_size,
                  sampler=ShardSampler(len(dataset)))
