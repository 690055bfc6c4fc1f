"""Running the steps of an entry point: each one timed, printed and recorded as it
ends, under a shared budget; the processes of a run, stopped together."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

MODULES = ("torch", "torchvision", "numpy", "PIL", "tqdm", "tensorboard")

KILL_AFTER = 30  # seconds from TERM to KILL

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
