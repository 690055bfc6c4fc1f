"""Per-iteration schedules (SPEC §4) against their closed forms."""
import math

import numpy as np
import pytest
import torch

from args import get_args, pretraining
from method import METHODS
from src.schedules import cosine_schedule, lr_schedule


def test_warmup_then_cosine_values_and_length():
    s = cosine_schedule(1.0, 0.1, epochs=5, iters_per_epoch=4, warmup_epochs=2)
    assert len(s) == 20
    assert s[0] == 0.0 and s[7] == pytest.approx(1.0)  # linear 0 -> lr over 8 iterations
    assert np.allclose(np.diff(s[:8]), 1 / 7)
    cos = s[8:]
    assert cos[0] == pytest.approx(1.0)
    for i, value in enumerate(cos):
        assert value == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * i / 12)))
    assert np.all(np.diff(cos) < 0) and cos[-1] > 0.1


def test_lr_schedule_default_and_explicit_final_lr():
    optim = pretraining(get_args(["--dataset", "cifar10", "--epochs", "10",
                                  "--warmup_epochs", "1"])).optim
    default = lr_schedule(optim, lr=0.6, iters_per_epoch=3)
    assert len(default) == 30 and default[2] == pytest.approx(0.6)
    last = 0.06 + 0.27 * (1 + math.cos(math.pi * 26 / 27))  # final = 0.1 x scaled lr
    assert default[-1] == pytest.approx(last)
    optim = pretraining(get_args(["--dataset", "cifar10", "--epochs", "10",
                                  "--final_lr", "0.002"])).optim
    explicit = lr_schedule(optim, lr=0.6, iters_per_epoch=3)
    assert explicit[-1] == pytest.approx(0.002 + 0.299 * (1 + math.cos(math.pi * 23 / 24)))
    assert min(explicit[6:]) > 0.002


def test_momentum_schedule_rises_to_one_without_warmup():
    """MomentumMethod.prepare builds the EMA schedule of the run; before_step sets it."""
    config = pretraining(get_args(["--dataset", "cifar10", "--epochs", "4",
                                   "--warmup_epochs", "2"]))
    method = METHODS[config.method.method](torch.nn.Linear(4, 4), 4, config.heads,
                                           **config.method.hyper)
    method.prepare(config.optim.epochs, iters_per_epoch=5)
    m = method.momentums
    assert method.before_step(7) == {"ema_momentum": m[7]} and method.momentum == m[7]
    assert len(m) == 20 and m[0] == pytest.approx(0.996)
    assert np.all(np.diff(m) > 0) and m[-1] < 1 and m[-1] == pytest.approx(1, abs=1e-4)
