"""Exact continuation of a run: what its checkpoints hold beyond the weights, when a
checkpoint may be resumed, and how every process writes and restores one.

A checkpoint is written by rank 0 after every process handed over its random state;
all processes then agree that the file is on disk before going on. A resumed run
restores the position inside the epoch, the model, the optimizer, the loss scaler and
each process's random state, and continues bit for bit (on CPU; see the README).
"""
import functools
import os
import random
from dataclasses import dataclass, fields

import numpy as np
import torch

from src.checkpoint import (check_checkpoint_paths, load_model_state, newest_checkpoint,
                            remove_stray_temp_files, save_atomic, set_aside, strip_prefix,
                            with_module_prefix)
from src.config import resume_rule
from src.distributed import all_gather_objects, all_reduce_sum, get_rank, get_world_size
from src.errors import DiskError, NonFiniteLoss, UsageError
from src.logger import get_logger
from src.train.optim import load_optimizer_state


def random_state():
    """This process's generators: python, numpy, torch (CPU) and the current CUDA device."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_random_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def every_random_state():
    """The random state of every process, in rank order (a collective)."""
    return all_gather_objects([random_state()])


def settings(configs):
    """(name, value, rule, reason) of every field of the configs (the entries of a dict
    field, e.g. a method's hyper-parameters, each under its own name)."""
    for config in configs:
        for f in fields(config):
            rule, reason = resume_rule(config, f.name)
            value = getattr(config, f.name)
            items = value.items() if isinstance(value, dict) else [(f.name, value)]
            for name, item in items:
                yield name, _plain(item), rule, reason


def check_flags(saved, configs, total_batch, path):
    """Refuse to resume a run written with other model or maths flags (one line naming
    them); warn where the continuation is allowed but not bit-exact. `configs` are the
    settings of this run (src/config.py says what each change means); `total_batch` is
    (--batch_size x processes, processes)."""
    log = get_logger()
    if not saved:
        log.warning(f"{path} records no flags (a file of the authors?): resuming without "
                    f"checking them")
        return
    saved = {"method": "resa", **saved}  # checkpoints from before --method were ReSA's
    changes = {}  # by flag: a flag that two configs hold (--mean) is named once
    for name, value, rule, reason in settings(configs):
        if name in saved and saved[name] != value and not (rule == "adopt" and value is None):
            changes.setdefault(name, (name, rule, reason, f"--{name} {saved[name]} -> {value}"))
    changed = list(changes.values())
    differ = [change for _, rule, _, change in changed if rule in ("refuse", "adopt")]
    batch, world_size = total_batch
    saved_batch = saved.get("batch_size", 0) * saved.get("world_size", 1)
    if saved_batch != batch:
        differ.append(f"total batch {saved_batch} -> {batch} (--batch_size x processes)")
    if differ:
        raise UsageError(f"{path} was written with other flags: {'; '.join(differ)}; resume "
                         f"with the same ones or use another --dump_path")
    if saved.get("world_size", 1) != world_size:
        log.warning(f"resuming a run of {saved.get('world_size', 1)} process(es) on "
                    f"{world_size} with the same total batch: the same samples and "
                    f"views, but batch-norm statistics differ; bit-exactness needs the "
                    f"same layout")
    for _, rule, reason, change in changed:
        if rule == "warn":
            log.warning(f"{change}: {reason}")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# The entries a resume reads, where present, and their types; a dict lists the
# entries that such an entry must hold.
LAYOUT = {
    "state_dict": dict, "epoch": int, "iteration": int, "scaler": dict, "scheduler": dict,
    "args": dict, "random_states": list, "optimizer": {"state": dict, "param_groups": list},
    "loop": {"loss_sum": (int, float), "data": {"reads": int, "bad": int, "files": list}},
}


def layout_problem(entries, layout=LAYOUT, where=""):
    """What in the dict `entries` does not match `layout` (one phrase), or None."""
    for name, kind in layout.items():
        if name not in entries:
            if where:
                return f"no {where}{name}"
            continue
        value = entries[name]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                return f"{where}{name} is a {type(value).__name__}, not a dict"
            problem = layout_problem(value, kind, f"{where}{name}.")
            if problem:
                return problem
        elif not isinstance(value, kind):
            return f"{where}{name} is a {type(value).__name__}"
    return None


def check_layout(checkpoint, source, script, required):
    """A UsageError unless the loaded `checkpoint` has the layout of a checkpoint of
    `script` with the `required` entries: a file that loads but holds something else
    (a tensor, {'state_dict': 5}) must not end in a traceback."""
    if not isinstance(checkpoint, dict):
        problem = f"a {type(checkpoint).__name__}, not a dict of entries"
    else:
        missing = [key for key in ("state_dict", *required) if key not in checkpoint]
        problem = f"no {', '.join(missing)}" if missing else layout_problem(checkpoint)
        if problem is None and not all(
                isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values()):
            problem = "its state_dict holds more than tensors"
        if problem is None and not all(
                isinstance(state, dict) and {"python", "numpy", "torch"} <= set(state)
                for state in checkpoint.get("random_states", [])):
            problem = "its random_states are not random states"
    if problem:
        raise UsageError(f"{source} is not a {script}.py checkpoint ({problem})")


def check_finite(state_dict, position):
    """NonFiniteLoss unless every floating-point tensor of `state_dict` is finite (one
    host synchronisation): a checkpoint never holds diverged weights."""
    floats = {k: v for k, v in state_dict.items() if v.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()])
    if not finite.all():
        names = [k for k, ok in zip(floats, finite.tolist()) if not ok]
        raise NonFiniteLoss(f"the weights are not finite at epoch {position['epoch'] + 1}, "
                            f"iteration {position['iteration']} (e.g. {names[0]}): the last "
                            f"update diverged, so no checkpoint was written")


@dataclass(frozen=True)
class ResumeRules:
    """What a script's checkpoint `name` (in --dump_path) must hold and match to be
    resumed: the `required` entries besides `state_dict`, the flags of `configs` (the
    settings that define the run, see src/config.py) and the total batch
    (--batch_size x processes, processes)."""
    name: str
    script: str
    required: tuple
    configs: tuple
    total_batch: tuple


class RunCheckpoint:
    """The checkpoint file of a run in --dump_path: found and restored at start-up,
    written collectively during training (the previous file kept as `.prev`), with the
    run's `flags` (and its number of processes) recorded in it. Create it while holding
    the dump folder's lock (src/train/startup.py)."""

    def __init__(self, path, flags, processes):
        self.path, self.flags, self.processes = path, flags, processes

    def load(self, rules):
        """The newest readable checkpoint (None if the run is new), checked against
        ResumeRules `rules`, once stray temporary files of a killed save are removed.
        After a fall back on the previous checkpoint, the unreadable newest one is set
        aside, so that the next save does not rotate it over the good one."""
        if get_rank() == 0:
            remove_stray_temp_files(os.path.dirname(self.path) or ".")
        check_checkpoint_paths(self.path)
        validate = functools.partial(check_layout, script=rules.script, required=rules.required)
        checkpoint, source = newest_checkpoint(self.path, validate)
        if checkpoint is None:
            return None
        if source != self.path and get_rank() == 0 and os.path.lexists(self.path):
            get_logger().warning(f"the unreadable {self.path} set aside as "
                                 f"{set_aside(self.path)}")
        check_flags(checkpoint.get("args", {}), rules.configs, rules.total_batch, source)
        checkpoint["source"] = source
        return checkpoint

    def restore(self, checkpoint, model, amp):
        """Load model, optimizer, loss scaler and this process's random state. The
        scaler's state only when both runs scale the loss: an fp16 run resuming an fp32,
        bf16 or CPU one starts with a fresh scaler."""
        source = checkpoint["source"]
        load_model_state(model, strip_prefix(checkpoint["state_dict"], "module."), source)
        if "optimizer" in checkpoint:
            try:
                load_optimizer_state(amp.optimizer, checkpoint["optimizer"])
            except ValueError as err:
                raise UsageError(f"{source} was written with other settings: {err}")
        if checkpoint.get("scaler") and amp.scaler.is_enabled():  # {}: saved without scaling
            amp.scaler.load_state_dict(checkpoint["scaler"])
        states = checkpoint.get("random_states", [])
        if len(states) == get_world_size():
            set_random_state(states[get_rank()])

    def save(self, position, model, amp, extra, copies=()):
        """Write the checkpoint at `position` ({"epoch", "iteration", ...} of the
        loop) on rank 0, and the same content to each of `copies` (e.g. best.pth.tar);
        every process takes part and stops together if a write failed."""
        states = every_random_state()
        failed = None
        if get_rank() == 0:
            state = {**position, "state_dict": with_module_prefix(model.state_dict()),
                     "optimizer": amp.optimizer.state_dict(), "scaler": amp.scaler.state_dict(),
                     "random_states": states,
                     "args": {**self.flags, "world_size": self.processes.world_size}, **extra}
            try:
                check_finite(state["state_dict"], position)
                save_atomic(state, self.path, keep_previous=True)
                for path in copies:
                    save_atomic(state, path)
            except (DiskError, NonFiniteLoss) as err:
                failed = err
        kinds = (DiskError, NonFiniteLoss)  # the same exception on every process
        flags = torch.tensor([float(isinstance(failed, kind)) for kind in kinds],
                             device=self.processes.device)
        for kind, flag in zip(kinds, all_reduce_sum(flags).tolist()):
            if flag:
                raise failed or kind("stopped: rank 0 could not write the checkpoint")
