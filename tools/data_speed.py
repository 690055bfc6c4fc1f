"""Speed of the pretraining data pipeline on your own images, folder versus tar shards,
side by side in one run: samples/s of main.py's loader (read, decode, the default
views: a 224 px weak view and a strong one, made with PIL) in one process, no loader
worker, one thread: the rate per CPU core.

    python tools/data_speed.py /usr/share/backgrounds/mate/nature /tmp/speed --images 2000

PHOTOS is a folder of photos, searched recursively (e.g. the 14 nature photos of the
Debian package mate-backgrounds). The first run writes WORK/folder, IMAGES JPEGs cut
from them (a random square of 20-100% of a photo's shorter side, resized to an aspect
of 3:4 to 4:3 and a longer side of 400-600 px, quality 90), and WORK/shards with
tools/make_shards.py. The two pipelines then take turns, ROUNDS times, so that a load
that changes during the run falls on both alike; the table gives each one's median
round, with the machine, the date and the load average. (For the GPU backend and the
training step, see tools/benchmark.py.)
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import args  # noqa: E402
from src.data.images import read_rgb  # noqa: E402
from src.data.own_images import image_tree  # noqa: E402
from src.data.pipeline import PretrainingData  # noqa: E402

SHARD_SIZE = 500


def parse():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", help="folder of photos to cut the test images from")
    parser.add_argument("work", help="folder for the test images and their shards (reused "
                        "when present)")
    parser.add_argument("--images", type=int, default=2000, help="test images to write "
                        "(default: 2000)")
    parser.add_argument("--batch_size", type=int, default=64, help="samples per batch "
                        "(default: 64)")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per round "
                        "(default: 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both pipelines "
                        "(default: 3)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser.parse_args()


def write_photos(photos, folder, count, seed=0):
    """`count` JPEGs in `folder`, each a random crop of one of `photos`, resized."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sources = [read_rgb(path) for path, _ in image_tree(Path(photos), "pretrain", None).samples]
    for i in range(count):
        photo = sources[i % len(sources)]
        side = int(min(photo.size) * rng.uniform(0.2, 1.0))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        aspect = rng.uniform(0.75, 1.33)
        longer = int(rng.integers(400, 601))
        size = (longer, int(longer / aspect)) if aspect > 1 else (int(longer * aspect), longer)
        crop = photo.crop((left, top, left + side, top + side))  # stretched to `size`
        crop.resize(size, Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return len(sources)


def batches(dataset, data_path, batch_size):
    """main.py's loader over `data_path` (no worker), batch after batch, endlessly."""
    config = args.pretraining(args.get_args(["--dataset", dataset, "--data_path", data_path,
                                             "--batch_size", str(batch_size),
                                             "--workers", "0"]))
    loader = PretrainingData(config.data, config.views).loader(seed=0)
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def cpu_name():
    """The CPU's model name (Linux), else what platform knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    bench = parse()
    torch.set_num_threads(1)
    work = Path(bench.work)
    folder, shards = work / "folder", work / "shards"
    if not folder.is_dir():
        used = write_photos(bench.photos, folder, bench.images)
        print(f"cut {bench.images} test images from {used} photos into {folder}")
    if not shards.is_dir():
        subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), folder, shards,
                        "--shard_size", str(SHARD_SIZE)], check=True)
    count = -(-len(list(folder.glob("*.jpg"))) // SHARD_SIZE)
    sources = {"folder": ("folder", str(folder)),
               "shards": ("shards", f"{shards}/train-{{000000..{count - 1:06d}}}.tar")}
    loaders = {name: batches(*source, bench.batch_size) for name, source in sources.items()}
    for loader in loaders.values():
        next(loader)  # warm-up: file cache, first decode
    rates = {name: [] for name in loaders}
    for _ in range(bench.rounds):
        for name, loader in loaders.items():
            start = time.perf_counter()
            for _ in range(bench.batches):
                next(loader)
            rates[name].append(bench.batches * bench.batch_size / (time.perf_counter() - start))
    results = {"machine": f"{cpu_name()}, {os.cpu_count()} cores",
               "date": datetime.date.today().isoformat(),
               "load_average": os.getloadavg(), "torch": torch.__version__,
               "samples_per_s_per_core": {n: statistics.median(r) for n, r in rates.items()},
               "rounds": rates}
    print("| pipeline (1 core, PIL views) | samples/s |\n|---|---|")
    for name, rate in results["samples_per_s_per_core"].items():
        print(f"| {name} | {rate:.1f} |")
    print(f"{results['machine']}, {results['date']}, load average "
          + " ".join(f"{x:.2f}" for x in results["load_average"]))
    if bench.json:
        Path(bench.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
