"""Loading the encoder to evaluate from any checkpoint form users have (SPEC §5).

The key mapping lives in `src.checkpoint.encoder_form`; this module adds the strict
load, the refusal of files that fit no encoder, and a log line saying what was found.
"""
import torch.distributed as dist

from src.checkpoint import encoder_form, few_keys, load_file, load_model_state
from src.distributed import is_distributed
from src.errors import UsageError
from src.logger import get_logger


def broadcast_from_rank0(module):
    """Copy rank 0's parameters and buffers of `module` to every process, in place
    (the module must be on the device of the process-group backend)."""
    if is_distributed():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def load_encoder_state(encoder, checkpoint, source):
    """Load the encoder weights of `checkpoint` (a loaded file of any form) into
    `encoder`, strictly; return the form found. A file that fits no encoder, or lacks
    some of its keys, is a UsageError."""
    tensors = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(tensors, dict):
        raise UsageError(f"{source} holds no state dict of tensors")
    state, form = encoder_form(checkpoint)
    wanted = encoder.state_dict()
    if not set(state) & set(wanted):
        raise UsageError(f"{source} fits no encoder: it holds "
                         f"{few_keys(sorted(map(str, tensors)))} but no encoder key such as "
                         f"{few_keys(list(wanted), 3)}")
    load_model_state(encoder, state, source)
    epoch = checkpoint.get("epoch")
    saved = f", saved after epoch {epoch}" if epoch is not None else ""
    get_logger().info(f"loaded {len(state)} encoder tensors from {source} ({form}{saved})")
    return form


def load_pretrained_encoder(encoder, path):
    """Load `path` into `encoder` strictly; return the form found (None for random init).

    An empty `path` keeps the random initialisation (the README's random baseline),
    rank 0's on every process. A missing file, pickled code, or a file that lacks any
    or some of the encoder's keys is a UsageError.
    """
    if not path:
        get_logger().warning("no --pretrained given: evaluating a RANDOMLY INITIALISED "
                             "encoder (the random baseline)")
        broadcast_from_rank0(encoder)
        return None
    return load_encoder_state(encoder, load_file(path), path)
