"""The shared training loop: precision modes, the non-finite stop, positions that a
checkpoint restores, stop signals, and the bad-data rule."""
import copy
import os
import signal

import pytest
import torch

from src.config import Loop
from src.data.loader import train_loader
from src.errors import NonFiniteLoss, Preempted, UsageError
from src.train.loop import DataHealth, TrainLoop
from src.train.optim import AmpOptimizer
from src.train.preemption import StopSignals


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
def test_precision_modes():
    """(On a machine without CUDA, GradScaler disables itself: fp16 is tested for its
    autocast dtype only.)"""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    fp32, bf16 = (AmpOptimizer(optimizer, torch.device("cpu"), p) for p in ("fp32", "bf16"))
    assert not fp32.scaler.is_enabled() and not bf16.scaler.is_enabled()  # no loss scaling
    assert AmpOptimizer(optimizer, torch.device("cuda"), "fp16").dtype == torch.float16
    layer = torch.nn.Linear(4, 4)
    with fp32.autocast():
        assert layer(torch.ones(1, 4)).dtype == torch.float32
    with bf16.autocast():
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16


def values_loader(values, batch_size=1, seed=0):
    """A training loader over scalar samples; batches are (batch_size,) tensors."""
    return train_loader([torch.tensor(float(v)) for v in values], batch_size, 0, seed)


def make_loop(loader, weight, forward=None, lr=0.5, saves=None, epochs=1, **kwargs):
    amp = AmpOptimizer(torch.optim.SGD([weight], lr=lr), torch.device("cpu"))
    forward = forward or (lambda batch: (weight * batch).sum())
    return TrainLoop(loader, forward, amp, Loop(epochs=epochs, checkpoint_minutes=0),
                     save=lambda position: saves.append(position) if saves is not None else None,
                     **kwargs)


def test_non_finite_loss_stops_before_the_update():
    weight = torch.nn.Parameter(torch.ones(1))
    loader = values_loader([1.0, float("inf")])
    order = [int(b.data.isinf().item()) for b in loader]  # the seeded order of the 2 samples
    steps = []
    loop = make_loop(loader, weight, before_step=lambda i: steps.append(i) or {})
    with pytest.raises(NonFiniteLoss, match=r"loss is (inf|nan) at epoch 1, iteration \d"):
        loop.run_epoch()
    assert steps == list(range(order.index(1) + 1))
    assert weight.item() == (0.5 if order == [0, 1] else 1.0)  # only finite steps updated


def test_mean_loss_and_iterations_counted_from_the_start_of_the_run():
    weight = torch.nn.Parameter(torch.zeros(1))
    steps = []
    loop = make_loop(values_loader([1.0, 3.0]), weight, lambda b: (weight + b).sum(), lr=0.0,
                     epochs=4, before_step=lambda i: steps.append(i) or {})
    loop.epoch = 2
    assert loop.run_epoch() == pytest.approx(2.0)
    assert steps == [4, 5] and (loop.epoch, loop.iteration) == (3, 0)


def test_a_restored_position_continues_the_same_steps():
    """A fresh loop given a mid-epoch checkpoint (position, weight, optimizer) runs the
    remaining steps of the uninterrupted epoch, with the same losses and end weight."""
    def run(checkpoint=None):
        weight = torch.nn.Parameter(torch.ones(1))
        losses, saves = [], []

        def forward(batch):
            loss = ((weight - batch) ** 2).mean()
            losses.append(loss.item())
            return loss

        amp = AmpOptimizer(torch.optim.SGD([weight], lr=0.1, momentum=0.9), torch.device("cpu"))

        def save(position):
            saves.append({**copy.deepcopy(position), "weight": weight.item(),
                          "optimizer": copy.deepcopy(amp.optimizer.state_dict())})

        loop = TrainLoop(values_loader(range(16), batch_size=2), forward, amp,
                         Loop(epochs=1, checkpoint_minutes=0, checkpoint_iters=3), save=save)
        if checkpoint:
            weight.data.fill_(checkpoint["weight"])
            amp.optimizer.load_state_dict(checkpoint["optimizer"])
            loop.load_position(checkpoint)
        mean = loop.run_epoch()
        return losses, weight.item(), saves, mean

    losses, weight, saves, mean = run()
    assert [s["iteration"] for s in saves] == [3, 6]  # mid-epoch only: not at the end
    assert saves[0]["loop"]["loss_sum"] == pytest.approx(sum(losses[:3]))
    rest, resumed_weight, _, resumed_mean = run(saves[0])
    assert rest == losses[3:] and resumed_weight == weight
    assert resumed_mean == mean  # the epoch's mean covers the steps before the resume too


def test_a_stop_signal_saves_once_then_every_process_stops():
    weight = torch.nn.Parameter(torch.zeros(1))
    saves = []

    def forward(batch):
        if len(saves) == 0 and forward.calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the third step
        forward.calls += 1
        return (weight * batch).sum()
    forward.calls = 0

    with StopSignals() as signals, pytest.raises(Preempted):
        with make_loop(values_loader(range(6)), weight, forward, saves=saves,
                       signals=signals) as loop:
            loop.run_epoch()
    assert [(s["epoch"], s["iteration"]) for s in saves] == [(0, 3)]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back


def test_data_health_rule():
    """More than 1% unreadable stops, checked from 1,000 reads or at an epoch end."""
    health = DataHealth()
    health.record(990, 9, [f"bad{i}.JPEG" for i in range(9)] * 1)
    health.check()  # 999 reads: not judged yet
    health.record(10, 1, ["bad0.JPEG"])  # seen before: counted, not listed again
    assert (health.reads, health.bad, len(health.files)) == (1000, 10, 9)
    health.check()  # exactly 1%: fine
    health.record(1, 1, ["bad9.JPEG"])
    with pytest.raises(UsageError, match=r"11 of the 1001 images read were unreadable.*bad0"):
        health.check()
    small = DataHealth()
    small.record(90, 2, ["x.JPEG", "y.JPEG"])
    small.check()
    with pytest.raises(UsageError, match="2 of the 90"):
        small.check(epoch_end=True)
    restored = DataHealth()
    restored.load_state_dict(health.state_dict())
    assert restored.state_dict() == health.state_dict()
