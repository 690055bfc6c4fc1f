"""`bench`: tools/benchmark.py's rows and the data pipelines, one at a time."""
import json
import os
import sys
import time

from src.data.demo import write_jpegs
from tools.gpu_check.runner import Ranks, preflight

def bench(check):
    if not check.step("preflight", 5, lambda: preflight(check.dry)):
        raise SystemExit(3)
    check.step("data", 15, lambda: bench_data(check))
    synthetic = ["authors", "foreach"] + ([] if check.dry else [
        "channels_last", "fused", "ours", "bf16"])  # the dry run: the rows' logic, twice
    check.step("bench_synthetic", 80, lambda: benchmark(check, "bench_synthetic",
                                                        ["--configs", *synthetic], 150))
    check.step("bench_pipelines", 80, lambda: benchmark(
        check, "bench_pipelines", ["--configs", "--pipeline", "--loader", "authors",
                                   *([] if check.dry else ["ours"]), "--gpu_loader", "ours",
                                   "--data_path", check.work / "bench"], 150))
    compiled = ["--configs", "ours+compile"] + (["--compile_backend", "eager"] if check.dry else [])
    check.step("bench_compile", 120, lambda: benchmark(check, "bench_compile", compiled, 200))

def bench_data(check):
    from multiprocessing import Pool
    s, root = check.sizes, check.work / "bench" / "train"
    pixels = s.pixels if check.dry else 320
    parts = min(16, s.bench_images)
    each = s.bench_images // parts
    with Pool(min(parts, os.cpu_count() or 1)) as pool:
        pool.starmap(write_jpegs, [(root, each, pixels, i, i * each) for i in range(parts)])
    return 0, f"{parts * each} JPEGs of {pixels} px"

def benchmark(check, name, flags, limit):
    """tools/benchmark.py; every row it measured counts, even if it was cut off."""
    path = check.out / f"{name}.json"
    command = [sys.executable, "tools/benchmark.py", *check.sizes.bench, *flags, "--json", path]
    left = check.deadline - time.monotonic()
    rc = Ranks([command], [{}], min(limit, left), check.out / "logs" / f"{name}.log",
               check.env).wait()
    rows = json.loads(path.read_text())["results"] if path.exists() else []
    base = {r["input"]: r["samples_per_s"] for r in rows if r["config"] == "authors"}
    figure = ", ".join(f"{r['config']} ({r['input']}) {r['samples_per_s']:.0f}/s"
                       + (f" {r['samples_per_s'] / base[r['input']]:.2f}x"
                          if r["input"] in base else "") for r in rows)
    return rc, (figure or "no row") + check.note("CPU figures, no GPU")
