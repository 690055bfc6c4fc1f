"""Checkpoint files: atomic writes that keep the previous checkpoint, `weights_only`
loading, and the key mapping of every checkpoint form users have.

Layout of `checkpoint.pth.tar` (SPEC §4): `epoch` (epochs completed), `state_dict`
(model keys prefixed `module.` as under DDP), `optimizer`; we add `iteration`
(iterations done inside the next epoch), `scaler` (AMP), `args` (the flags, as plain
values) and what an exact continuation needs (see src/resume.py).
"""
import errno
import glob
import os
import pickle
import tempfile
import time

import numpy as np
import torch

from src.errors import DiskError, UsageError
from src.logger import get_logger

TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".pth"


def previous_path(path):
    """Where the checkpoint before `path` is kept: checkpoint.pth.tar -> checkpoint.prev.pth.tar."""
    folder, name = os.path.split(path)
    stem, dot, rest = name.partition(".")
    return os.path.join(folder, f"{stem}.prev{dot}{rest}")


def save_atomic(obj, path, keep_previous=False):
    """Write `obj` to `path` so that a complete file is there at every moment.

    The bytes go to a temporary file in the same folder, are fsynced, and the file is
    renamed over `path`. With `keep_previous` the old `path` first becomes
    `previous_path(path)` as a second name of the same file (a hard link, itself put in
    place by a rename), so that a kill between the two renames still leaves `path`. A
    failed write (disk full, quota, file-size limit) is one DiskError naming the path
    and the OS error; the old files stay as they were and no temporary file is left.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what users expect
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            keep_as_previous(path, f"{tmp}.prev{TEMP_SUFFIX}")
        os.replace(tmp, path)
        tmp = None
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the renames themselves survive a power cut
        finally:
            os.close(directory)
    except (OSError, RuntimeError) as err:
        cause = os_error(err)
        if cause is None:
            raise
        raise DiskError(f"cannot write {path}: {cause.strerror or cause}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def keep_as_previous(path, link):
    """Make `previous_path(path)` a second name of the file at `path`, which stays: a
    hard link `link`, renamed over the previous copy. A file system without hard links
    gets a plain rename (a kill before the next rename then leaves only the previous
    copy, which a restart falls back on)."""
    try:
        os.link(path, link)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        os.replace(path, previous_path(path))
        return
    try:
        os.replace(link, previous_path(path))
    finally:
        if os.path.lexists(link):
            os.remove(link)


def os_error(err):
    """The OSError behind `err`: itself, or the one torch.save's RuntimeError ("unexpected
    pos ...") was raised on top of; None when the failure is not the file system's."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def remove_stray_temp_files(folder):
    """Delete the temporary files that a run killed while saving left in `folder` (call
    it only while holding the folder's lock: another run's files are not stray)."""
    for path in glob.glob(os.path.join(folder, f"{TEMP_PREFIX}*{TEMP_SUFFIX}")):
        if not os.path.isfile(path) or os.path.islink(path):
            get_logger().warning(f"{path} is named like a temporary checkpoint file but is "
                                 f"not a regular file: left alone")
            continue
        os.remove(path)
        get_logger().info(f"removed {path}, left by a run killed while saving")


def check_checkpoint_paths(path):
    """A UsageError if something other than a file sits where the checkpoint (or its
    previous copy) goes: every save would fail, after training."""
    for candidate in (path, previous_path(path)):
        if os.path.lexists(candidate) and not os.path.isfile(candidate):
            raise UsageError(f"{candidate} is not a file (a folder?) but the run's checkpoint "
                             f"goes there: move it away or use another --dump_path")


def set_aside(path):
    """Rename the unreadable checkpoint `path` to checkpoint.bad-<time>.pth.tar (kept
    for inspection, never rotated over a good previous checkpoint); returns the name."""
    folder, name = os.path.split(path)
    stem, dot, rest = name.partition(".")
    aside = os.path.join(folder, f"{stem}.bad-{time.strftime('%Y%m%d-%H%M%S')}{dot}{rest}")
    os.replace(path, aside)
    return aside


def newest_checkpoint(path, validate=None):
    """(checkpoint, file it came from) of the newest readable checkpoint at `path`, or
    (None, None) when there is none. `validate(checkpoint, file)` raises a UsageError
    for a file that loads but is not a checkpoint of this run's kind: it counts as
    unreadable.

    When `path` is unreadable (or missing while its previous copy exists) the run says so
    and resumes from `previous_path(path)`; when neither loads it stops, rather than
    start again from nothing over a run it cannot read.
    """
    previous = previous_path(path)
    if not os.path.isfile(path) and not os.path.isfile(previous):
        return None, None

    def load(file):
        checkpoint = load_file(file)
        if validate is not None:
            validate(checkpoint, file)
        return checkpoint

    try:
        return load(path), path
    except UsageError as err:
        newest = err
    if not os.path.isfile(previous):
        raise UsageError(f"{newest}; no previous checkpoint {previous} to fall back on: move "
                         f"the file away to start a new run")
    try:
        checkpoint = load(previous)
    except UsageError as err:
        raise UsageError(f"{newest}; the previous one is unreadable too ({err}): move both "
                         f"away to start a new run") from None
    get_logger().warning(f"{newest}: resuming from the previous checkpoint {previous}")
    return checkpoint, previous


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


def few_keys(keys, n=5):
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


ENCODER_PREFIXES = ("momentum_encoder.", "encoder.", "backbone.")  # in order of preference
RECORDED_FORMS = {"momentum_encoder.": "momentum", "encoder.": "online"}


def encoder_form(checkpoint):
    """(encoder weights in torchvision layout, a short description of the form) of any
    checkpoint form users have.

    A full checkpoint (ours or the authors', `state_dict` with `module.` keys) gives the
    encoder its method evaluates (`evaluated_encoder`, recorded by main.py: the
    momentum encoder of ReSA, the online one of BYOL; the momentum encoder in the
    authors' files); an encoder-only file may carry `module.`, `momentum_encoder.`,
    `encoder.` or `backbone.` prefixes and a torchvision `fc` head, which is dropped.
    Tensors that are not under the chosen prefix are ignored.
    """
    nested = isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)
    state = checkpoint["state_dict"] if nested else checkpoint
    state = {k.removeprefix("module."): v for k, v in state.items()
             if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    recorded = checkpoint.get("evaluated_encoder") if nested else None
    for prefix in sorted(ENCODER_PREFIXES, key=lambda p: p != recorded):  # recorded first
        picked = strip_prefix(state, prefix)
        if not picked:
            continue
        if prefix == recorded:
            form = f"full checkpoint: its {RECORDED_FORMS.get(prefix, repr(prefix))} encoder"
        elif prefix != "momentum_encoder.":
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
    return _without_fc(picked), form


def _without_fc(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}
