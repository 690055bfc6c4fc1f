"""The faster step keeps the maths: channels_last, fused optimizer steps, bf16 autocast
(Sinkhorn stays fp32), torch.compile, and the benchmark that measures them."""
import argparse
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import main as main_script
from args import get_args, pretraining
from method.resa import resa_loss
from src.models import input_format, speed_up
from src.train.optim import AmpOptimizer, build_optimizer
from test_resa import method_of
from tools import benchmark

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--dataset", "demo", "--arch", "resnet18", "--mlp_dim", "64", "--emb", "32"]


def loss_and_grads(channels_last):
    args = get_args(TINY)
    torch.manual_seed(0)
    model = speed_up(method_of(args), channels_last)
    fmt = input_format(channels_last)
    torch.manual_seed(1)
    views = [torch.randn(8, 3, 32, 32).contiguous(memory_format=fmt) for _ in range(2)]
    loss = model(views)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


def test_channels_last_gives_the_same_loss_and_gradients_as_nchw():
    """Equal up to float rounding: the loss to 1e-5, each gradient to 1e-3 of its norm
    (biases right before a batch norm have a zero gradient in exact arithmetic: only
    rounding noise, compared against the largest gradient instead)."""
    nchw, nchw_grads = loss_and_grads(False)
    nhwc, nhwc_grads = loss_and_grads(True)
    assert nhwc == pytest.approx(nchw, rel=1e-5)
    assert set(nchw_grads) == set(nhwc_grads) and len(nchw_grads) > 50
    largest = max(grad.norm() for grad in nchw_grads.values())
    for name, grad in nchw_grads.items():
        error = (nhwc_grads[name] - grad).norm()
        assert error <= 1e-3 * max(grad.norm(), 1e-3 * largest), name


def test_fused_sgd_steps_equal_the_per_tensor_steps():
    results = []
    for fused in (False, True):
        args = get_args([*TINY, "--fused", str(fused)])
        config = pretraining(args)
        torch.manual_seed(0)
        model = method_of(args)
        amp = AmpOptimizer(build_optimizer(model, config.optim, 0.1, config.run.fused),
                           torch.device("cpu"))
        assert bool(amp.optimizer.param_groups[0]["fused"]) == fused
        torch.manual_seed(1)
        for _ in range(2):
            amp.step(model([torch.randn(4, 3, 32, 32) for _ in range(2)]))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], rtol=1e-5, atol=1e-7)


def test_fused_adamw_steps_equal_the_per_tensor_steps():
    """On a regression whose gradients are all far from zero (Adam turns rounding
    noise in a zero gradient into a full-size step of either sign)."""
    results = []
    for fused in (False, True):
        config = pretraining(get_args([*TINY, "--optimizer", "adamw", "--fused", str(fused)]))
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4)
        amp = AmpOptimizer(build_optimizer(model, config.optim, 0.01, config.run.fused),
                           torch.device("cpu"))
        x, y = torch.randn(32, 16), torch.randn(32, 4)
        for _ in range(5):
            amp.step(((model(x) - y) ** 2).mean())
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], rtol=1e-5, atol=1e-7)


def test_sinkhorn_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    z = [F.normalize(torch.randn(6, 8), dim=1).requires_grad_() for _ in range(2)]
    zm = [F.normalize(torch.randn(6, 8), dim=1) for _ in range(2)]
    h, hm = (F.normalize(torch.randn(6, 5), dim=1) for _ in range(2))
    captured = {}
    import method.resa as resa
    original = resa.sinkhorn_knopp

    def spy(scores, *args):
        captured["scores"] = scores.dtype
        captured["assign"] = original(scores, *args)
        return captured["assign"]

    resa.sinkhorn_knopp = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            resa_loss(z, zm, h, hm, 0.4)
        bf16_assign = captured["assign"]
        resa_loss(z, zm, h, hm, 0.4)
    finally:
        resa.sinkhorn_knopp = original
    assert captured["scores"] == torch.float32 and bf16_assign.dtype == torch.float32
    assert torch.equal(bf16_assign, captured["assign"])  # the same as without autocast


def run_main(tmp_path, demo_path, *flags):
    main_script.main([*TINY, "--data_path", demo_path, "--dump_path", str(tmp_path),
                      "--batch_size", "4", "--size_dataset", "8", "--epochs", "1",
                      "--warmup_epochs", "0", "--workers", "0", "--eval_every", "0",
                      "--seed", "0", *flags])
    return torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)


def test_bf16_pretraining_on_cpu(tmp_path, demo_path):
    checkpoint = run_main(tmp_path, demo_path, "--precision", "bf16")
    assert checkpoint["args"]["precision"] == "bf16" and checkpoint["epoch"] == 1
    assert "1 process(es) on cpu, bf16" in (tmp_path / "out.log").read_text()
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values()
               if v.is_floating_point())


def test_compile_runs_and_keeps_the_checkpoint_layout(tmp_path, demo_path):
    """aot_eager goes through dynamo and AOTAutograd without inductor's long C++ build."""
    checkpoint = run_main(tmp_path, demo_path, "--compile", "aot_eager")
    keys = list(checkpoint["state_dict"])
    assert "module.momentum_encoder.conv1.weight" in keys
    assert not any("_orig_mod" in key for key in keys)
    reference = run_main(tmp_path / "eager", demo_path)
    for key, value in reference["state_dict"].items():
        assert torch.allclose(checkpoint["state_dict"][key], value, rtol=1e-4, atol=1e-5), key


def test_benchmark_rows_compare_like_with_like():
    """The authors' row steps their per-tensor SGD (on CUDA torch would pick its
    multi-tensor loop by itself), as does every row over it but the fused ones and the
    foreach row, which is that loop."""
    bench = argparse.Namespace(arch="resnet18", dataset="demo", crop=32, views=2, batch_size=2,
                               workers=0)
    kernels = {"authors": (None, False), "foreach": (None, True), "fused": (True, False),
               "channels_last": (None, False), "bf16": (None, False), "ours": (True, False)}
    for name, kernel in kernels.items():
        group = benchmark.build(bench, name, torch.device("cpu"))[1].optimizer.param_groups[0]
        assert (group["fused"], group["foreach"]) == kernel, name


def test_benchmark_keeps_the_rows_measured_before_it_is_cut_off(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", [
        "benchmark.py", "--arch", "resnet18", "--dataset", "demo", "--batch_size", "2",
        "--steps", "1", "--warmup", "0", "--configs", "authors", "fused", "--json", str(path)])
    real = benchmark.measure

    def cut_off(bench, name, *args, **kwargs):  # the time limit ends the second row
        if name == "fused":
            raise KeyboardInterrupt
        return real(bench, name, *args, **kwargs)
    monkeypatch.setattr(benchmark, "measure", cut_off)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main()
    rows = json.loads(path.read_text())["results"]
    assert [(r["config"], r["input"]) for r in rows] == [("authors", "synthetic")]
    assert "| authors | synthetic |" in capsys.readouterr().out
