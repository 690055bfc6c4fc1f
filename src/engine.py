"""Loops shared by pretraining and evaluation: one training epoch (progress bar, logs,
TensorBoard, non-finite stop) and feature extraction gathered by index."""
import math
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from src.distributed import all_reduce_sum, gather_uneven, get_world_size, is_main_process
from src.loader import eval_loader
from src.errors import NonFiniteLoss
from src.logger import get_logger


def mean_over_processes(tensor):
    """The average of a scalar tensor over processes, as a float (one sync)."""
    value = tensor.detach().float().reshape(1).clone()
    return all_reduce_sum(value).item() / get_world_size()


def progress(iterable, total, desc):
    """A tqdm bar with ETA on rank 0; sparse updates when stderr is not a terminal."""
    return tqdm(iterable, total=total, desc=desc, disable=not is_main_process(),
                dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)


def train_epoch(loader, forward, amp, *, epoch, epochs, before_step=None, writer=None,
                log_every=50):
    """Train for one epoch of `loader` and return the mean loss.

    forward(batch) -> loss; before_step(iteration) -> dict of scalars to log (it sets
    the schedules; iterations count from the start of the run). The loss is averaged
    over processes before the step, and a non-finite value stops every rank before it
    can update the weights.
    """
    log = get_logger()
    first_iter, total_iters = epoch * len(loader), epochs * len(loader)
    global_batch = loader.batch_size * get_world_size()
    losses = []
    start = last = time.perf_counter()
    bar = progress(loader, len(loader), f"epoch {epoch + 1}/{epochs}")
    with logging_redirect_tqdm(loggers=[log]):  # log lines go above the bar, not into it
        for i, batch in enumerate(bar):
            iteration = first_iter + i
            scalars = before_step(iteration) if before_step else {}
            with amp.autocast():
                loss = forward(batch)
            value = mean_over_processes(loss)
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss is {value} at epoch {epoch + 1}, "
                                    f"iteration {iteration}")
            amp.step(loss)
            losses.append(value)
            now = time.perf_counter()  # throughput counts data loading too
            scalars.update(loss=value, images_per_s=global_batch / (now - last))
            last = now
            if writer is not None:
                writer.add(iteration, "train/", **scalars)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if i % log_every == 0 or i == len(loader) - 1:
                eta = (now - start) / (i + 1) * (total_iters - iteration - 1)
                log.info(f"epoch {epoch + 1}/{epochs} iter {i + 1}/{len(loader)} "
                         + " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
                         + f" | run ETA {eta / 3600:.2f} h")
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def extract_features(encoder, dataset, batch_size, workers, device, bank_device=None,
                     normalize=False, desc="features"):
    """Features and labels of every sample of `dataset`, in dataset order, on every rank.

    Each process encodes its own shard; rows are gathered batch by batch with their
    indices, so the bank holds every sample exactly once (no sampler padding).
    """
    bank_device = bank_device or device
    loader = eval_loader(dataset, batch_size, workers)
    shard = math.ceil(len(dataset) / get_world_size())  # the longest shard
    steps = math.ceil(shard / batch_size)  # same count on every rank: collectives match
    batches = iter(loader)
    bank = labels = None
    was_training = encoder.training
    encoder.eval()
    for _ in progress(range(steps), steps, desc):
        index, images, target = next(batches, (None, None, None))
        if index is None:  # this rank's shard is done; still take part in the gathers
            index = torch.zeros(0, dtype=torch.long)
            images = torch.zeros((0, *dataset_shape(dataset)))
            target = torch.zeros(0, dtype=torch.long)
        feats = encoder(images.to(device, non_blocking=True)).float()
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


def dataset_shape(dataset):
    """Shape of one image of `dataset` (for the empty batch of a finished shard)."""
    return tuple(dataset[0][0].shape)
