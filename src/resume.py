"""Exact continuation of a run: what its checkpoints hold beyond the weights, when a
checkpoint may be resumed, and how every process writes and restores one.

A checkpoint is written by rank 0 after every process handed over its random state;
all processes then agree that the file is on disk before going on. A resumed run
restores the position inside the epoch, the model, the optimizer, the loss scaler and
each process's random state, and continues bit for bit (on CPU; see the README).
"""
import os
import random

import numpy as np
import torch

from src.checkpoint import (load_model_state, newest_checkpoint, plain_args,
                            remove_stray_temp_files, save_atomic, strip_prefix,
                            with_module_prefix)
from src.distributed import all_gather_objects, all_reduce_sum, get_rank, get_world_size
from src.errors import UsageError
from src.logger import get_logger
from src.optim import load_optimizer_state

# flags whose change would make the resumed run another run (refused), per script
REFUSED = {
    "main": ("dataset", "size_dataset", "arch", "stem", "mlp_layers", "mlp_dim", "emb", "pred",
             "crops_nmb", "crops_size", "crops_min_scale", "crops_max_scale",
             "solarization_prob", "temperature", "momentum", "lr", "final_lr", "wd",
             "optimizer", "warmup_epochs", "seed"),
    "eval_linear": ("dataset", "arch", "stem", "crops_size", "num_classes", "weights",
                    "train_percent", "train_files", "lr_classifier", "lr_encoder",
                    "scheduler", "seed", "pretrained"),
}


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


def check_flags(saved, args, script, path):
    """Refuse to resume a run written with other model or maths flags (one line naming
    them); warn where the continuation is allowed but not bit-exact."""
    log = get_logger()
    if not saved:
        log.warning(f"{path} records no flags (a file of the authors?): resuming without "
                    f"checking them")
        return
    differ = [f"--{name} {saved[name]} -> {_plain(getattr(args, name))}"
              for name in REFUSED[script]
              if name in saved and saved[name] != _plain(getattr(args, name))]
    total = (saved.get("batch_size", 0) * saved.get("world_size", 1),
             args.batch_size * args.world_size)
    if total[0] != total[1]:
        differ.append(f"total batch {total[0]} -> {total[1]} (--batch_size x processes)")
    if differ:
        raise UsageError(f"{path} was written with other flags: {'; '.join(differ)}; resume "
                         f"with the same ones or use another --dump_path")
    if saved.get("world_size", 1) != args.world_size:
        log.warning(f"resuming a run of {saved.get('world_size', 1)} process(es) on "
                    f"{args.world_size} with the same total batch: the same samples and "
                    f"views, but batch-norm statistics differ; bit-exactness needs the "
                    f"same layout")
    if saved.get("epochs") != args.epochs:
        log.warning(f"--epochs {saved.get('epochs')} -> {args.epochs}: the learning-rate "
                    f"and EMA schedules were recomputed for the new length")
    if saved.get("data_backend", args.data_backend) != args.data_backend:
        log.warning(f"--data_backend {saved['data_backend']} -> {args.data_backend}: the "
                    f"augmentations go on with another random stream")
    if saved.get("precision", args.precision) != args.precision:
        log.warning(f"--precision {saved['precision']} -> {args.precision}: the continuation "
                    f"is not bit-exact")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


class RunCheckpoint:
    """The checkpoint file of a run in --dump_path: found and restored at start-up,
    written collectively during training (the previous file kept as `.prev`)."""

    def __init__(self, path, args):
        self.path, self.args = path, args
        if get_rank() == 0:
            remove_stray_temp_files(os.path.dirname(path) or ".")

    def load(self, required):
        """The newest readable checkpoint (None if the run is new), its flags checked.
        Adopts its seed when --seed was not given, so an unseeded run resumes exactly."""
        checkpoint, source = newest_checkpoint(self.path)
        if checkpoint is None:
            return None
        missing = [key for key in ("state_dict", *required) if key not in checkpoint]
        if missing:
            raise UsageError(f"{source} is not a {self.args.script}.py checkpoint (no "
                             f"{', '.join(missing)}); use another --dump_path")
        saved = checkpoint.get("args", {})
        if self.args.seed is None and saved.get("seed") is not None:
            self.args.seed = saved["seed"]
        check_flags(saved, self.args, self.args.script, source)
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
                     "random_states": states, "args": plain_args(self.args), **extra}
            try:
                save_atomic(state, self.path, keep_previous=True)
                for path in copies:
                    save_atomic(state, path)
            except UsageError as err:
                failed = err
        flag = torch.tensor([float(failed is not None)], device=self.args.device)
        if all_reduce_sum(flag).item():
            raise failed or UsageError("stopped: rank 0 could not write the checkpoint")
