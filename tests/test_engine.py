"""The shared training loop: precision modes and the non-finite stop."""
import pytest
import torch
from torch.utils.data import DataLoader

from src.engine import train_epoch
from src.errors import NonFiniteLoss
from src.optim import AmpOptimizer


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


def loader_of(*values):
    """A DataLoader of one-row batches, as train_epoch takes."""
    return DataLoader([torch.tensor(v) for v in values], batch_size=1)


def test_non_finite_loss_stops_before_the_update():
    weight = torch.nn.Parameter(torch.ones(2))
    amp = AmpOptimizer(torch.optim.SGD([weight], lr=0.5), torch.device("cpu"))
    batches = loader_of([1.0, 1.0], [float("inf"), 1.0])
    lrs = []

    def forward(batch):
        return (weight * batch).sum()

    with pytest.raises(NonFiniteLoss, match="loss is inf at epoch 1, iteration 1"):
        train_epoch(batches, forward, amp, epoch=0, epochs=1,
                    before_step=lambda i: lrs.append(i) or {})
    assert lrs == [0, 1]
    assert torch.equal(weight.detach(), torch.tensor([0.5, 0.5]))  # only the first step ran


def test_train_epoch_returns_the_mean_loss():
    weight = torch.nn.Parameter(torch.zeros(1))
    amp = AmpOptimizer(torch.optim.SGD([weight], lr=0.0), torch.device("cpu"))
    lrs = []
    loss = train_epoch(loader_of([1.0], [3.0]), lambda b: (weight + b).sum(), amp, epoch=2,
                       epochs=4, before_step=lambda i: lrs.append(i) or {})
    assert loss == pytest.approx(2.0)
    assert lrs == [4, 5]  # iterations count from the start of the run: epoch 2 of 2 steps


def test_script_wrapper_turns_errors_into_one_line_and_exit_codes(capsys):
    from src.errors import UsageError, exit_on_usage_error

    def failing(error):
        @exit_on_usage_error
        def main():
            raise error
        return main

    for error, code in ((UsageError("bad flag"), 2), (NonFiniteLoss("loss is nan"), 1)):
        with pytest.raises(SystemExit) as exit_info:
            failing(error)()
        assert exit_info.value.code == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].endswith(f"error: {error}")
