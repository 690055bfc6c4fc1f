"""The shared training loop: mixed-precision switch and the non-finite stop."""
import pytest
import torch

from src.engine import AmpOptimizer, train_epoch
from src.errors import NonFiniteLoss


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
def test_mixed_precision_only_on_cuda_and_when_asked():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert not AmpOptimizer(optimizer, torch.device("cpu")).enabled
    assert AmpOptimizer(optimizer, torch.device("cuda")).enabled
    assert not AmpOptimizer(optimizer, torch.device("cuda"), mixed=False).enabled  # CIFAR


def test_non_finite_loss_stops_before_the_update():
    weight = torch.nn.Parameter(torch.ones(2))
    amp = AmpOptimizer(torch.optim.SGD([weight], lr=0.5), torch.device("cpu"))
    batches = [torch.tensor([1.0, 1.0]), torch.tensor([float("inf"), 1.0])]
    lrs = []

    def forward(batch):
        return (weight * batch).sum()

    with pytest.raises(NonFiniteLoss, match="loss is inf at epoch 1, iteration 1"):
        train_epoch(batches, forward, amp, epoch=0, epochs=1, first_iter=0, total_iters=2,
                    global_batch=2, before_step=lambda i: lrs.append(i) or {})
    assert lrs == [0, 1]
    assert torch.equal(weight.detach(), torch.tensor([0.5, 0.5]))  # only the first step ran


def test_train_epoch_returns_the_mean_loss():
    weight = torch.nn.Parameter(torch.zeros(1))
    amp = AmpOptimizer(torch.optim.SGD([weight], lr=0.0), torch.device("cpu"))
    batches = [torch.tensor([1.0]), torch.tensor([3.0])]
    loss = train_epoch(batches, lambda b: (weight + b).sum(), amp, epoch=0, epochs=1,
                       first_iter=0, total_iters=2, global_batch=1)
    assert loss == pytest.approx(2.0)


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
