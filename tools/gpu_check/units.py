"""Direct checks of the CUDA path's defects on this machine's device (the CPU in the
dry run): `python -m tools.gpu_check.units [--dry-run]` prints a PASS or FAIL line for
each; the exit code counts the failures."""
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from src.data.demo import write_jpegs
from tools.gpu_check.files import undecodable_jpeg, write_odd_files
from tools.gpu_check.runner import REPO

KERNELS = {"fused": dict(fused=True), "foreach": dict(foreach=True),
           "per-tensor": dict(foreach=False)}

def unit_checks(dry):
    """Each defect of the CUDA path that a direct call shows, on this machine's device:
    one PASS or FAIL line each; the exit code counts the failures."""
    import torch
    device = torch.device("cpu" if dry else "cuda")
    checks = [resize_limits, optimizer_kernels, loss_scaler, decoding, benchmark_rows]
    failures = 0
    for check in checks:
        try:
            detail = check(device)
            print(f"PASS {check.__name__}: {detail}", flush=True)
        except Exception as err:  # each check reports, the next one runs
            failures += 1
            print(f"FAIL {check.__name__}: {type(err).__name__}: {err}", flush=True)
    return failures

def resize_limits(device):
    """Defect 4: views of a 12,000 x 9,000 image (54x and 50x downscales; 2,400 x 1,800
    on the CPU)."""
    import torch
    import torch.nn.functional as F
    from src.config import ViewSpec
    from src.data.gpu_views import JITTER, N_PARAMS, NEUTRAL_COLOUR, make_views
    scale = 5 if device.type == "cpu" else 1  # the same factors, 25 times fewer pixels
    height, width, large, small, local = (n // scale for n in (9000, 12000, 224, 96, 4800))
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, device=device)
    specs = [ViewSpec(large, (0.14, 1), False, 0, 0), ViewSpec(large, (0.14, 1), True, 0, 0),
             ViewSpec(small, (0.05, 0.14), True, 0, 0)]
    params = torch.zeros(1, 3, N_PARAMS, dtype=torch.float64)
    params[0, :, JITTER:] = torch.tensor(NEUTRAL_COLOUR, dtype=torch.float64)
    params[0, :, :4] = torch.tensor([[0, 0, height, width]] * 2 + [[0, 0, local, local]],
                                    dtype=torch.float64)
    views = make_views([image], params, specs, (0.5,) * 3, (0.25,) * 3)
    assert all(torch.isfinite(v).all() for v in views)
    try:  # the limit itself, without the pre-shrink
        F.interpolate(image[None].float(), size=(large, large), mode="bicubic", antialias=True)
        limit = "a direct 54x bicubic resize runs here too"
    except RuntimeError as err:
        limit = f"a direct 54x bicubic resize fails here: {str(err).splitlines()[0][:60]}"
    return f"views {[tuple(v.shape) for v in views]}; {limit}"

def optimizer_kernels(device):
    """Defect 5: SGD and AdamW state across fused / foreach / per-tensor, through a
    file loaded on the CPU (as checkpoints are), a step after each load."""
    import torch
    from src.train.optim import load_optimizer_state
    for name in ("sgd", "adamw"):
        for saved_kernel in KERNELS:
            model = torch.nn.Linear(64, 32).to(device)
            optimizer = make_optimizer(name, saved_kernel, model)
            for _ in range(2):
                model(torch.randn(8, 64, device=device)).square().mean().backward()
                optimizer.step()
            buffer = io.BytesIO()
            torch.save(optimizer.state_dict(), buffer)
            for kernel in KERNELS:
                buffer.seek(0)
                state = torch.load(buffer, map_location="cpu", weights_only=True)
                target = make_optimizer(name, kernel, model)
                load_optimizer_state(target, state)
                model(torch.randn(8, 64, device=device)).square().mean().backward()
                target.step()
                if name == "adamw" and kernel == "fused":
                    step = target.state[model.weight]["step"]
                    assert step.device == model.weight.device and step.dtype == torch.float32
    return f"9 load-and-step pairs each for SGD and AdamW; fused AdamW steps on {device}"

def make_optimizer(name, kernel, model):
    import torch
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **KERNELS[kernel])
    return torch.optim.AdamW(model.parameters(), lr=0.01, **KERNELS[kernel])

def loss_scaler(device):
    """Defect 2: an fp16 run resumes a checkpoint saved without a loss scaler."""
    import torch
    from src.checkpoint import with_module_prefix
    from src.distributed import Processes
    from src.train.optim import AmpOptimizer
    from src.train.resume import RunCheckpoint
    model = torch.nn.Linear(8, 4).to(device)
    fp32 = AmpOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), device)
    saved = {"state_dict": with_module_prefix(model.state_dict()),
             "optimizer": fp32.optimizer.state_dict(), "scaler": fp32.scaler.state_dict(),
             "source": "an fp32 checkpoint"}
    fp16 = AmpOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), device,
                        "bf16" if device.type == "cpu" else "fp16")
    if device.type == "cpu":
        fp16.scaler = torch.amp.GradScaler("cpu")  # fp16 needs CUDA: the CPU's scaler
    with tempfile.TemporaryDirectory() as tmp:
        run = RunCheckpoint(os.path.join(tmp, "c.pth"), {}, Processes(device=device))
        run.restore(saved, model, fp16)
    assert fp16.scaler.is_enabled()
    with fp16.autocast():
        loss = model(torch.randn(4, 8, device=device)).square().mean()
    fp16.step(loss)
    return f"resumed and stepped, loss scale {fp16.scaler.get_scale():g}"

def decoding(device):
    """Defects 3 and 6: the device decoder against the CPU one; the odd files to the CPU
    path up front; an undecodable JPEG replaced, with its fallback logged."""
    import torch
    from src.data.encoded import EncodedBatch, GpuViews, decode, read_encoded
    from src.config import Views
    from src.data.gpu_views import N_PARAMS
    messages = []

    class Recorded(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    handler = Recorded(logging.WARNING)
    logging.getLogger("resa").addHandler(handler)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_jpegs(folder / "plain", 3, 64)
        write_odd_files(folder / "odd", (640, 480))
        plain = [read_encoded(path)[0] for path in sorted(folder.glob("plain/*/*.JPEG"))]
        odd = {p.stem: read_encoded(p)[1] for p in (folder / "odd").glob("*.JPEG")
               if p.stem not in ("truncated",)}
    batch = EncodedBatch(plain, [True] * 3, torch.zeros(3, 2, N_PARAMS, dtype=torch.float64))
    ours, cpu = decode(batch, device), decode(batch, torch.device("cpu"))
    difference = max((a.cpu().float() - b.float()).abs().mean().item() for a, b in zip(ours, cpu))
    assert difference < 3, difference
    to_cpu = sorted(name for name, device_path in odd.items() if not device_path)
    assert to_cpu == ["cmyk", "gray", "png", "progressive"], to_cpu
    bad = EncodedBatch([plain[0], read_undecodable()], [True, True],
                       torch.zeros(2, 2, N_PARAMS, dtype=torch.float64))
    bad.params[:, :, 2:4] = 48.0
    views = GpuViews(Views(crops_size=(32,), blur_prob=0.0), device)(bad)
    logging.getLogger("resa").removeHandler(handler)
    replaced = torch.equal(views[0][0], views[0][1])  # the two images differ
    assert messages if replaced else not messages, messages  # a fallback is logged
    outcome = (f"replaced, logged: {messages[0][:70]}" if replaced else
               "decoded by the device decoder all the same (nothing to replace)")
    return (f"device vs CPU decode: mean difference {difference:.2f}; {', '.join(to_cpu)} "
            f"decoded in the worker; undecodable {outcome}")

def read_undecodable():
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.JPEG"
        undecodable_jpeg(path)
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)

def benchmark_rows(device):
    """Defect 7: tools/benchmark.py's authors row steps per tensor, its foreach row with
    torch's foreach loop (the rows it writes name their optimizer's kernel)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.json"
        subprocess.run([sys.executable, "tools/benchmark.py", "--arch", "resnet18",
                        "--dataset", "demo", "--batch_size", "2", "--steps", "1", "--warmup",
                        "0", "--configs", "authors", "foreach", "--json", path],
                       cwd=REPO, check=True, capture_output=True, timeout=300)
        rows = json.loads(path.read_text())["results"]
    kernels = {row["config"]: row["optimizer"] for row in rows}
    assert kernels == {"authors": "per-tensor", "foreach": "foreach"}, kernels
    return f"authors: per-tensor SGD, foreach row: torch's foreach loop, on {device}"


if __name__ == "__main__":
    sys.exit(unit_checks("--dry-run" in sys.argv[1:]))
