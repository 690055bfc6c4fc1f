"""Run a script with batch norm over the batch of every process, as SyncBatchNorm does
on GPUs (it supports no CPU tensors): `python tests/global_bn_run.py main.py ARGS`,
alone or under torchrun. main.py on CPU keeps batch norm per process, so two processes
with half batches cannot train as one process on the whole batch; with this stand-in
they must, up to float rounding, and every other difference (samples, views, gathers,
Sinkhorn-Knopp, gradient averaging, learning rate) would show."""
import runpy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_reduce

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def global_sum(tensor):
    """The sum of `tensor` over the processes (itself on one), with its gradient; every
    process holds the same number of samples."""
    return all_reduce(tensor) if dist.is_initialized() else tensor


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics come from sums all-reduced over the
    processes (with their gradient), computed the same way on a single process."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        axes = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * (dist.get_world_size() if dist.is_initialized() else 1)
        mean = global_sum(x.sum(axes)) / count  # two passes: the variance of the centred
        var = global_sum(((x - mean.view(shape)) ** 2).sum(axes)) / count  # samples
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def global_batchnorm(module, processes=None):
    """`module` with every batch norm replaced by a GlobalBatchNorm that holds its
    parameters and buffers (the same tensors: a frozen one stays frozen), as
    SyncBatchNorm.convert_sync_batchnorm does; the signature of
    src.distributed.sync_batchnorm, which it replaces."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        norm = GlobalBatchNorm(module.num_features, module.eps, module.momentum,
                               module.affine, module.track_running_stats)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            setattr(norm, name, tensor)
        return norm
    for name, child in module.named_children():
        module.add_module(name, global_batchnorm(child))
    return module


if __name__ == "__main__":
    import src.distributed
    src.distributed.sync_batchnorm = global_batchnorm  # main.py imports it after this
    script = sys.argv.pop(1)
    sys.argv[0] = script
    runpy.run_path(str(REPO / script), run_name="__main__")
