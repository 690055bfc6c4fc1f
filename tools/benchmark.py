"""Throughput of one ReSA training step (forward, EMA, backward, SGD) on synthetic
views, without data loading: the figure to compare speed changes against.

    python tools/benchmark.py --arch resnet18 --dataset cifar10 --batch_size 64 --steps 5

Uses the same model, optimizer and mixed precision as main.py (float16 autocast on
CUDA, fp32 on CPU), in one process.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from args import get_args  # noqa: E402
from method import get_method  # noqa: E402
from src.data import dataset_info  # noqa: E402
from src.optim import AmpOptimizer, build_optimizer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", help="encoder (as main.py --arch)")
    parser.add_argument("--dataset", default="imagenet",
                        help="sets the stem and the default crop (as main.py --dataset)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per step")
    parser.add_argument("--crop", type=int, default=None,
                        help="view resolution (default: the dataset's crop)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    bench = parser.parse_args()

    args = get_args(["--arch", bench.arch, "--dataset", bench.dataset, "--data_path", "unused"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    crop = bench.crop or dataset_info(bench.dataset).crop_size
    model = get_method(args).to(device).train()
    amp = AmpOptimizer(build_optimizer(model, 0.1, args), device, args.precision)
    views = [torch.randn(bench.batch_size, 3, crop, crop, device=device) for _ in range(2)]

    def step():
        with amp.autocast():
            loss = model(views)
        amp.step(loss)
        return loss.item()  # one sync per step, as main.py

    for _ in range(bench.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(bench.steps):
        step()
    seconds = (time.perf_counter() - start) / bench.steps
    memory = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
              if device.type == "cuda" else "")
    print(f"{bench.arch} {crop}px batch {bench.batch_size} on {device} "
          f"({torch.get_num_threads()} threads): {seconds:.3f} s/step, "
          f"{bench.batch_size / seconds:.1f} images/s{memory}")


if __name__ == "__main__":
    main()
