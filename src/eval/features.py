"""Feature extraction for the evaluations: every process encodes its own shard of a
dataset, and the features are either gathered by index on every process (a bank in
dataset order) or kept where they were computed (a sharded bank)."""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from src.data.loader import eval_loader
from src.distributed import gather_uneven, get_world_size
from src.logger import progress
from src.train.optim import AUTOCAST_DTYPES


@dataclass(frozen=True)
class Extraction:
    """How features are extracted: the loader's batch and workers, the autocast
    `precision` the encoder runs under (features are kept in float32), L2-normalised
    or not, and the device that keeps them (None: the encoder's)."""
    batch_size: int
    workers: int = 0
    precision: str = "fp32"
    normalize: bool = False
    bank_device: torch.device = None


def encoding_precision(device, precision):
    """The autocast under which the encoder runs for --precision `precision` ('fp16'
    or 'bf16'); 'fp32' leaves the arithmetic as it is."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def encode(encoder, images, how, device):
    """The float32 features of a batch of `images` (normalised if `how` says so)."""
    with encoding_precision(device, how.precision):
        features = encoder(images.to(device, non_blocking=True))
    features = features.float()
    return F.normalize(features, dim=1) if how.normalize else features


@contextlib.contextmanager
def evaluating(*modules):
    """Eval mode inside the block (batch norm on its running statistics, so a sample's
    features do not depend on its batch); every submodule's own mode restored after.
    None entries are skipped."""
    modules = [m for m in modules if m is not None]
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


@torch.no_grad()
def extract_features(encoder, dataset, how, device, desc="features", check_stop=None):
    """(features, labels) of every sample of `dataset`, in dataset order, on every
    rank, extracted as Extraction `how` says.

    Each process encodes its own shard; rows are gathered batch by batch with their
    indices, so the bank holds every sample exactly once (no sampler padding).
    `check_stop`, a collective (e.g. TrainLoop.stop_if_requested), is called between
    batches on every process: a stop signal then ends the extraction within a batch.
    """
    bank_device = how.bank_device or device
    shard = math.ceil(len(dataset) / get_world_size())  # the longest shard
    steps = math.ceil(shard / how.batch_size)  # same count on every rank: collectives match
    bank = labels = None
    with evaluating(encoder), eval_loader(dataset, how.batch_size, how.workers) as loader:
        batches = iter(loader)
        for _ in progress(range(steps), steps, desc):
            if check_stop is not None:
                check_stop()
            index, images, target = next(batches, (None, None, None))
            if index is None:  # this rank's shard is done; still take part in the gathers
                index = torch.zeros(0, dtype=torch.long)
                images = torch.zeros((0, *dataset_shape(dataset)))
                target = torch.zeros(0, dtype=torch.long)
            feats = encode(encoder, images, how, device)
            feats = gather_uneven(feats)
            index = gather_uneven(index.to(device)).to(bank_device)
            target = gather_uneven(torch.as_tensor(target).to(device))
            if bank is None:
                bank = torch.zeros(len(dataset), feats.shape[1], device=bank_device)
                labels = torch.full((len(dataset),), -1, dtype=torch.long, device=bank_device)
            bank[index] = feats.to(bank_device)
            labels[index] = target.to(bank_device)
    return bank, labels


@torch.no_grad()
def extract_shard(encoder, dataset, how, device, desc="features"):
    """(features, labels, indices) of this process's share of `dataset` (samples
    rank, rank+W, ...), extracted as Extraction `how` says: nothing is gathered, each
    process keeps 1/W."""
    bank_device = how.bank_device or device
    features, labels, indices = [], [], []
    with evaluating(encoder), eval_loader(dataset, how.batch_size, how.workers) as loader:
        for index, images, target in progress(loader, len(loader), desc):
            features.append(encode(encoder, images, how, device).to(bank_device))
            labels.append(torch.as_tensor(target).to(bank_device))
            indices.append(index.to(bank_device))
    if not features:
        return (torch.zeros(0, 0, device=bank_device),
                *(torch.zeros(0, dtype=torch.long, device=bank_device) for _ in range(2)))
    return torch.cat(features), torch.cat(labels), torch.cat(indices)


def dataset_shape(dataset):
    """Shape of one image of `dataset` (for the empty batch of a finished shard)."""
    return tuple(dataset[0][0].shape)
