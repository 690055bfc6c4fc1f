"""The checks of tools/gpu_check.sh: the CUDA path in GPU slots of a few minutes.

    tools/gpu_check.sh smoke       every CUDA code path once (under 5 minutes on one H200)
    tools/gpu_check.sh bench       the side-by-side benchmark and the data pipelines (same)
    tools/gpu_check.sh --dry-run   both, with tiny sizes on the CPU (what the tests run)

Each step runs its commands under `timeout -s TERM -k 30` (torchrun passes the TERM on
to its ranks, which write a checkpoint and stop), prints one line as it ends (name, rc,
seconds, its figure) and appends the same to OUT/results.jsonl, so a run cut off by the
slot's limit still reports every finished step; the benchmark writes each row as it is
measured. A step never waits for a process that already died, and the steps of an entry
point share one time budget: a step that would start past it is reported as skipped.
Nothing is installed; the first step stops everything in one line if CUDA or a module
is missing. The dry run executes every step's logic on the CPU and says, step by step,
what only a GPU can run.
"""
import argparse
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # src/ for the data and the unit checks; no torch at import
MODULES = ("torch", "torchvision", "numpy", "PIL", "tqdm", "tensorboard")
KILL_AFTER = 30  # seconds from TERM to KILL
# the resumed run against the uninterrupted one on CUDA: the same weights and samples,
# but fp16 autocast and cuDNN's own choice of algorithms (cudnn.benchmark, atomics)
LOSS_TOLERANCE = 1e-2  # relative, at every step; on the CPU the losses are equal
STEP_LINE = re.compile(r"epoch (\d+)/\d+ iter (\d+)/\d+ .*?\bloss (\S+)")
KERNELS = {"fused": dict(fused=True), "foreach": dict(foreach=True),
           "per-tensor": dict(foreach=False)}
# the defects of issue 16 and the smoke steps (unit:check) that run them on CUDA
DEFECTS = {
    1: ("eval_knn --use_cuda False under NCCL", ["knn_cpu_bank", "two_processes"]),
    2: ("fp16 resume without a saved scaler", ["fp32_to_fp16", "unit:loss_scaler"]),
    3: ("silent decode fallbacks", ["gpu_backend", "unit:decoding"]),
    4: ("antialiased resize limits", ["gpu_backend", "unit:resize_limits"]),
    5: ("optimizer state across kernels", ["fp32_to_fp16", "unit:optimizer_kernels"]),
    6: ("an undecodable JPEG's crop box", ["gpu_backend", "unit:decoding"]),
    7: ("the benchmark's authors row", ["unit:benchmark_rows"]),
}


@dataclass(frozen=True)
class Sizes:
    """What an entry point trains and generates, on a GPU or in the dry run."""
    train: int          # training JPEGs of the main dataset (10 classes)
    val: int
    odd_plain: int      # plain JPEGs beside the odd files of the GPU-backend step
    pixels: int         # side of the generated JPEGs
    large: tuple        # (width, height) of the large photo among the odd files
    crop: int
    batch: int
    workers: int
    network: tuple      # flags of the networks
    bench: tuple        # flags of tools/benchmark.py
    bench_images: int
    budget: float       # seconds for each entry point


GPU = Sizes(train=320, val=100, odd_plain=320, pixels=160, large=(10000, 7500), crop=96,
            batch=32, workers=6, network=("--arch", "resnet18"),
            bench=("--arch", "resnet50", "--batch_size", "256", "--steps", "15", "--warmup",
                   "3", "--workers", "14", "--pipeline_steps", "5"),
            bench_images=2560, budget=285)
DRY = Sizes(train=32, val=20, odd_plain=150, pixels=40, large=(2400, 1800), crop=32,
            batch=8, workers=0, network=("--arch", "resnet18", "--mlp_dim", "64", "--emb", "32"),
            bench=("--arch", "resnet18", "--dataset", "demo", "--batch_size", "4", "--steps",
                   "1", "--warmup", "0", "--workers", "0", "--pipeline_steps", "1"),
            bench_images=12, budget=600)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """The processes of one run, each under `timeout -s TERM -k 30 limit`, writing to
    `log`. If one fails, the others get TERM: alone, they would wait in a collective."""

    def __init__(self, commands, envs, limit, log, base_env):
        self.log = open(log, "a")
        self.procs = [subprocess.Popen(
            ["timeout", "-s", "TERM", "-k", str(KILL_AFTER), str(max(1, int(limit))),
             *map(str, command)], cwd=REPO, env={**os.environ, **base_env, **env},
            stdout=self.log, stderr=subprocess.STDOUT) for command, env in zip(commands, envs)]

    def alive(self):
        return all(p.poll() is None for p in self.procs)

    def terminate(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def wait(self):
        """The exit code of the first process that failed, else 0."""
        failed = 0
        while any(p.poll() is None for p in self.procs):
            failed = failed or next((p.returncode for p in self.procs if p.poll()), 0)
            if failed:
                self.terminate()
            time.sleep(0.1)
        self.log.close()
        return failed or next((p.returncode for p in self.procs if p.returncode), 0)


class Check:
    """One entry point: its steps, their lines and the JSON lines file."""

    def __init__(self, entry, out, dry):
        self.entry, self.out, self.dry = entry, out, dry
        self.sizes = DRY if dry else GPU
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + self.sizes.budget
        self.results, self.lock = [], threading.Lock()
        self.env = {"PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore",
                    **({"OMP_NUM_THREADS": "1"} if dry else {})}

    # ------------------------------------------------------------------ running

    def step(self, name, estimate, body):
        """Run `body() -> (rc, figure[, detail lines])`; print and record the step."""
        start, left = time.monotonic(), self.deadline - time.monotonic()
        details = []
        if left < 10:
            rc, figure = "skipped", f"{left:.0f} s of the {self.sizes.budget:.0f} s budget left"
        else:
            try:
                rc, figure, *details = body()
            except Exception as err:  # the check's own failure: this step fails, not all
                rc, figure = 1, f"{type(err).__name__}: {err}"
        seconds = time.monotonic() - start
        record = {"entry": self.entry, "step": name, "rc": rc, "seconds": round(seconds, 1),
                  "estimate_s": estimate, "figure": figure, "details": sum(details, []),
                  "dry_run": self.dry}
        with self.lock:
            print(f"{name:<20} rc={rc!s:<7} {seconds:6.1f}s  {figure}", flush=True)
            for line in record["details"]:
                print(f"    {line}", flush=True)
            self.results.append(record)
            with open(self.out / "results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return rc == 0

    def passed(self, name):
        """Whether step `name`, or unit check `unit:name`, passed in this entry point."""
        for record in self.results:
            if record["step"] == name:
                return record["rc"] == 0
            if name.startswith("unit:") and record["step"] == "unit_checks":
                return f"PASS {name[5:]}" in " ".join(record["details"])
        return False

    def in_lanes(self, steps, lanes=2):
        """Run `steps` [(name, estimate, body, the names it needs)] two at a time, each
        as soon as those it needs have ended (failed or not), else in the listed order.
        Two short runs share one GPU well, and this halves the smoke's time."""
        pending, ended, turn = list(steps), set(), threading.Condition()

        def lane():
            while True:
                with turn:
                    ready = None
                    while pending and ready is None:
                        ready = next((s for s in pending if set(s[3]) <= ended), None)
                        if ready is None:
                            turn.wait()
                    if ready is None:
                        return
                    pending.remove(ready)
                self.step(*ready[:3])
                with turn:
                    ended.add(ready[0])
                    turn.notify_all()
        threads = [threading.Thread(target=lane) for _ in range(lanes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def launch(self, script, flags, nproc=1):
        """(commands, envs) that start `script`: torchrun on a GPU, as users start it;
        in the dry run the ranks themselves (RANK, WORLD_SIZE...: what torchrun sets),
        which saves torchrun's own start-up on a small CPU."""
        if not self.dry:
            return [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={nproc}", script, *flags]], [{}]
        port = str(free_port())
        return ([[sys.executable, script, *flags]] * nproc,
                [dict(RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(nproc)])

    def start(self, name, script, flags, limit, nproc=1):
        left = self.deadline - time.monotonic()
        return Ranks(*self.launch(script, flags, nproc), min(limit, left),
                     self.out / "logs" / f"{name}.log", self.env)

    def run(self, name, script, flags, limit, nproc=1):
        return self.start(name, script, flags, limit, nproc).wait()

    # ------------------------------------------------------------------ flags

    def train_flags(self, dump, data="data", epochs=2):
        s = self.sizes
        return ["--dataset", "imagenet", "--data_path", self.work / data, *s.network,
                "--crops_size", s.crop, "--batch_size", s.batch, "--workers", s.workers,
                "--epochs", epochs, "--warmup_epochs", 1, "--eval_every", 0, "--seed", 0,
                "--log_every", 1, "--checkpoint_iters", 2, "--dump_path", self.work / dump]

    def fp16(self):
        """The CUDA defaults (fp16 with loss scaling, fused step, channels_last), named."""
        if self.dry:
            return ["--precision", "fp32"]
        return ["--precision", "fp16", "--fused", "True", "--channels_last", "True"]

    def eval_flags(self, dump, *extra):
        s = self.sizes
        return ["--dataset", "imagenet", "--data_path", self.work / "data", "--arch", "resnet18",
                "--crops_size", s.crop, "--batch_size", 2 * s.batch, "--workers", s.workers,
                "--pretrained", self.work / "fp16" / "checkpoint.pth.tar",
                "--dump_path", self.work / dump, *extra]

    def log_of(self, dump):
        path = self.work / dump / "out.log"
        return path.read_text() if path.exists() else ""

    def note(self, text):
        """A figure's remark that holds in the dry run only."""
        return f" [dry run: {text}]" if self.dry else ""


# ---------------------------------------------------------------------- data

def write_jpegs(root, count, pixels, seed=0, first=0):
    """`count` JPEGs of the demo's shapes in 10 class folders under `root`, numbered
    from `first`."""
    import numpy as np
    from src.demo_data import make_image
    rng = np.random.default_rng(seed)
    for i in range(first, first + count):
        path = Path(root) / f"n0100000{i % 10}" / f"{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(i % 10, rng, size=pixels).save(path, quality=90)


def undecodable_jpeg(path, size=(640, 480)):
    """A JPEG whose header reads (size, RGB, the end marker last) but whose pixels no
    decoder reads: its components name a quantisation table it does not define."""
    from PIL import Image
    Image.new("RGB", size, (90, 120, 30)).save(path, quality=90)
    raw = bytearray(path.read_bytes())
    frame = raw.index(b"\xff\xc0")
    for component in range(raw[frame + 9]):
        raw[frame + 10 + 3 * component + 2] = 3
    path.write_bytes(bytes(raw))


def write_odd_files(folder, large):
    """The files the GPU backend must survive: CMYK, grayscale, progressive, PNG,
    truncated, undecodable, and a large photo (a big downscale)."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    colour = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    colour.convert("CMYK").save(folder / "cmyk.JPEG", quality=90)
    colour.convert("L").save(folder / "gray.JPEG", quality=90)
    colour.save(folder / "progressive.JPEG", quality=90, progressive=True)
    colour.save(folder / "png.JPEG", format="PNG")  # a PNG named like a JPEG, as in ImageNet
    colour.save(folder / "whole.JPEG", quality=90)
    cut = (folder / "whole.JPEG").read_bytes()
    (folder / "truncated.JPEG").write_bytes(cut[: len(cut) // 2])
    (folder / "whole.JPEG").unlink()
    undecodable_jpeg(folder / "undecodable.JPEG")
    width, height = large
    y, x = np.mgrid[0:height:8, 0:width:8]
    small = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(small).resize((width, height)).save(folder / "large.JPEG", quality=85)


# ---------------------------------------------------------------------- smoke

def smoke(check):
    if not check.step("preflight", 5, lambda: preflight(check.dry)):
        raise SystemExit(3)  # the preflight's line says why
    check.step("data", 10, lambda: smoke_data(check))
    # (name, estimate on one H200, body, the steps it needs), the longest first
    check.in_lanes([
        ("bf16_compile", 80, lambda: bf16_compile(check), ()),
        ("train_fp16", 25, lambda: train_fp16(check), ()),
        ("sigterm_resume", 35, lambda: sigterm_resume(check), ()),
        ("resume_matches", 1, lambda: resume_matches(check), ("train_fp16", "sigterm_resume")),
        ("knn_cpu_bank", 12, lambda: knn(check, "knn_cpu", "False"), ("train_fp16",)),
        ("two_processes", 40, lambda: two_processes(check), ("knn_cpu_bank",)),
        ("knn_gpu_bank", 12, lambda: knn(check, "knn_gpu", "True"), ("knn_cpu_bank",)),
        ("fp32_to_fp16", 30, lambda: fp32_to_fp16(check), ()),
        ("gpu_backend", 20, lambda: gpu_backend(check), ()),
        ("linear_1_epoch", 15, lambda: linear(check), ("train_fp16",)),
        ("unit_checks", 15, lambda: unit_step(check), ()),
    ])
    for defect, (what, where) in DEFECTS.items():
        verdict = "pass" if all(check.passed(name) for name in where) else "FAIL"
        print(f"defect {defect} ({what}): {verdict} in {', '.join(where)}", flush=True)


def preflight(dry):
    """CUDA and every module the steps import, else one line and the end."""
    import importlib.util
    missing = [name for name in MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return 3, f"missing modules: {', '.join(missing)} (this check installs nothing)"
    import torch
    import torchvision
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    if dry:
        return 0, f"{versions}, CPU ({os.cpu_count()} cores) [dry run: no CUDA needed]"
    if not torch.cuda.is_available():
        return 3, f"CUDA is not available ({versions}, CUDA build {torch.version.cuda})"
    props = torch.cuda.get_device_properties(0)
    return 0, (f"{versions}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x "
               f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {os.cpu_count()} cores")


def smoke_data(check):
    s = check.sizes
    write_jpegs(check.work / "data" / "train", s.train, s.pixels)
    write_jpegs(check.work / "data" / "val", s.val, s.pixels, seed=1)
    write_jpegs(check.work / "odd" / "train", s.odd_plain, s.pixels, seed=2)
    write_odd_files(check.work / "odd" / "train" / "n01000000", s.large)
    return 0, (f"{s.train} + {s.val} JPEGs of {s.pixels} px; {s.odd_plain} more with CMYK, "
               f"grayscale, progressive, PNG, truncated, undecodable and {s.large[0]}x"
               f"{s.large[1]} files")


def train_fp16(check):
    """The uninterrupted run, also the checkpoint the evaluations read."""
    rc = check.run("train_fp16", "main.py", [*check.train_flags("fp16"), *check.fp16()], 90)
    log = check.log_of("fp16")
    if rc or "epoch 2/2 done" not in log:
        return rc or 1, "did not finish 2 epochs"
    import torch
    saved = torch.load(check.work / "fp16" / "checkpoint.pth.tar", map_location="cpu",
                       weights_only=True)
    scale = saved["scaler"].get("scale")
    speed = re.findall(r"images_per_s (\S+)", log)[-1]
    options = dict(re.findall(r"(channels_last|fused optimizer) (True|False)", log))
    ok = check.dry or (scale is not None and set(options.values()) == {"True"})
    return (0 if ok else 1), (f"loss scale {scale}, channels_last {options.get('channels_last')}"
                              f", fused {options.get('fused optimizer')}, {speed} images/s"
                              + check.note("fp32, the rank started without torchrun"))


def sigterm_resume(check):
    """Started like train_fp16, stopped by SIGTERM early in epoch 1, resumed."""
    flags = [*check.train_flags("resumed"), *check.fp16()]
    ranks = check.start("sigterm_resume", "main.py", flags, 90)
    while ranks.alive() and not re.search(r"epoch 1/2 iter 2/", check.log_of("resumed")):
        time.sleep(0.05)
    if not ranks.alive():  # never wait for a run that already died
        return ranks.wait() or 1, "the run ended before it could be signalled"
    ranks.terminate()
    stopped_rc = ranks.wait()
    stop = re.search(r"stopping on a signal at epoch (\d+), iteration (\d+)",
                     check.log_of("resumed"))
    if not stop:
        return stopped_rc or 1, "no checkpoint-and-stop after SIGTERM"
    rc = check.run("sigterm_resume", "main.py", flags, 90)
    resumed = "resumed from" in check.log_of("resumed")
    return (rc if rc or resumed else 1), (
        f"stopped at epoch {stop.group(1)}, iteration {stop.group(2)} (exit {stopped_rc}); "
        f"resumed {'and finished' if not rc and resumed else 'NOT'}"
        + check.note("SIGTERM to the rank itself, no torchrun between"))


def step_losses(log):
    """{(epoch, iteration): loss} of an out.log, the last line of each step counting."""
    return {(int(e), int(i)): float(v) for e, i, v in STEP_LINE.findall(log)}


def resume_matches(check):
    """The resumed run against the uninterrupted one: losses at every step, and the
    final weights (bit for bit on the CPU)."""
    import torch
    ours, theirs = step_losses(check.log_of("resumed")), step_losses(check.log_of("fp16"))
    if not theirs or set(ours) != set(theirs):
        return 1, f"steps differ: {len(ours)} resumed, {len(theirs)} uninterrupted"
    worst = max(abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-8) for k in theirs)
    load = lambda dump: torch.load(check.work / dump / "checkpoint.pth.tar",  # noqa: E731
                                   map_location="cpu", weights_only=True)["state_dict"]
    a, b = load("resumed"), load("fp16")
    equal = all(torch.equal(a[k], b[k]) for k in b)
    weights = max(((a[k].double() - b[k].double()).abs().max() / (b[k].double().abs().max()
                   + 1e-12)).item() for k in b if b[k].is_floating_point())
    ok = (equal and worst == 0) if check.dry else worst <= LOSS_TOLERANCE
    rule = "equal (CPU: bit for bit)" if check.dry else f"within {LOSS_TOLERANCE:g} relative"
    return (0 if ok else 1), (f"{len(theirs)} steps, loss differences up to {worst:.2g} "
                              f"({rule}); final weights {'equal' if equal else 'differ'}, "
                              f"up to {weights:.2g} relative")


def fp32_to_fp16(check):
    """An fp32 run with per-tensor AdamW, resumed in fp16 with the fused AdamW: the
    scaler starts afresh, the optimizer state moves to the fused kernel's places."""
    flags = [*check.train_flags("precision"), "--optimizer", "adamw"]
    rc = check.run("fp32_to_fp16", "main.py",
                   [*flags, "--epochs", 1, "--precision", "fp32", "--fused", "False"], 60)
    if rc:
        return rc, "the fp32 run failed"
    resumed = ["--precision", "fp32"] if check.dry else ["--precision", "fp16"]
    rc = check.run("fp32_to_fp16", "main.py", [*flags, *resumed, "--fused", "True"], 60)
    log = check.log_of("precision")
    ok = not rc and "resumed from" in log and "epoch 2/2 done" in log
    return (rc or (0 if ok else 1)), ("an fp32, per-tensor AdamW checkpoint resumed with the "
                                      "fused AdamW" + (" in fp16" if not check.dry else "")
                                      + (", finished" if ok else ", FAILED")
                                      + check.note("fp16 needs CUDA: fp32 again; "
                                                   "tests/test_restore.py covers the scaler"))


def gpu_backend(check):
    """--data_backend gpu over plain JPEGs and the odd files: the worker's CPU decode of
    CMYK/grayscale/progressive/PNG, the substitute of a truncated file (loader) and of
    an undecodable one (decode), the large photo's pre-shrink, the fallbacks' log."""
    flags = check.train_flags("gpu_backend", data="odd", epochs=1)
    flags[flags.index("--batch_size") + 1] = 3 * check.sizes.batch
    rc = check.run("gpu_backend", "main.py", [*flags, *check.fp16(), "--data_backend", "gpu"], 60)
    log = check.log_of("gpu_backend")
    fallbacks = re.findall(r"GPU decoding fell back: (.*)", log)
    ok = not rc and "epoch 1/1 done" in log  # the fallbacks depend on what nvJPEG refuses
    return (rc or (0 if ok else 1)), (f"fallbacks: {fallbacks[-1] if fallbacks else 'none'}"
                                      + check.note("decoded by libjpeg on the CPU, not nvJPEG"))


def knn_results(check, dump):
    path = check.work / dump / "knn_results.json"
    return json.loads(path.read_text()) if path.exists() else None


def knn(check, dump, use_cuda):
    rc = check.run(dump, "eval_knn.py", check.eval_flags(dump, "--nb_knn", 5, 20,
                                                         "--use_cuda", use_cuda), 60)
    results = knn_results(check, dump)
    if rc or not results:
        return rc or 1, "no results"
    figure = ", ".join(f"{k}-NN top-1 {v['top1']:.1f}" for k, v in results.items())
    if dump == "knn_gpu":
        same = results == knn_results(check, "knn_cpu")
        figure += f"; {'equal to' if same else 'differs from'} the CPU bank's"
        figure += check.note("the bank is on the CPU either way")
    return 0, figure


def linear(check):
    rc = check.run("linear", "eval_linear.py",
                   check.eval_flags("linear", "--epochs", 1, "--lr_classifier", 10), 60)
    path = check.work / "linear" / "linear_results.json"
    if rc or not path.exists():
        return rc or 1, "no results"
    return 0, ", ".join(f"{k} {v:.4g}" for k, v in json.loads(path.read_text()).items()
                        if isinstance(v, (int, float)))


def two_processes(check):
    """Two ranks on the one device: SyncBatchNorm's real exchange in main.py, then the
    k-NN shard merge of a CPU bank, against the one-process result. NCCL first (it
    may refuse two ranks on one GPU), else gloo."""
    tried = []
    for backend in ([] if check.dry else ["nccl"]) + ["gloo"]:
        flags = check.train_flags(f"two_{backend}", epochs=1)
        flags[flags.index("--batch_size") + 1] = check.sizes.batch // 2  # the same total
        rc = check.run(f"two_processes_{backend}", "main.py",
                       [*flags, *check.fp16(), "--dist_backend", backend],
                       60 if backend == "nccl" else 90, nproc=2)
        tried.append(f"{backend} rc {rc}")
        if not rc:
            break
        refused = (check.out / "logs" / f"two_processes_{backend}.log").read_text()
        tried[-1] += " (duplicate GPU)" if "Duplicate GPU" in refused else ""
    if rc:
        return rc, "; ".join(tried)
    synced = "synchronised across processes True" in check.log_of(f"two_{backend}")
    rc = check.run("two_processes_knn", "eval_knn.py",
                   check.eval_flags("knn_two", "--nb_knn", 5, 20, "--use_cuda", "False",
                                    "--dist_backend", backend), 60, nproc=2)
    same = knn_results(check, "knn_two") == knn_results(check, "knn_cpu")
    ok = not rc and same and (synced or check.dry)
    return (rc or (0 if ok else 1)), (
        f"{'; '.join(tried)}; SyncBatchNorm {synced}; sharded k-NN "
        f"{'equals' if same else 'DIFFERS from'} one process"
        + check.note("gloo on the CPU, where batch norm is not synchronised"))


def unit_step(check):
    """The direct checks of the defects, in a process of their own (see unit_checks)."""
    command = [sys.executable, "tools/gpu_check.py", "--unit", *(["--dry-run"] * check.dry)]
    log = check.out / "logs" / "unit_checks.log"
    left = check.deadline - time.monotonic()
    code = Ranks([command], [{}], min(120, left), log, check.env).wait()
    lines = [line for line in log.read_text().splitlines() if line.startswith(("PASS", "FAIL"))]
    failed = [line.split(":")[0][5:] for line in lines if line.startswith("FAIL")]
    return code, (f"{len(lines) - len(failed)} of {len(lines)} passed"
                  + (f"; failed: {', '.join(failed)}" if failed else "")
                  + check.note("on the CPU")), lines


def bf16_compile(check):
    flags = check.train_flags("compile", epochs=1)
    extra = ["--precision", "fp32", "--compile", "eager"] if check.dry else [
        "--precision", "bf16", "--compile"]
    rc = check.run("bf16_compile", "main.py", [*flags, *extra], 200)
    log = check.log_of("compile")
    ok = not rc and "epoch 1/1 done" in log
    speed = re.findall(r"images_per_s (\S+)", log)
    return (rc or (0 if ok else 1)), (f"{speed[-1] if speed else '?'} images/s in the last step"
                                      + check.note("fp32 and dynamo's eager backend: bf16 is "
                                                   "slow on this CPU, inductor's build long"))


# ---------------------------------------------------------------------- bench

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


# ---------------------------------------------------------------------- unit checks

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
    from src.gpu_views import ViewSpec, make_views, N_PARAMS, NEUTRAL_COLOUR, JITTER
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
    from src.optim import load_optimizer_state
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
    import types
    import torch
    from src.checkpoint import with_module_prefix
    from src.optim import AmpOptimizer
    from src.resume import RunCheckpoint
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
        run = RunCheckpoint(os.path.join(tmp, "c.pth"), types.SimpleNamespace(device=device))
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
    from src.gpu_data import EncodedBatch, GpuViews, decode, read_encoded
    from src.gpu_views import N_PARAMS
    from args import get_args
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
    views = GpuViews(get_args(["--dataset", "demo"]), device)(bad)
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
    """Defect 7: the benchmark's authors row steps per tensor, its foreach row foreach."""
    import types
    from tools import benchmark
    bench = types.SimpleNamespace(arch="resnet18", dataset="demo", crop=32, views=2)
    kernels = {}
    for name in ("authors", "foreach"):
        group = benchmark.build(bench, name, device)[1].optimizer.param_groups[0]
        kernels[name] = (group["fused"], group["foreach"])
    assert kernels == {"authors": (None, False), "foreach": (None, True)}, kernels
    return f"authors: per-tensor SGD, foreach row: torch's foreach loop, on {device}"


# ---------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entry", nargs="*", metavar="smoke|bench",
                        help="entry points to run (the dry run: both unless named)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--unit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.unit:
        sys.exit(unit_checks(args.dry_run))
    entries = args.entry or (["smoke", "bench"] if args.dry_run else [])
    if not entries or set(entries) - {"smoke", "bench"}:
        parser.error("name the entry points: smoke, bench (or --dry-run for both on the CPU)")
    out = Path(os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("")  # this invocation's steps only
    shutil.rmtree(out / "logs", ignore_errors=True)
    start, failed = time.monotonic(), 0
    for entry in entries:
        check = Check(entry, out, args.dry_run)
        print(f"== {entry}{' (dry run on the CPU)' if args.dry_run else ''}: results in "
              f"{out}/results.jsonl", flush=True)
        try:
            (smoke if entry == "smoke" else bench)(check)
        finally:
            shutil.rmtree(check.work, ignore_errors=True)
        bad = [r["step"] for r in check.results if r["rc"] != 0]
        failed += len(bad)
        print(f"== {entry}: {len(check.results) - len(bad)} of {len(check.results)} steps "
              f"passed" + (f" (not: {', '.join(bad)})" if bad else ""), flush=True)
    print(f"== done in {time.monotonic() - start:.0f} s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
