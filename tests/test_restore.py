"""RunCheckpoint.restore across settings that may change between runs: the precision
(a loss scaler on one side only) and the optimizer's kernels (--fused, and torch's
foreach or per-tensor loop), each continuing without error and, where the maths is
the same, with the same numbers."""
import copy

import pytest
import torch

from src.checkpoint import with_module_prefix
from src.distributed import Processes
from src.train.optim import AmpOptimizer
from src.train.resume import RunCheckpoint

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
KERNELS = {"fused": dict(fused=True), "foreach": dict(foreach=True),
           "per-tensor": dict(foreach=False)}


def restore(checkpoint, model, amp, tmp_path):
    run = RunCheckpoint(str(tmp_path / "checkpoint.pth.tar"), {}, Processes(device=CPU))
    # a copy: the optimizer would update the checkpoint's tensors in place
    run.restore({**copy.deepcopy(checkpoint), "source": "the checkpoint"}, model, amp)


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


def optimizer(name, kernel, model):
    """SGD as main.py builds it, or AdamW, with one of torch's three kernels."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                               **KERNELS[kernel])
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=1e-4, **KERNELS[kernel])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_state_moves_between_fused_foreach_and_per_tensor(name, tmp_path):
    """Two steps with one kernel, a checkpoint, two more with another: no error, this
    run's kernel steps, and the numbers are those of the uninterrupted run (the same
    bits with the same kernel; the kernels differ only by float rounding)."""
    for saved_kernel in KERNELS:
        model, x, y = regression()
        amp = AmpOptimizer(optimizer(name, saved_kernel, model), CPU)
        train(model, amp, x, y, 2)
        saved = checkpoint_of(model, amp)
        train(model, amp, x, y, 2)  # the uninterrupted run
        for kernel in KERNELS:
            resumed, _, _ = regression(seed=1)
            again = AmpOptimizer(optimizer(name, kernel, resumed), CPU)
            restore(saved, resumed, again, tmp_path)
            group = again.optimizer.param_groups[0]
            assert {k: group[k] for k in KERNELS[kernel]} == KERNELS[kernel]
            train(resumed, again, x, y, 2)
            for ours, theirs in zip(resumed.parameters(), model.parameters()):
                if kernel == saved_kernel:
                    assert torch.equal(ours, theirs), (saved_kernel, kernel)
                else:
                    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (
                        saved_kernel, kernel)


def test_a_fused_run_gets_step_tensors_where_its_kernel_wants_them(tmp_path):
    """Torch places AdamW's `step` tensors when loading, by the kernel flags of the
    groups it loads: a fused kernel wants them float32 on the parameters' device (on
    CUDA a per-tensor run's CPU ones make it fail), the per-tensor loop leaves them as
    they were saved. The file's flags are not this run's: every tensor must be placed
    for this run's kernel. On this machine all tensors are on the CPU, so the test sees
    the rule through the dtype it also sets, with `step` tensors saved as float64 (as
    torch writes them under a float64 default dtype)."""
    model, x, y = regression()
    amp = AmpOptimizer(optimizer("adamw", "per-tensor", model), CPU)
    train(model, amp, x, y, 2)
    saved = checkpoint_of(model, amp)
    for state in saved["optimizer"]["state"].values():
        state["step"] = state["step"].double()
    for kernel, dtype in (("fused", torch.float32), ("per-tensor", torch.float64)):
        resumed, _, _ = regression(seed=1)
        again = AmpOptimizer(optimizer("adamw", kernel, resumed), CPU)
        restore(saved, resumed, again, tmp_path)
        for param in resumed.parameters():
            state = again.optimizer.state[param]
            assert state["step"].dtype == dtype and state["step"].device == param.device
            assert all(state[k].dtype == param.dtype for k in ("exp_avg", "exp_avg_sq"))
        train(resumed, again, x, y, 1)
