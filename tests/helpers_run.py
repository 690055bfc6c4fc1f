"""Shared pieces of the pretraining fault tests: the tiny run's flags, main.py started as
a user would (optionally through tests/crash_run.py) or in this process, and checks of
what it printed."""
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import main as main_script

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "demo", "--arch", "resnet18", "--mlp_dim", "64", "--emb", "32",
        "--size_dataset", "64", "--warmup_epochs", "1", "--eval_every", "0", "--seed", "0",
        "--epochs", "2", "--log_every", "1", "--checkpoint_iters", "3",
        "--checkpoint_minutes", "0"]
ONE, TWO = ["--batch_size", "8"], ["--batch_size", "4"]  # the same total batch of 8
FAULTS = ("RESA_CRASH", "RESA_RAISE", "RESA_SIGNAL")  # see tests/crash_run.py


def launch(dump, demo, *flags, processes=1, crash=None, faults=None, env=None, wait=True,
           wrapper=None):
    """Start main.py as a user would; through tests/crash_run.py with `crash` (a
    RESA_CRASH spec) or `faults` ({variable: spec}), or through the script `wrapper`
    (a tests/ file that runs the script it is given, as crash_run.py does)."""
    faults = {**(faults or {}), **({"RESA_CRASH": crash} if crash else {})}
    wrapper = wrapper or ("tests/crash_run.py" if faults else None)
    script = [wrapper, "main.py"] if wrapper else ["main.py"]
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                **(env or {})}
    for variable in FAULTS:
        full_env.pop(variable, None)
    full_env.update(faults)
    command = [*launcher, *script, *TINY, *(TWO if processes == 2 else ONE),
               "--data_path", demo, "--dump_path", str(dump), *flags]
    process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def run_main(dump, demo_path, *flags):
    """main.main in this process; returns the exit code (0 when it returned)."""
    try:
        main_script.main([*TINY, *ONE, "--workers", "0", "--data_path", demo_path,
                          "--dump_path", str(dump), *flags])
    except SystemExit as stop:
        return stop.code
    return 0


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line(capsys):
    """The one error line on stderr (which also holds the progress bar)."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def wait_for(path, text, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in {path}")
