"""What a hostile user meets: a crash ends every process at once, whatever the loader
workers; full disks, shared dump folders, odd files where checkpoints go, non-finite
flags, files that load but are no checkpoints, signals at awkward moments (while the
data loads, during a checkpoint write, during the online monitor), 16-bit images,
symbolic-link loops and datasets that change between stop and resume."""
import fcntl
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.models.resnet import ResNet

import main as main_script
from args import get_args, pretraining
from crash_run import arm, send
from helpers_eval import fast_flags
from helpers_run import ONE, REPO, TINY, digest, launch, one_line, run_main, wait_for
from src.data.datasets import pretrain_images
from src.data.demo import MARKER, generate_demo_dataset, make_image
from src.data.encoded import read_encoded
from src.data.images import read_rgb
from src.errors import script_entry
from src.train.startup import lock_dump_path

GONE_WITHIN_S = 20  # after the failure: generous for a loaded 2-core machine


def session_processes(session):
    """Pids of the live processes of a session (a run started with start_new_session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == session and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def watch(process, marker):
    """(exit code, output, seconds from the first line holding `marker` to the exit of
    `process`); the whole session is killed if it is still there 120 s later."""
    lines, seen = [], []

    def read():
        for line in process.stdout:
            lines.append(line)
            if marker in line and not seen:
                seen.append(time.monotonic())
    threading.Thread(target=read, daemon=True).start()
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError("the run never exited:\n" + "".join(lines)[-3000:])
    ended = time.monotonic()
    time.sleep(0.5)  # the reader gets the last lines
    assert seen, "".join(lines)[-3000:]
    return code, "".join(lines), ended - seen[0]


def assert_all_gone(process, output):
    left = session_processes(process.pid)
    if left:
        os.killpg(process.pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}\n{output[-3000:]}"


def image_folder(root, images):
    """root/train/c{0,1,2}/ with `images` small JPEGs in all."""
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "train" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        make_image(i % 3, rng, size=16).save(folder / f"{i}.JPEG")
    return root


FOLDER_FLAGS = ["--dataset", "imagenet", "--crops_size", "16", "--size_dataset", "-1"]
SHORT = ["--size_dataset", "16", "--checkpoint_iters", "0"]  # 2 steps per epoch


@pytest.fixture(scope="module")
def short_run(demo_path, tmp_path_factory):
    """The dump folder of a finished one-epoch SHORT run, its previous checkpoint at
    iteration 1 (tests work on copies)."""
    dump = tmp_path_factory.mktemp("short_run")
    assert run_main(dump, demo_path, *SHORT, "--epochs", "1", "--checkpoint_iters", "1") == 0
    return dump


def copy_of(dump, parent):
    """A copy of the dump folder `dump` in `parent`/run."""
    return Path(shutil.copytree(dump, parent / "run"))


# ------------------------------------------------- 0. a crash or a stop ends every process

@pytest.mark.parametrize("way,flags,processes,expected", [
    ("exception", ["--workers", "2"], 1, 1),
    ("exception", ["--workers", "1", "--data_backend", "gpu"], 2, 1),
    ("stop signal to the group", ["--workers", "2", "--data_backend", "gpu"], 1, 75),
])
def test_a_crash_or_a_stop_ends_every_process_within_seconds(way, flags, processes,
                                                             expected, demo_path, tmp_path):
    """An exception inside a step with loader workers used to hang for ever: the
    workers ignore SIGTERM, the traceback kept their iterator alive, and
    multiprocessing waited for them at interpreter exit. (The other ways out, with 0,
    1 and 2 workers and both backends, were checked once by hand: see issue 14.)"""
    faults = {}
    if way == "exception":  # on the last rank: a peer must not wait for it for ever
        faults = {"RESA_RAISE": f"{processes - 1}:forward:3"}
    run = launch(tmp_path / "run", demo_path, *flags, processes=processes, faults=faults,
                 wait=False)
    if way.startswith("stop"):
        wait_for(tmp_path / "run" / "out.log", "epoch 1/2 iter 2/8")
        os.killpg(run.pid, signal.SIGTERM)  # as a terminal's or SLURM's signal would
    marker = {"exception": "crash_run: injected failure", "stop signal to the group":
              "stopping on"}
    code, output, seconds = watch(run, marker[way])
    assert code == expected and ("Traceback" in output) == (way == "exception"), \
        output[-3000:]
    assert seconds < GONE_WITHIN_S, output[-3000:]
    assert_all_gone(run, output)


def test_no_child_process_outlives_a_script_and_ctrl_c_is_one_line(capsys):
    """The script entry's last resort: a child that ignores SIGTERM and was never told
    to stop is killed; a KeyboardInterrupt is one line and exit code 130."""
    def stubborn():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)

    @script_entry
    def failing(error):  # after starting a child that nobody stops
        multiprocessing.get_context("fork").Process(target=stubborn, daemon=True).start()
        raise error

    started, stop = time.monotonic(), None
    try:
        failing(KeyboardInterrupt())
    except BaseException as err:  # (not pytest.raises: a KeyboardInterrupt would end pytest)
        stop = err
    assert isinstance(stop, SystemExit) and stop.code == 130
    assert time.monotonic() - started < 10
    assert not multiprocessing.active_children()
    assert one_line(capsys).endswith("error: interrupted (Ctrl-C)")


# ------------------------------------------------------------------ 1. a full disk

def test_a_file_size_limit_during_a_save_exits_74_with_one_line(demo_path, tmp_path):
    """A real limit (RLIMIT_FSIZE, as `ulimit -f`): torch.save raises a RuntimeError on
    top of the OSError. No temporary file is left (that the old checkpoint stays intact
    is tested with a simulated full disk in test_fault_tolerance.py)."""
    limit = 4 << 20  # out.log and the TensorBoard events fit, a checkpoint does not
    command = [sys.executable, "main.py", *TINY, *ONE, *SHORT, "--workers", "0",
               "--data_path", demo_path, "--dump_path", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                                  (limit, limit)))
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 74, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(errors) == 1
    assert "cannot write" in errors[0] and "File too large" in errors[0]
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob("*.pth*"))


# ------------------------------------------------------ 2. one run per dump folder

def hold_the_lock(path):
    """The pid of a forked process that holds `path`'s lock (as another run would)."""
    ready, tell = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: lock, tell the test, wait to be killed
        lock_dump_path(str(path))
        os.write(tell, b"locked")
        time.sleep(120)
        os._exit(0)
    assert os.read(ready, 6) == b"locked"
    return pid


def test_a_second_run_on_a_dump_path_in_use_is_refused(short_run, demo_path, tmp_path,
                                                       capsys):
    """Another process holds the folder: one line naming it, and its temporary file
    is not touched. Once the holder is SIGKILLed the folder is free again."""
    dump = copy_of(short_run, tmp_path)
    stray = dump / ".tmp-of-the-other-run.pth"
    stray.write_bytes(b"being written")
    holder = hold_the_lock(dump)
    capsys.readouterr()
    assert run_main(dump, demo_path, *SHORT, "--epochs", "1") == 2
    line = one_line(capsys)
    assert f"pid {holder} on {socket.gethostname()}" in line and "in use" in line
    assert stray.is_file() and "in use" not in (dump / "out.log").read_text()
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
    assert run_main(dump, demo_path, *SHORT, "--epochs", "1") == 0  # nothing left to train
    assert not stray.exists()  # ours to remove now
    with open(dump / ".lock") as lock:  # released at the end of the run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ------------------------------------------------- 3, 4. what lies where checkpoints go

def test_an_unreadable_newest_checkpoint_is_set_aside_not_rotated_over_the_good_one(
        short_run, demo_path, tmp_path, monkeypatch):
    dump = copy_of(short_run, tmp_path)
    previous = dump / "checkpoint.prev.pth.tar"
    good = digest(previous)  # at iteration 1
    (dump / "checkpoint.pth.tar").write_bytes(b"")
    arm(0, "forward", 1, send("TERM"), monkeypatch.setattr)  # stop after the first save
    assert run_main(dump, demo_path, *SHORT) == 75
    assert digest(previous) == good
    newest = torch.load(dump / "checkpoint.pth.tar", weights_only=True)
    assert (newest["epoch"], newest["iteration"]) == (1, 0)
    aside = list(dump.glob("checkpoint.bad-*.pth.tar"))
    assert len(aside) == 1 and aside[0].stat().st_size == 0


def test_a_folder_where_the_checkpoint_goes_is_refused_before_training(short_run, demo_path,
                                                                       tmp_path, capsys):
    for name in ("checkpoint.pth.tar", "checkpoint.prev.pth.tar"):
        dump = tmp_path / name.split(".")[1]
        (dump / name).mkdir(parents=True)
        capsys.readouterr()
        assert run_main(dump, demo_path) == 2
        assert "is not a file" in one_line(capsys)
        assert (dump / name).is_dir() and " iter " not in (dump / "out.log").read_text()
    dump = copy_of(short_run, tmp_path / "temp")
    (dump / ".tmp-folder.pth").mkdir()
    (dump / ".tmp-file.pth").write_bytes(b"half")
    assert run_main(dump, demo_path, *SHORT, "--epochs", "1") == 0  # nothing left to train
    assert (dump / ".tmp-folder.pth").is_dir() and not (dump / ".tmp-file.pth").exists()


# -------------------------------------------------------------- 5. non-finite values

@pytest.mark.parametrize("script,flag,value", [
    ("main", "--lr", "nan"), ("main", "--lr", "inf"), ("main", "--temperature", "nan"),
    ("main", "--wd", "inf"), ("main", "--final_lr", "nan"),
    ("main", "--checkpoint_minutes", "nan"), ("eval_linear", "--lr_classifier", "inf"),
    ("eval_knn", "--knn_temperature", "nan"),
])
def test_non_finite_flags_are_refused(script, flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        get_args([flag, value], script)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "must be a finite number" in err[0]


def test_diverged_weights_are_never_checkpointed(short_run, demo_path, tmp_path,
                                                monkeypatch):
    """A NaN learning rate: the first loss is finite, the weights after it are not.
    The due checkpoint is refused, so the one kept is really the last good one."""
    dump = copy_of(short_run, tmp_path)
    good = digest(dump / "checkpoint.pth.tar")
    monkeypatch.setattr(main_script, "lr_schedule",
                        lambda optim, lr, n: np.full(optim.epochs * n, np.nan))
    assert run_main(dump, demo_path, *SHORT, "--checkpoint_iters", "1") == 1
    assert digest(dump / "checkpoint.pth.tar") == good
    log = (dump / "out.log").read_text()
    assert "the weights are not finite at epoch 2, iteration 1" in log
    assert "no checkpoint was written; the last good checkpoint" in log


# ----------------------------------------------- 6. files that load but are no checkpoints

@pytest.mark.parametrize("content,problem", [
    (torch.zeros(3), "a Tensor, not a dict"),
    ({"state_dict": 5}, "no epoch"),
    ({"state_dict": 5, "epoch": 0}, "state_dict is a int"),
    ({"state_dict": {"a": 1}, "epoch": 0}, "holds more than tensors"),
])
def test_a_loadable_file_of_another_shape_is_one_line(content, problem, demo_path, tmp_path,
                                                      capsys):
    torch.save(content, tmp_path / "checkpoint.pth.tar")
    capsys.readouterr()
    assert run_main(tmp_path, demo_path) == 2
    line = one_line(capsys)
    assert "is not a main.py checkpoint" in line and problem in line


def test_a_checkpoint_with_an_entry_of_the_wrong_type_is_one_line(short_run, demo_path,
                                                                  tmp_path, capsys):
    good = torch.load(short_run / "checkpoint.pth.tar", weights_only=True)
    for entry, value, problem in (("epoch", "one", "epoch is a str"),
                                  ("loop", {"loss_sum": 0.0}, "no loop.data"),
                                  ("optimizer", {"state": {}}, "no optimizer.param_groups"),
                                  ("random_states", [5], "random_states are not")):
        dump = tmp_path / entry
        dump.mkdir()
        torch.save({**good, entry: value}, dump / "checkpoint.pth.tar")
        capsys.readouterr()
        assert run_main(dump, demo_path, *SHORT) == 2, entry
        line = one_line(capsys)
        assert "is not a main.py checkpoint" in line and problem in line


# -------------------------------------------------------------------- 7, 8. signals

def fake_scontrol(folder):
    """A `scontrol` that records its arguments; (PATH and SLURM variables, calls file)."""
    (folder / "bin").mkdir()
    calls = folder / "scontrol.calls"
    (folder / "bin" / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (folder / "bin" / "scontrol").chmod(0o755)
    return {"SLURM_JOB_ID": "4242", "PATH": f"{folder / 'bin'}:{os.environ['PATH']}"}, calls


def test_a_stop_signal_while_the_data_loads_exits_75_and_requeues(demo_path, tmp_path):
    env, calls = fake_scontrol(tmp_path)
    code, output = launch(tmp_path / "run", demo_path, "--workers", "0", env=env,
                          faults={"RESA_SIGNAL": "0:data:1:USR1"})
    assert code == 75, output[-3000:]
    assert calls.read_text() == "requeue 4242\n"
    log = (tmp_path / "run" / "out.log").read_text()
    assert "stopping on a signal before the first step" in log and " iter " not in log


def test_a_second_ctrl_c_during_the_checkpoint_write_still_stops_with_it(demo_path, tmp_path):
    code, output = launch(tmp_path, demo_path, "--workers", "0",
                          faults={"RESA_SIGNAL": "0:forward:2:INT,0:save:1:INT"})
    assert code == 75 and "Traceback" not in output, output[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["iteration"]) == (0, 2)
    assert "stopping on a signal at epoch 1, iteration 2" in output


@pytest.mark.parametrize("script", ["main.py", "eval_knn.py", "eval_clusters.py"])
def test_ctrl_c_anywhere_is_one_line_exit_130_and_no_process_left(script, demo_path,
                                                                  image_folder,
                                                                  resnet18_file, tmp_path):
    """main.py: a second Ctrl-C stops at once; the evaluations stop at the first."""
    if script == "main.py":  # the same point twice: two signals in a row
        flags = [*TINY, *ONE, "--data_path", demo_path, "--dump_path", str(tmp_path)]
        points = "0:forward:2:INT,0:forward:2:INT"
    else:
        flags = fast_flags(image_folder, tmp_path, "--pretrained", resnet18_file,
                           "--batch_size", 2, *(["--tsne_samples", 0] if "clusters" in script
                                                else []))
        points = "0:eval:2:INT"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "RESA_SIGNAL": points}
    run = subprocess.Popen([sys.executable, "tests/crash_run.py", script, *flags,
                            "--workers", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    code, output, _ = watch(run, "interrupted")
    errors = [line for line in output.splitlines() if "error:" in line]
    assert code == 130 and "Traceback" not in output, output[-3000:]
    assert errors == [f"{Path(script).name}: error: interrupted (Ctrl-C)"]
    assert_all_gone(run, output)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """A demo dataset of 10 train and 4 val images per class: a monitor that is quick."""
    root = tmp_path_factory.mktemp("small_demo") / "demo"
    generate_demo_dataset(root, train_per_class=10, val_per_class=4)
    (root / MARKER).write_text("small demo for the tests\n")
    return str(root)


@pytest.mark.parametrize("phase", ["features", "classifier"])
def test_a_stop_signal_during_the_online_monitor_stops_at_once(phase, small_demo, tmp_path,
                                                               monkeypatch):
    """The signal comes during the monitor's feature extraction (at its 2nd batch) or
    its linear classifier (at its 3rd step, one per epoch): the run stops before the
    next batch or epoch, not after the whole evaluation."""
    calls = {"features": 0, "classifier": 0}
    forward, step = ResNet.forward, torch.optim.Adam.step  # Adam: the classifier's alone

    def encoding(self, x):
        calls["features"] += not self.training
        if phase == "features" and calls["features"] == 2 and not self.training:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, x)

    def training_the_classifier(self, *args):
        calls["classifier"] += 1
        if phase == "classifier" and calls["classifier"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *args)
    monkeypatch.setattr(ResNet, "forward", encoding)
    monkeypatch.setattr(torch.optim.Adam, "step", training_the_classifier)
    flags = ["--epochs", "1", "--eval_every", "1", "--batch_size", "16", "--size_dataset", "16"]
    assert run_main(tmp_path, small_demo, *flags) == 75
    log = (tmp_path / "out.log").read_text()
    assert "stopping on a signal at epoch 2, iteration 0" in log
    assert "monitor after epoch 1" not in log
    assert calls[phase] == {"features": 2, "classifier": 3}[phase]


def scalars(dump, prefix):
    """{tag: [(step, value)]} of the run's TensorBoard scalars under `prefix`, as
    TensorBoard shows them (a restart's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(dump / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag.startswith(prefix)}


def test_a_run_stopped_during_the_monitor_measures_that_epoch_when_it_resumes(
        small_demo, tmp_path, monkeypatch):
    """Stopped in the monitor after epoch 1 (its checkpoint written): the restart purges
    TensorBoard from that step on, so it logs epoch 1's scalars again and runs its monitor
    before epoch 2; TensorBoard then shows what an uninterrupted run shows."""
    flags = ["--epochs", "2", "--eval_every", "1", "--batch_size", "16", "--size_dataset", "16"]
    assert run_main(tmp_path / "whole", small_demo, *flags) == 0
    forward, stopped = ResNet.forward, []

    def encoding(self, x):
        if not self.training and not stopped:  # the monitor's first batch
            stopped.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, x)
    monkeypatch.setattr(ResNet, "forward", encoding)
    assert run_main(tmp_path / "cut", small_demo, *flags) == 75 and stopped
    assert "monitor after epoch 1" not in (tmp_path / "cut" / "out.log").read_text()
    assert run_main(tmp_path / "cut", small_demo, *flags) == 0
    log = (tmp_path / "cut" / "out.log").read_text()
    assert log.index("monitor after epoch 1") > log.index("resumed from")
    for prefix in ("monitor/", "epoch/loss", "train/loss"):
        expected = scalars(tmp_path / "whole", prefix)
        assert scalars(tmp_path / "cut", prefix) == expected and expected, prefix
    assert [step for step, _ in expected["train/loss"]] == [0, 1]
    assert [step for step, _ in scalars(tmp_path / "cut", "epoch/train_minutes")[
        "epoch/train_minutes"]] == [1, 2]


# -------------------------------------------------------------------------- 9-11. data

def test_a_16_bit_png_reads_as_its_8_bit_grey_in_both_data_backends(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((6, 5), 32896, dtype=np.uint16)).save(path)  # 0x8080
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # 16-bit grayscale, as Pillow opens it
    pixels = np.asarray(read_rgb(path))
    assert pixels.shape == (6, 5, 3) and (pixels == 128).all()
    data, jpeg, height, width = read_encoded(path)
    assert not jpeg and (height, width) == (6, 5) and (data == 128).all()


def test_a_symlink_loop_in_a_class_folder_lists_each_image_once(tmp_path, log_lines):
    root = image_folder(tmp_path / "data", 9)
    (root / "train" / "c1" / "nested").mkdir()
    make_image(1, np.random.default_rng(1), size=16).save(root / "train" / "c1" / "nested"
                                                          / "n.JPEG")
    data = pretraining(get_args(["--dataset", "imagenet", "--data_path", str(root),
                                 "--size_dataset", "-1"])).data
    expected = ImageFolder(str(root / "train")).samples  # torchvision's order, no loop yet
    os.symlink(".", root / "train" / "c0" / "loop")
    listed = pretrain_images(data).samples
    assert listed == expected and len(listed) == 10
    assert "a symbolic link loop" in " ".join(log_lines)


def test_a_dataset_changed_between_stop_and_resume_is_reported(tmp_path, monkeypatch):
    data = image_folder(tmp_path / "data", 30)
    flags = [*FOLDER_FLAGS, "--batch_size", "10", "--checkpoint_iters", "0"]
    assert run_main(tmp_path / "run", str(data), *flags, "--epochs", "1") == 0
    (data / "train" / "c0" / "0.JPEG").rename(data / "train" / "c0" / "renamed.JPEG")
    arm(0, "forward", 1, send("TERM"), monkeypatch.setattr)  # resume, then stop at once
    assert run_main(tmp_path / "run", str(data), *flags) == 75
    log = (tmp_path / "run" / "out.log").read_text()
    assert "the training set changed since" in log
    assert "(30 -> 30 images and its file list differs)" in log
