"""Evaluation loops: feature extraction gathered by index, and the progress bar that
every loop shows."""
import contextlib
import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from src.distributed import gather_uneven, get_world_size, is_main_process
from src.loader import eval_loader
from src.optim import AUTOCAST_DTYPES


def progress(iterable, total, desc, initial=0):
    """A tqdm bar with ETA on rank 0; sparse updates when stderr is not a terminal."""
    return tqdm(iterable, total=total, desc=desc, initial=initial,
                disable=not is_main_process(), dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def encoding_precision(device, precision):
    """The autocast under which the encoder runs for --precision `precision` ('fp16'
    or 'bf16'); 'fp32' leaves the arithmetic as it is. Features are kept in fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def extract_features(encoder, dataset, batch_size, workers, device, bank_device=None,
                     normalize=False, desc="features", precision="fp32", check_stop=None):
    """Features (float32) and labels of every sample of `dataset`, in dataset order, on
    every rank; the encoder runs under `precision` (see `encoding_precision`).

    Each process encodes its own shard; rows are gathered batch by batch with their
    indices, so the bank holds every sample exactly once (no sampler padding).
    `check_stop`, a collective (e.g. TrainLoop.stop_if_requested), is called between
    batches on every process: a stop signal then ends the extraction within a batch.
    """
    bank_device = bank_device or device
    shard = math.ceil(len(dataset) / get_world_size())  # the longest shard
    steps = math.ceil(shard / batch_size)  # same count on every rank: collectives match
    bank = labels = None
    was_training = encoder.training
    encoder.eval()
    with eval_loader(dataset, batch_size, workers) as loader:
        batches = iter(loader)
        for _ in progress(range(steps), steps, desc):
            if check_stop is not None:
                check_stop()
            index, images, target = next(batches, (None, None, None))
            if index is None:  # this rank's shard is done; still take part in the gathers
                index = torch.zeros(0, dtype=torch.long)
                images = torch.zeros((0, *dataset_shape(dataset)))
                target = torch.zeros(0, dtype=torch.long)
            with encoding_precision(device, precision):
                feats = encoder(images.to(device, non_blocking=True))
            feats = feats.float()
            if normalize:
                feats = F.normalize(feats, dim=1)
            index = gather_uneven(index.to(device))
            feats = gather_uneven(feats)
            target = gather_uneven(torch.as_tensor(target).to(device))
            if bank is None:
                bank = torch.zeros(len(dataset), feats.shape[1], device=bank_device)
                labels = torch.full((len(dataset),), -1, dtype=torch.long, device=bank_device)
            bank[index.to(bank_device)] = feats.to(bank_device)
            labels[index.to(bank_device)] = target.to(bank_device)
    encoder.train(was_training)
    return bank, labels


@torch.no_grad()
def extract_shard(encoder, dataset, batch_size, workers, device, bank_device=None,
                  normalize=False, desc="features", precision="fp32"):
    """(float32 features, labels, indices) of this process's share of `dataset` (samples
    rank, rank+W, ...), on `bank_device`: nothing is gathered, each process keeps 1/W.
    The encoder runs under `precision` (see `encoding_precision`)."""
    bank_device = bank_device or device
    features, labels, indices = [], [], []
    was_training = encoder.training
    encoder.eval()
    with eval_loader(dataset, batch_size, workers) as loader:
        for index, images, target in progress(loader, len(loader), desc):
            with encoding_precision(device, precision):
                feats = encoder(images.to(device, non_blocking=True))
            feats = feats.float()
            features.append((F.normalize(feats, dim=1) if normalize else feats).to(bank_device))
            labels.append(torch.as_tensor(target).to(bank_device))
            indices.append(index.to(bank_device))
    encoder.train(was_training)
    if not features:
        return (torch.zeros(0, 0, device=bank_device),
                *(torch.zeros(0, dtype=torch.long, device=bank_device) for _ in range(2)))
    return torch.cat(features), torch.cat(labels), torch.cat(indices)


def dataset_shape(dataset):
    """Shape of one image of `dataset` (for the empty batch of a finished shard)."""
    return tuple(dataset[0][0].shape)
