"""RunCheckpoint.restore across settings that may change between runs: the precision
(a loss scaler on one side only) and the optimizer's kernels (--fused, and torch's
foreach or per-tensor loop), each continuing without error and, where the maths is
the same, with the same numbers."""
import copy
import types

import pytest
import torch

from src.checkpoint import with_module_prefix
from src.optim import AmpOptimizer
from src.resume import RunCheckpoint

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
KERNELS = {"fused": dict(fused=True), "foreach": dict(foreach=True),
           "per-tensor": dict(foreach=False)}


def restore(checkpoint, model, amp, tmp_path):
    args = types.SimpleNamespace(device=CPU)
    run = RunCheckpoint(str(tmp_path / "checkpoint.pth.tar"), args)
    run.restore({**checkpoint, "source": "the checkpoint"}, model, amp)


def regression(seed=0):
    """A model and data whose gradients are all far from zero (see test_speed)."""
    torch.manual_seed(seed)
    return torch.nn.Linear(16, 4), torch.randn(32, 16), torch.randn(32, 4)


def train(model, amp, x, y, steps):
    for _ in range(steps):
        with amp.autocast():
            loss = ((model(x) - y) ** 2).mean()
        amp.step(loss)


def checkpoint_of(model, amp):
    """What RunCheckpoint.save writes of the model, optimizer and scaler."""
    return copy.deepcopy({"state_dict": with_module_prefix(model.state_dict()),
                          "optimizer": amp.optimizer.state_dict(),
                          "scaler": amp.scaler.state_dict()})


def with_loss_scaler(amp):
    """`amp` as --precision fp16 builds it on CUDA: float16 autocast and an enabled
    GradScaler (the CPU's, here)."""
    amp.scaler = torch.amp.GradScaler("cpu")
    return amp


def test_fp16_resumes_a_checkpoint_written_without_a_loss_scaler(tmp_path):
    """An fp32 (or bf16, or CPU) run saves the empty state of a disabled scaler; the
    fp16 run that resumes it starts its scaler afresh instead of failing."""
    model, x, y = regression()
    fp32 = AmpOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), CPU)
    train(model, fp32, x, y, 2)
    saved = checkpoint_of(model, fp32)
    assert saved["scaler"] == {}
    resumed, _, _ = regression(seed=1)
    fp16 = with_loss_scaler(AmpOptimizer(torch.optim.SGD(resumed.parameters(), lr=0.1), CPU))
    restore(saved, resumed, fp16, tmp_path)
    assert torch.equal(resumed.weight, model.weight)
    assert fp16.scaler.is_enabled() and fp16.scaler.get_scale() == 2.0 ** 16  # a fresh one
    train(resumed, fp16, x, y, 1)
    # a scaler's own state still comes back, and a disabled scaler ignores it
    fp16.scaler.update(new_scale=1024.0)
    scaled = checkpoint_of(resumed, fp16)
    again = with_loss_scaler(AmpOptimizer(torch.optim.SGD(resumed.parameters(), lr=0.1), CPU))
    restore(scaled, resumed, again, tmp_path)
    assert again.scaler.get_scale() == 1024.0
    plain = AmpOptimizer(torch.optim.SGD(resumed.parameters(), lr=0.1), CPU)
    restore(scaled, resumed, plain, tmp_path)
    assert not plain.scaler.is_enabled()
