"""The training loop that main.py and eval_linear.py share.

One step: set the schedules, forward, ONE all-reduce that carries the loss together with
the stop signals, rank 0's checkpoint clock and the data-health counts, then (unless
the loss is not finite) the optimizer step, the logs and, when due, a checkpoint.
Checkpoints come at every epoch end (the script writes them with `save`), inside the
epoch every --checkpoint_minutes or --checkpoint_iters, and once after a stop signal.
Leaving the loop (`with loop:`), however it ends, stops the loader's workers.
"""
import hashlib
import math
import os
import time

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from src.distributed import all_gather_objects, all_reduce_sum, get_world_size, is_main_process
from src.errors import NonFiniteLoss, Preempted, UsageError
from src.logger import get_logger, progress
from src.train.preemption import StopSignals, requeue_slurm_job

# the entries of the per-step all-reduce
LOSS, STOP, REQUEUE, SAVE_DUE, BAD, READS = range(6)


def reduce_step(loss, flags, device):
    """The one all-reduce of a step: [loss, *flags] summed over processes, as host
    floats. The `.tolist()` is the step's single host synchronisation."""
    packed = torch.cat([loss.detach().double().reshape(1),
                        torch.tensor(flags, dtype=torch.float64).to(device, non_blocking=True)])
    return all_reduce_sum(packed).tolist()


def dataset_record(dataset):
    """{'size', 'files'} of a training set, kept in its checkpoints to notice at resume
    that the images changed. `files` is a hash of the file list of a dataset with
    torchvision's ImageFolder interface (`root`, `samples` of (path, label); paths
    relative to the root: moving the folder changes nothing), None for datasets of
    another kind; wrappers (.dataset, .images) are looked through."""
    folder = dataset
    while folder is not None and not (hasattr(folder, "root") and hasattr(folder, "samples")):
        folder = next((getattr(folder, name) for name in ("dataset", "images")
                       if hasattr(folder, name)), None)
    files = None
    if folder is not None and folder.samples is not None:
        root = os.path.join(folder.root, "")
        listing = "\n".join(f"{label} {path.removeprefix(root)}" for path, label in folder.samples)
        files = hashlib.sha256(listing.encode()).hexdigest()[:16]
    return {"size": len(dataset), "files": files}


class DataHealth:
    """Unreadable images over all processes: each is logged once; a run where more than
    1% of the images read are unreadable stops (checked once 1,000 images were read,
    or at the end of an epoch of a smaller dataset), so a wrong folder never trains on
    the few files it can read."""

    LIMIT, MIN_READS = 0.01, 1000

    def __init__(self):
        self.reads = self.bad = 0
        self.files = []  # every unreadable file met, each once, in order

    def state_dict(self):
        return {"reads": self.reads, "bad": self.bad, "files": list(self.files)}

    def load_state_dict(self, state):
        self.reads, self.bad, self.files = state["reads"], state["bad"], list(state["files"])

    def record(self, reads, bad, local_files):
        """Add one step's totals over processes; gathers the file names (a collective)
        only in the rare steps where some process met an unreadable image."""
        self.reads += int(reads)
        if not bad:
            return
        self.bad += int(bad)
        seen = set(self.files)
        for path in all_gather_objects(local_files):
            if path not in seen:
                seen.add(path)
                self.files.append(path)
                get_logger().warning(f"unreadable image {path}: replaced by another sample")

    def check(self, epoch_end=False):
        if self.bad > self.LIMIT * self.reads and (self.reads >= self.MIN_READS or epoch_end):
            raise UsageError(f"{self.bad} of the {self.reads} images read were unreadable (over "
                             f"1%), e.g. {', '.join(self.files[:3])}; check --data_path")


class TrainLoop:
    """Runs epochs of `loader` from a position (epoch, iteration) that a checkpoint can
    restore, with the cadence of config.Loop `config`, stepping the AmpOptimizer `amp`
    (on its device). `forward(data) -> loss`;
    `before_step(iteration) -> scalars to log` sets the schedules (iterations count from
    the start of the run); `save(position)` writes a checkpoint of the model at
    `position()` (a collective, on every process); `signals`: the script's StopSignals,
    installed when it started (default: none)."""

    def __init__(self, loader, forward, amp, config, save, before_step=None, signals=None):
        self.loader, self.forward, self.amp, self.save_to = loader, forward, amp, save
        self.epochs, self.device, self.writer = config.epochs, amp.device, None
        self.before_step = before_step or (lambda iteration: {})
        self.checkpoint_seconds = 60 * config.checkpoint_minutes
        self.checkpoint_iters, self.log_every = config.checkpoint_iters, config.log_every
        self.epoch = self.iteration = 0  # the next step is `iteration` of `epoch`
        self.loss_sum = 0.0  # of this epoch's steps so far
        self.epoch_loss = None  # the mean loss of the last epoch that ended
        self.seconds = 0.0  # spent in training epochs since the run began, resumes included
        self.health = DataHealth()
        self.dataset = dataset_record(loader.dataset.dataset)  # under SeededSamples
        self.signals = signals if signals is not None else StopSignals()
        self.stopping = (0.0, 0.0)  # agreed (stop, requeue)
        self.save_due = False  # rank 0's checkpoint clock, agreed at the last step
        self.last_save, self.steps_since_save = time.monotonic(), 0
        self.saved = False  # a checkpoint was written by this process

    @property
    def step(self):
        """The global iteration of the next step (the TensorBoard step)."""
        return self.epoch * len(self.loader) + self.iteration

    def position(self):
        return {"epoch": self.epoch, "iteration": self.iteration,
                "loop": {"loss_sum": self.loss_sum, "seconds": self.seconds,
                         "epoch_loss": self.epoch_loss,
                         "data": self.health.state_dict(), "dataset": self.dataset}}

    def load_position(self, checkpoint):
        self.epoch, self.iteration = checkpoint["epoch"], checkpoint.get("iteration", 0)
        if "loop" in checkpoint:
            self.loss_sum = checkpoint["loop"]["loss_sum"]
            self.seconds = checkpoint["loop"].get("seconds", 0.0)
            self.epoch_loss = checkpoint["loop"].get("epoch_loss")
            self.health.load_state_dict(checkpoint["loop"]["data"])
            self._check_dataset(checkpoint["loop"].get("dataset"),
                                checkpoint.get("source", "the checkpoint"))
        if self.iteration >= len(self.loader):
            raise UsageError(f"the checkpoint's position (iteration {self.iteration} of epoch "
                             f"{self.epoch + 1}) does not fit {len(self.loader)} iterations "
                             f"per epoch: was the dataset changed?")

    def _check_dataset(self, saved, source):
        """Warn when the training set is not the one the checkpoint was written with."""
        if saved is None or saved == self.dataset:
            return
        files = " and its file list differs" if saved["files"] != self.dataset["files"] else ""
        get_logger().warning(
            f"the training set changed since {source} was written ({saved['size']} -> "
            f"{self.dataset['size']} images{files}): the run continues with another sample "
            f"order, so it is no longer the same run as the one it resumes")

    def __enter__(self):
        """A stop signal that came while the run started ends it here, before the first
        step (every process agrees)."""
        self.stop_if_requested()
        return self

    def __exit__(self, *exc):
        self.loader.close()
        return False

    def save(self):
        """Write a checkpoint at the current position (all processes); a stop signal
        during the write does not interrupt it."""
        with self.signals.deferred():
            self.save_to(self.position())
        self.last_save, self.steps_since_save = time.monotonic(), 0
        self.saved = True

    def run_epoch(self):
        """Train to the end of the current epoch; return its mean loss."""
        sampler = self.loader.batch_sampler
        sampler.set_epoch(self.epoch)
        sampler.start_at(self.iteration)
        total = len(self.loader)
        bar = progress(None, total, f"epoch {self.epoch + 1}/{self.epochs}", self.iteration)
        start = last = time.perf_counter()
        first = self.iteration
        with logging_redirect_tqdm(loggers=[get_logger()]), bar:  # log lines above the bar
            for batch in self.loader:
                value, scalars = self._train_step(batch)
                now = time.perf_counter()  # throughput counts data loading too
                self.seconds += now - last
                self._log(value, scalars, now - last,
                          (now - start) / (self.iteration - first), bar)
                last = now
                if self.iteration < total:
                    self._checkpoint_if_due()
        self.health.check(epoch_end=True)
        self.epoch_loss = self.loss_sum / total
        self.epoch, self.iteration, self.loss_sum = self.epoch + 1, 0, 0.0
        return self.epoch_loss

    def _train_step(self, batch):
        """One step; returns (the loss averaged over processes, the schedules' scalars)."""
        global_step = self.step
        scalars = self.before_step(global_step)
        if batch.data is None:
            raise UsageError(f"no readable image among {batch.reads} files, e.g. "
                             f"{', '.join(batch.bad_files[:3])}; check --data_path")
        with self.amp.autocast():
            loss = self.forward(batch.data)
        stats = self._exchange(loss, batch)
        self.health.record(stats[READS], stats[BAD], batch.bad_files)
        self.health.check()
        value = stats[LOSS] / get_world_size()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss is {value} at epoch {self.epoch + 1}, iteration "
                                f"{global_step}")
        self.amp.step(loss)
        self.loss_sum += value
        self.iteration += 1
        self.steps_since_save += 1
        self.stopping = (stats[STOP], stats[REQUEUE])
        self.save_due = stats[SAVE_DUE] > 0
        return value, scalars

    def _exchange(self, loss, batch):
        """Share the loss, the stop signals, rank 0's clock and the data counts."""
        stop, requeue = self.signals.flags()
        due = is_main_process() and (
            (self.checkpoint_seconds > 0
             and time.monotonic() - self.last_save >= self.checkpoint_seconds)
            or (self.checkpoint_iters > 0 and self.steps_since_save + 1 >= self.checkpoint_iters))
        return reduce_step(loss, [stop, requeue, float(due), len(batch.bad_files), batch.reads],
                           self.device)

    def _log(self, value, scalars, seconds, mean_seconds, bar):
        scalars = {**scalars, "loss": value,
                   "images_per_s": self.loader.batch_sampler.batch_size * get_world_size() / seconds}
        if self.writer is not None:
            self.writer.add(self.step - 1, "train/", **scalars)
            if self.health.bad:
                self.writer.add(self.step - 1, "data/", unreadable_images=self.health.bad)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        total = len(self.loader)
        if (self.iteration - 1) % self.log_every == 0 or self.iteration == total:
            eta = mean_seconds * (self.epochs * total - self.step)
            get_logger().info(f"epoch {self.epoch + 1}/{self.epochs} iter {self.iteration}/"
                              f"{total} " + " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
                              + f" | run ETA {eta / 3600:.2f} h")

    def _checkpoint_if_due(self):
        """Inside the epoch: a checkpoint when rank 0's clock or the iteration count says
        so, and after a stop signal (then every process stops)."""
        if self.save_due or self.stopping[0]:
            self.save()
        self.stop_if_requested(agreed=True)

    def stop_if_requested(self, agreed=False):
        """Raise Preempted on every process if a stop signal reached any of them (the
        checkpoint must be on disk already). Without `agreed`, the processes first
        share what they received (a collective), e.g. after the epoch-end work."""
        if not agreed:
            flags = torch.tensor(self.signals.flags(), dtype=torch.float64, device=self.device)
            self.stopping = tuple(all_reduce_sum(flags).tolist())
        stop, requeue = self.stopping
        if not stop:
            return
        log = get_logger()
        where = (f"at epoch {self.epoch + 1}, iteration {self.iteration} with a checkpoint"
                 if self.saved else "before the first step (nothing new to save)")
        log.info(f"stopping on a signal {where}; run the same command to continue")
        if requeue and is_main_process():
            requeue_slurm_job()
        raise Preempted()
