"""Samplers and data loaders, kept apart from the datasets and the training step so
that sampler state (epoch, position) can be saved and restored on its own."""
import warnings

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from src.distributed import get_rank, get_world_size
from src.errors import UsageError


def train_loader(dataset, batch_size, workers, seed=0, drop_last=True):
    """Shuffled loader, reshuffled per epoch by `loader.sampler.set_epoch`.

    With `drop_last` (pretraining, as the authors) every batch is full and a batch
    larger than the data is a UsageError; without it (eval_linear) every training
    image is used each epoch, the last batch being smaller. A DistributedSampler is
    used with one process too, so the order of samples depends only on the seed and
    the epoch, never on how the run was launched.
    """
    world_size = get_world_size()
    if drop_last and len(dataset) < batch_size * world_size:
        raise UsageError(f"--batch_size {batch_size} x {world_size} process(es) is larger "
                         f"than the {len(dataset)} training samples")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=get_rank(),
                                 shuffle=True, seed=seed, drop_last=drop_last)
    with warnings.catch_warnings():  # more workers than cores: start_run logs it instead
        warnings.filterwarnings("ignore", "This DataLoader will create")
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                          num_workers=workers, pin_memory=torch.cuda.is_available(),
                          drop_last=drop_last, persistent_workers=workers > 0)


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
    """Sharded, ordered loader over (index, image, label), without duplicates."""
    return DataLoader(WithIndex(dataset), batch_size=batch_size,
                      sampler=ShardSampler(len(dataset)), num_workers=workers,
                      pin_memory=torch.cuda.is_available())
