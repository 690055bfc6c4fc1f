"""Throughput of the ReSA training step, side by side in one run: the authors'
configuration (float16 autocast on CUDA / fp32 on CPU, NCHW, eager, per-tensor SGD)
against each of this repository's options alone and together. Every row steps the
authors' per-tensor SGD loop unless it names another kernel (`fused`, or `foreach`:
torch's multi-tensor loop, its own choice on CUDA when --fused is off).

    python tools/benchmark.py --arch resnet50 --batch_size 256 --steps 30 --json bench.json
    python tools/benchmark.py --arch resnet18 --dataset demo --batch_size 64 --steps 5 --configs authors fused bf16

Every step is main.py's: forward of every view, EMA, momentum forward, Sinkhorn,
the one all-reduce of the packed step scalars (and its host synchronisation), backward
and optimizer step. `synthetic` batches live on the device already (the step alone);
`--loader` also feeds the step from the real data pipeline (JPEG files, decoding and
augmentation with PIL in --workers processes), `--gpu_loader` from the GPU data
backend (workers read bytes, the device decodes and augments), so that data stalls
show; `--pipeline` measures the data pipelines alone (PIL on one core and with
--workers, the GPU backend). Each row is printed and written to `--json` (with the
machine, versions and date) as soon as it is measured, so a run cut off by a time limit
keeps every finished row; the markdown table comes at the end.
"""
import argparse
import datetime
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import args  # noqa: E402
from method import build_model  # noqa: E402
from src.data.datasets import dataset_spec  # noqa: E402
from src.data.demo import write_jpegs  # noqa: E402
from src.data.pipeline import PretrainingData  # noqa: E402
from src.models import input_format, speed_up  # noqa: E402
from src.train.loop import reduce_step  # noqa: E402
from src.train.optim import AmpOptimizer, build_optimizer  # noqa: E402

# name: flags over the authors' configuration (main.py's flags, so every one is a user option)
CONFIGS = {
    "authors": [],
    "foreach": [],
    "channels_last": ["--channels_last", "True"],
    "fused": ["--fused", "True"],
    "bf16": ["--precision", "bf16"],
    "compile": ["--compile"],
    "ours": ["--channels_last", "True", "--fused", "True"],
    "ours+compile": ["--channels_last", "True", "--fused", "True", "--compile"],
    "ours+compile+bf16": ["--channels_last", "True", "--fused", "True", "--compile",
                          "--precision", "bf16"],
}
OFF = ["--channels_last", "False", "--fused", "False"]  # the authors' defaults everywhere
MULTI_TENSOR = {"foreach"}  # the other rows step per tensor (or fused), as the authors' SGD


def bench_config(bench, flags, data_path=None):
    """main.py's configs (src/config.Pretraining) of one configuration; with
    `data_path`, an ImageFolder there feeds it."""
    flags = [part for flag in flags
             for part in ([flag, bench.compile_backend] if flag == "--compile" else [flag])]
    data = ["--dataset", "imagenet", "--data_path", str(data_path)] if data_path else []
    return args.pretraining(args.get_args(
        ["--arch", bench.arch, "--dataset", bench.dataset, *OFF, *flags, *data,
         "--crops_size", str(bench.crop), "--crops_nmb", str(bench.views - 1),
         "--batch_size", str(bench.batch_size), "--workers", str(bench.workers)]))


def build(bench, name, device):
    """(model, AmpOptimizer, configs) of configuration `name`, from the same seeded init."""
    config = bench_config(bench, CONFIGS[name])
    torch.manual_seed(0)
    model = build_model(config.method, config.heads, config.encoder).to(device).train()
    speed_up(model, config.run.channels_last, config.run.compile)
    optimizer = build_optimizer(model, config.optim, 0.1, config.run.fused,
                                foreach=name in MULTI_TENSOR)
    return model, AmpOptimizer(optimizer, device, config.run.precision), config


def step(model, amp, views, device):
    with amp.autocast():
        loss = model(views)
    reduce_step(loss, [0.0] * 5, device)  # TrainLoop's one all-reduce and host sync
    amp.step(loss)


def synthetic_batches(bench, config, device):
    """The same device-resident views at every step."""
    views = [torch.randn(bench.batch_size, 3, bench.crop, bench.crop, device=device)
             .contiguous(memory_format=input_format(config.run.channels_last))
             for _ in range(bench.views)]
    while True:
        yield views


def loader_batches(bench, flags, device, data_path, backend="pil", workers=None):
    """Views from main.py's pretraining pipeline over the JPEGs in `data_path`, with
    `--data_backend backend`: PIL in the workers, or the GPU backend (workers read
    bytes; decode and views on `device`)."""
    workers = bench.workers if workers is None else workers
    config = bench_config(bench, [*flags, "--data_backend", backend, "--workers", str(workers)],
                          data_path)
    images = PretrainingData(config.data, config.views)
    loader = images.loader(seed=0)
    views = images.to_device(device, input_format(config.run.channels_last))
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            yield views(batch.data)
        epoch += 1


def timed(device, work, steps, warmup):
    """Seconds per call of `work()` over `steps` calls, after `warmup` calls."""
    for _ in range(warmup):
        work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def pipeline(bench, device, data_path, backend, workers):
    """Samples/s of a data pipeline alone (views made, no training step)."""
    batches = loader_batches(bench, [], device, data_path, backend, workers)
    seconds = timed(device, lambda: next(batches), bench.pipeline_steps, 1)
    return {"config": f"{backend} pipeline, {workers} workers", "input": "pipeline",
            "samples_per_s": bench.batch_size / seconds, "ms_per_step": 1000 * seconds,
            "peak_memory_gib": None}


def release(device):
    """Free what the previous measurement left (memory, compiled graphs)."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(bench, name, device, data_path=None, backend="pil"):
    """Samples/s, ms per step and peak device memory of configuration `name`."""
    release(device)
    model, amp, config = build(bench, name, device)
    batches = (loader_batches(bench, CONFIGS[name], device, data_path, backend) if data_path
               else synthetic_batches(bench, config, device))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(device, lambda: step(model, amp, next(batches), device), bench.steps,
                    bench.warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    source = {"pil": "loader", "gpu": "gpu loader"}[backend] if data_path else "synthetic"
    return {"config": name, "input": source, "samples_per_s": bench.batch_size / seconds,
            "ms_per_step": 1000 * seconds, "peak_memory_gib": peak,
            "optimizer": optimizer_kernel(amp.optimizer)}


def optimizer_kernel(optimizer):
    """How the optimizer steps: 'fused', 'foreach', 'per-tensor' or torch's choice."""
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    return {True: "foreach", False: "per-tensor"}.get(group.get("foreach"), "torch's choice")


TABLE_HEAD = ["| configuration | input | samples/s | vs authors | ms/step | peak memory |",
              "|---|---|---|---|---|---|"]


def table_line(row, results):
    """The markdown line of `row`, against the authors' row of its input in `results`."""
    base = {r["input"]: r["samples_per_s"] for r in results if r["config"] == "authors"}
    base["gpu loader"] = base.get("loader")
    ratio = f"{row['samples_per_s'] / base[row['input']]:.2f}x" if base.get(row["input"]) else "-"
    memory = f"{row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else "-"
    return (f"| {row['config']} | {row['input']} | {row['samples_per_s']:.1f} | {ratio} | "
            f"{row['ms_per_step']:.1f} | {memory} |")


def table(results):
    return TABLE_HEAD + [table_line(row, results) for row in results]


class Report:
    """The rows measured so far: each printed and the JSON rewritten as it comes."""

    def __init__(self, bench, device):
        self.gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
        self.path, self.results = bench.json, []
        self.head = {"date": datetime.date.today().isoformat(), "device": self.gpu or "cpu",
                     "cpu": platform.processor() or platform.machine(),
                     "torch": torch.__version__, "command": " ".join(sys.argv),
                     "settings": vars(bench)}

    def add(self, row):
        self.results.append(row)
        print(table_line(row, self.results), flush=True)
        if self.path:
            temporary = Path(self.path + ".tmp")
            temporary.write_text(json.dumps({**self.head, "results": self.results}, indent=2))
            temporary.replace(self.path)


def parse():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", help="encoder (as main.py --arch)")
    parser.add_argument("--dataset", default="imagenet",
                        help="sets the stem and blur (as main.py --dataset)")
    parser.add_argument("--batch_size", type=int, default=64, help="samples per step")
    parser.add_argument("--crop", type=int, default=None,
                        help="view resolution (default: the dataset's crop)")
    parser.add_argument("--views", type=int, default=2, help="views per sample (weak + strong)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (compilation and cuDNN autotuning happen here)")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS),
                        metavar="NAME", help="configurations to measure: " + ", ".join(CONFIGS))
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend of the compile configurations")
    parser.add_argument("--loader", nargs="*", default=None, metavar="NAME",
                        help="also measure these configurations (default: authors and ours) "
                        "fed by the real data pipeline")
    parser.add_argument("--gpu_loader", nargs="*", default=None, metavar="NAME",
                        help="also measure these configurations (default: ours) fed by the "
                        "GPU data backend (compare with --loader's authors row)")
    parser.add_argument("--pipeline", action="store_true",
                        help="also measure the data pipelines alone: PIL with 0 workers (one "
                        "core) and with --workers, and the GPU backend with --workers")
    parser.add_argument("--pipeline_steps", type=int, default=5,
                        help="timed batches of each pipeline alone (after one untimed)")
    parser.add_argument("--data_path", default=None,
                        help="ImageFolder (train/) for the data pipelines (default: generated "
                        "JPEGs)")
    parser.add_argument("--loader_images", type=int, default=2048,
                        help="JPEGs to generate for --loader without --data_path")
    parser.add_argument("--image_size", type=int, default=320,
                        help="side of the generated JPEGs")
    parser.add_argument("--workers", type=int, default=8, help="loader workers for --loader")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    bench = parser.parse_args()
    bench.crop = bench.crop or dataset_spec(bench.dataset).crop_size
    return bench


def main():
    bench = parse()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True

    report = Report(bench, device)
    header = (f"{bench.arch}, {bench.views} views of {bench.crop} px, batch {bench.batch_size}, "
              f"on {report.gpu or f'CPU ({torch.get_num_threads()} threads)'}, "
              f"torch {torch.__version__}")
    print(header, *TABLE_HEAD, sep="\n", flush=True)
    for name in bench.configs:
        report.add(measure(bench, name, device))
    if bench.loader is not None or bench.gpu_loader is not None or bench.pipeline:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(bench.data_path or tmp)
            if not bench.data_path:
                write_jpegs(data / "train", bench.loader_images, bench.image_size)
            if bench.pipeline:
                for backend, workers in (("pil", 0), ("pil", bench.workers),
                                         ("gpu", bench.workers)):
                    report.add(pipeline(bench, device, data, backend, workers))
            for name in (bench.loader or ["authors", "ours"]) if bench.loader is not None else []:
                report.add(measure(bench, name, device, data))
            for name in (bench.gpu_loader or ["ours"]) if bench.gpu_loader is not None else []:
                report.add(measure(bench, name, device, data, backend="gpu"))
    print(f"\n{header}", *table(report.results), sep="\n")


if __name__ == "__main__":
    main()
