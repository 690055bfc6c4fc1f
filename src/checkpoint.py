"""Checkpoint I/O: atomic writes, `weights_only` loading, resume and encoder export.

Layout of `checkpoint.pth.tar` (SPEC §4): `epoch` (epochs completed), `state_dict`
(model keys prefixed `module.` as under DDP), `optimizer`; we add `scaler` (AMP) and
`args` (the flags, as plain values) for reproducibility.
"""
import os
import pickle
import tempfile

import numpy as np
import torch

from src.errors import UsageError


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, fsync, then rename over `path`,
    so that a killed run leaves either the old or the new file, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pth")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what users expect
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# The authors' training loop stores numpy scalars (the scheduled lr) in the optimizer
# state of their checkpoints, pickled under numpy 1.x as `numpy.core.multiarray.scalar`
# (numpy 2 writes `numpy._core...`). Numpy scalars and dtypes are data, not code: allow
# both names.
_SCALAR = (getattr(np, "_core", None) or np.core).multiarray.scalar
_NUMPY_DATA = [_SCALAR, (_SCALAR, "numpy.core.multiarray.scalar"), np.dtype,
               *{type(np.dtype(t)) for t in (np.float16, np.float32, np.float64,
                                             np.int32, np.int64, np.bool_)}]


def load_file(path):
    """torch.load with weights_only=True on CPU; any file that does not load as a
    checkpoint of tensors and plain values becomes one clear UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_NUMPY_DATA):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        if not reason:  # foreign bytes, not a refused class
            raise UsageError(f"{path} is not a readable PyTorch checkpoint (not a pickle "
                             f"of tensors and plain values)")
        detail = f" ({reason[0]})"
        raise UsageError(f"{path} holds pickled objects or code that weights_only loading "
                         f"refuses; only tensors and plain containers are loaded{detail}")
    except Exception as err:  # torch.load on foreign bytes raises KeyError, EOFError, ...
        raise UsageError(f"{path} is not a readable PyTorch checkpoint "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")


def plain_args(args):
    """The flags as values that weights_only loading accepts."""
    keep = (bool, int, float, str, type(None))
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, keep):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, keep) for v in value):
            out[key] = list(value)
    return out


def with_module_prefix(state_dict):
    return {"module." + k: v for k, v in state_dict.items()}


def strip_prefix(state_dict, prefix):
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_model_state(model, state_dict, source):
    """Strict load; a mismatch names what is missing or unexpected instead of a traceback."""
    missing = sorted(set(model.state_dict()) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(model.state_dict()))
    if missing or unexpected:
        raise UsageError(f"{source} does not fit this model (different --arch or network "
                         f"flags?): missing {few_keys(missing)}; unexpected {few_keys(unexpected)}")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise UsageError(f"{source} does not fit this model: {str(err).splitlines()[-1].strip()}")


def restore(path, model, amp, required, kind):
    """Resume a run: load model, optimizer and AMP scaler from `path` when it exists.

    Returns the checkpoint dict (None without a file); a file lacking `required` keys
    or written with other settings is a UsageError.
    """
    if not os.path.isfile(path):
        return None
    checkpoint = load_file(path)
    missing = [key for key in ("state_dict", *required) if key not in checkpoint]
    if missing:
        raise UsageError(f"{path} is not a {kind} checkpoint (no {', '.join(missing)}); "
                         f"use another --dump_path")
    load_model_state(model, strip_prefix(checkpoint["state_dict"], "module."), path)
    if "optimizer" in checkpoint:
        try:
            amp.optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError as err:
            raise UsageError(f"{path} was written with other settings: {err}")
    if "scaler" in checkpoint and amp.scaler.is_enabled():
        amp.scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint


def few_keys(keys, n=5):
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


ENCODER_PREFIXES = ("momentum_encoder.", "encoder.", "backbone.")  # in order of preference


def encoder_form(checkpoint):
    """(encoder weights in torchvision layout, a short description of the form) of any
    checkpoint form users have.

    A full checkpoint (ours or the authors', `state_dict` with `module.` keys) gives its
    momentum encoder; an encoder-only file may carry `module.`, `momentum_encoder.`,
    `encoder.` or `backbone.` prefixes and a torchvision `fc` head, which is dropped.
    Tensors that are not under the chosen prefix are ignored.
    """
    nested = isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)
    state = checkpoint["state_dict"] if nested else checkpoint
    state = {k.removeprefix("module."): v for k, v in state.items()
             if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    for prefix in ENCODER_PREFIXES:
        picked = strip_prefix(state, prefix)
        if not picked:
            continue
        if prefix != "momentum_encoder.":
            form = f"checkpoint with an '{prefix}' prefix"
        elif any(k.startswith(("encoder.", "projector.")) for k in state):
            form = "full checkpoint: its momentum encoder"
        else:
            form = "momentum encoder alone ('momentum_encoder.' keys)"
        break
    else:
        picked, form = state, "encoder-only state dict, torchvision layout"
        if any(k.startswith("fc.") for k in picked):
            form += " (its fc head dropped)"
    return {k: v for k, v in picked.items() if not k.startswith("fc.")}, form
