"""Process-group set-up and the collectives ReSA needs.

`python main.py` runs one process with no process group: every collective below is
then an identity, so the same code path serves a laptop CPU, `torchrun` with gloo and
multi-node NCCL. SLURM's `srun` variables are translated to torch.distributed's.
"""
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from src.errors import UsageError


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return get_rank() == 0


def _first_slurm_host():
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def _translate_slurm_env():
    """Under `srun` (one task per GPU) fill RANK/WORLD_SIZE/LOCAL_RANK from SLURM."""
    if "SLURM_PROCID" not in os.environ or "RANK" in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return  # a plain `python main.py` inside an allocation stays one process
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    os.environ.setdefault("MASTER_PORT", str(10000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def with_cpu_backend(backend):
    """`backend` with gloo for CPU tensors where it has none: NCCL only moves CUDA
    tensors, and some collectives of a CUDA run hold CPU tensors (the k-NN bank of
    `--use_cuda False`, object gathers, rank 0's start-up flags). With
    "cpu:gloo,cuda:nccl" each tensor goes through its own device's backend."""
    if backend == "gloo" or "cpu:" in backend:
        return backend
    return f"cpu:gloo,cuda:{backend.split(':')[-1]}"


@dataclass(frozen=True)
class Processes:
    """Where this process runs: its rank among `world_size` processes, its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False


def init_distributed(run):
    """Start the process group when launched by torchrun/SLURM and pick the device, as
    config.Run `run` says; returns this process's Processes."""
    _translate_slurm_env()
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        index = 0 if run.no_set_device_rank else local_rank % torch.cuda.device_count()
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        backend = run.dist_backend or ("nccl" if cuda else "gloo")
        if backend == "nccl" and not cuda:
            raise UsageError("--dist-backend nccl needs CUDA GPUs; use gloo on CPU")
        dist.init_process_group(backend=with_cpu_backend(backend), init_method=run.dist_url,
                                world_size=int(os.environ["WORLD_SIZE"]),
                                rank=int(os.environ["RANK"]))
    return Processes(get_rank(), get_world_size(), local_rank, device, distributed)


def sync_batchnorm(model, processes):
    """Batch norm across the GPUs of the run (SyncBatchNorm), as the authors pretrain;
    the model itself on one process or on CPU. Build the optimizer from the result."""
    if processes.distributed and processes.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_ddp(model, processes):
    """`model` in DistributedDataParallel when the run has several processes; else
    `model` itself. The wrapper trains; checkpoints read the model."""
    if not processes.distributed:
        return model
    cuda = processes.device.type == "cuda"
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[processes.device] if cuda else None)


def cleanup():
    if is_distributed():
        dist.destroy_process_group()


def run_distributed(body, config):
    """Start the process group (when launched by torchrun or srun) as `config.run`
    says, run `body(config, processes)` on every process and always tear the group
    down."""
    processes = init_distributed(config.run)
    try:
        return body(config, processes)
    finally:
        cleanup()


@torch.no_grad()
def gather(tensor):
    """Concatenate `tensor` from every process in rank order (no gradient)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_reduce_sum(tensor):
    """Sum `tensor` over processes, in place, and return it."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def broadcast_int(value, device):
    """Rank 0's `value` on every process."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def all_gather_objects(items):
    """The lists `items` of every process, concatenated in rank order (a collective)."""
    if not is_distributed():
        return list(items)
    lists = [None] * get_world_size()
    dist.all_gather_object(lists, list(items))
    return [item for part in lists for item in part]


@torch.no_grad()
def gather_uneven(tensor):
    """Like `gather`, for first dimensions that differ between processes."""
    if not is_distributed():
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = gather(size).tolist()
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = gather(padded).split(max(sizes))
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def main_process_first(fn):
    """Run `fn` on rank 0 first (a download, a mkdir), then on the other ranks.

    A UsageError on rank 0 is re-raised on every rank instead of leaving the others
    waiting forever in a collective.
    """
    error = None
    if is_main_process():
        try:
            result = fn()
        except UsageError as err:
            error = err
    if is_distributed():
        failed = torch.tensor([int(error is not None)])  # CPU: see with_cpu_backend
        dist.broadcast(failed, src=0)
        if failed.item():
            raise error or UsageError("stopped: rank 0 reported the problem")
    elif error is not None:
        raise error
    return result if is_main_process() else fn()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of the gathered tensor over the
    processes and returns this process's rows (an all_reduce: every backend has it,
    where reduce_scatter is missing from gloo)."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad)
        rows = grad.shape[0] // get_world_size()
        return grad[get_rank() * rows:(get_rank() + 1) * rows]


def gather_with_grad(tensor):
    """Like `gather` (equal first dimensions, rank order), but the gradient flows back
    to every process's rows: for a loss that mixes all N rows (SimCLR's negatives),
    W processes then give DDP the gradients one process has on the full batch."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)
