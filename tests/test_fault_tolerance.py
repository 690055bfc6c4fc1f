"""A killed run, started again with the same command, ends bit-identical to the run that
was never interrupted; stop signals checkpoint and (under SLURM) requeue; bad images
and bad disks lose nothing; a resume with other flags is refused.

Kills are real SIGKILLs of every process of the run (torchrun, ranks, loader workers)
at chosen points, including in the middle of a checkpoint write (tests/crash_run.py).
"""
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from crash_run import descendants
from helpers_eval import fast_flags
from helpers_run import digest, launch, one_line, run_main, wait_for
from src.data.demo import make_image

REPO = Path(__file__).resolve().parents[1]


def tensors(tree, prefix=""):
    """{path: tensor} of every tensor in nested dicts and lists."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, (list, tuple)) else []
    found = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


def losses(dump):
    """(step, loss) of every training step in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(dump / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def final_state(dump):
    checkpoint = torch.load(dump / "checkpoint.pth.tar", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["iteration"]) == (2, 0)
    return tensors({k: checkpoint[k] for k in ("state_dict", "optimizer", "scaler")})


def assert_same_run(dump, reference, at_least=300):
    """The final weights, buffers, optimizer and scaler tensors (over `at_least` of
    them) and the logged losses of `dump` are those of `reference`, bit for bit."""
    state, expected = final_state(dump), final_state(reference)
    different = [k for k in expected if not torch.equal(state[k], expected[k])]
    assert set(state) == set(expected) and len(expected) > at_least and not different, different
    assert losses(dump) == losses(reference) and len(losses(reference)) == 16
    assert not list(dump.glob(".tmp-*"))


@pytest.fixture(scope="module")
def reference_two(demo_path, tmp_path_factory):
    dump = tmp_path_factory.mktemp("reference_two")
    code, output = launch(dump, demo_path, processes=2)
    assert code == 0, output[-3000:]
    return dump


@pytest.fixture(scope="module")
def reference_one(demo_path, tmp_path_factory):
    dump = tmp_path_factory.mktemp("reference_one")
    code, output = launch(dump, demo_path)
    assert code == 0, output[-3000:]
    return dump


def test_one_process_with_workers_killed_during_a_save_ends_bit_identical(
        reference_one, demo_path, tmp_path):
    """Killed halfway through writing the first checkpoint, then between the renames of
    the second (the newest checkpoint becomes the previous one; the new one is not in
    place yet), then after a step."""
    for crash in ("0:save:1", "0:rotate:1", "0:step:4"):
        code, output = launch(tmp_path, demo_path, "--workers", "2", crash=crash)
        assert code == -signal.SIGKILL, output[-3000:]
        if crash.endswith("save:1"):  # the half-written file of the first kill ...
            assert list(tmp_path.glob(".tmp-*"))
        if crash.endswith("rotate:1"):  # a complete newest checkpoint at every moment
            newest = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
            assert (newest["epoch"], newest["iteration"]) == (0, 3)
    code, output = launch(tmp_path, demo_path, "--workers", "2")
    assert code == 0, output[-3000:]
    assert_same_run(tmp_path, reference_one)  # ... is gone, and the run is the same
    assert "resuming from the previous checkpoint" not in (tmp_path / "out.log").read_text()


def test_the_uninterrupted_run_layout(reference_two):
    """The checkpoint is the authors' layout; the export loads into torchvision."""
    checkpoint = torch.load(reference_two / "checkpoint.pth.tar", weights_only=True)
    assert set(checkpoint) >= {"epoch", "iteration", "state_dict", "optimizer", "scaler",
                               "args", "random_states", "loop"}
    assert all(k.startswith("module.") for k in checkpoint["state_dict"])
    assert "module.momentum_projector.6.weight" in checkpoint["state_dict"]
    assert len(checkpoint["random_states"]) == 2  # one per process
    assert checkpoint["loop"]["seconds"] > 0  # training time, kept across resumes
    log = (reference_two / "out.log").read_text()
    assert "2 process(es)" in log and "epoch 2/2 done" in log
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(reference_two / "encoder.pth", weights_only=True))
    assert torch.equal(model.conv1.weight,
                       checkpoint["state_dict"]["module.momentum_encoder.conv1.weight"])


def test_two_processes_killed_three_times_and_stopped_end_bit_identical(
        reference_two, demo_path, tmp_path):
    """SIGKILL at seeded points (after a step, in a step, during a save; with 0 and 2
    loader workers), then SIGTERM to torchrun: the checkpoint comes within one step,
    and the run started again ends bit-identical to the uninterrupted one."""
    rng = random.Random(0)
    crashes = [(f"1:step:{rng.randint(1, 4)}", "0"), ("0:save:2", "2"),
               (f"0:forward:{rng.randint(2, 4)}", "2")]
    for crash, workers in crashes:
        code, output = launch(tmp_path, demo_path, "--workers", workers, processes=2,
                              crash=crash)
        assert code == -signal.SIGKILL, output[-3000:]
    run = launch(tmp_path, demo_path, "--workers", "2", processes=2, wait=False)
    wait_for(tmp_path / "out.log", "epoch 2/2 iter 2/8")
    run.send_signal(signal.SIGTERM)
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0, output[-3000:]  # torchrun reports that it was stopped
    checkpoint = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    log = (tmp_path / "out.log").read_text()
    last = max(int(line.split(" iter ")[1].split("/")[0])
               for line in log.splitlines() if "epoch 2/2 iter" in line)
    assert (checkpoint["epoch"], checkpoint["iteration"]) == (1, last) and 2 <= last < 8
    assert "stopping on a signal at epoch 2, iteration" in log
    code, output = launch(tmp_path, demo_path, "--workers", "0", processes=2)
    assert code == 0, output[-3000:]
    log = (tmp_path / "out.log").read_text()
    assert log.count("resumed from") == 4 and "left by a run killed while saving" in log
    assert_same_run(tmp_path, reference_two)


def test_a_run_on_shards_killed_and_started_again_is_the_run_on_their_folder(demo_path,
                                                                             tmp_path):
    """--dataset shards reads by random access, so the sampler's exact resume holds: a
    run on shards killed halfway through its second save, with 2 loader workers, then
    started again (from the first), ends bit-identical to the uninterrupted run on the
    folder the shards were made from (the same images in the same order)."""
    folder = str(Path(demo_path) / "train")
    made = subprocess.run([sys.executable, "tools/make_shards.py", folder, tmp_path / "tars",
                           "--shard_size", "20"], cwd=REPO, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    shards = ["--dataset", "shards", "--data_path", f"{tmp_path}/tars/train-{{000000..000099}}.tar",
              "--crops_size", "32", "--workers", "2"]  # 64 images: the first 4 shards
    code, output = launch(tmp_path / "folder", demo_path, "--dataset", "folder",
                          "--data_path", folder, "--crops_size", "32", "--workers", "0")
    assert code == 0, output[-3000:]
    code, output = launch(tmp_path / "run", demo_path, *shards, crash="0:save:2")
    assert code == -signal.SIGKILL, output[-3000:]
    code, output = launch(tmp_path / "run", demo_path, *shards)
    assert code == 0, output[-3000:]
    assert (tmp_path / "run" / "out.log").read_text().count("resumed from") == 1
    assert_same_run(tmp_path / "run", tmp_path / "folder")


@pytest.mark.parametrize("method", ["byol", "swav", "simclr"])
def test_each_baseline_killed_once_ends_bit_identical(method, method_run, demo_path,
                                                      tmp_path):
    """SIGKILL after step 5 (one loader worker; the checkpoint of step 3 on disk), then
    the same command: the run ends as the uninterrupted one, bit for bit. SwAV's
    prototypes are frozen for the first epoch: the resumed run crosses that boundary,
    so its freezing must follow the run's step, not the process's."""
    flags = ["--method", method]
    code, output = launch(tmp_path, demo_path, *flags, "--workers", "1", crash="0:step:5")
    assert code == -signal.SIGKILL, output[-3000:]
    at_kill = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert (at_kill["epoch"], at_kill["iteration"]) == (0, 3)
    code, output = launch(tmp_path, demo_path, *flags, "--workers", "0")
    assert code == 0, output[-3000:]
    assert "resumed from" in (tmp_path / "out.log").read_text()
    assert_same_run(tmp_path, method_run(method), at_least=150)
    if method == "swav":  # the prototypes learned after the freeze, in the resumed run
        final = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
        key = "module.prototypes.weight"
        assert not torch.allclose(final["state_dict"][key], at_kill["state_dict"][key])


def test_sigusr1_to_one_rank_checkpoints_then_requeues_once(demo_path, tmp_path):
    """A fake `scontrol` on PATH records its arguments and copies the checkpoint it
    finds, so the test sees that the file was complete when the job was requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n'
                        f'cp {tmp_path}/run/checkpoint.pth.tar {tmp_path}/at_requeue.pth\n')
    scontrol.chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = launch(tmp_path / "run", demo_path, "--workers", "0", processes=2, env=env,
                 wait=False)
    wait_for(tmp_path / "run" / "out.log", "epoch 1/2 iter 3/8")
    ranks = [pid for pid in descendants(run.pid) if "main.py" in
             Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
    rank1 = [pid for pid in ranks if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
    assert len(ranks) == 2 and len(rank1) == 1
    os.kill(rank1[0], signal.SIGUSR1)  # the signal reaches one rank only
    output, _ = run.communicate(timeout=120)
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n", output[-3000:]
    at_requeue = torch.load(tmp_path / "at_requeue.pth", weights_only=True)
    final = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=True)
    assert at_requeue["iteration"] == final["iteration"] > 3 and final["epoch"] == 0
    assert "requeued" in (tmp_path / "run" / "out.log").read_text()


# ----------------------------------------------------------------- in one process

def test_a_failing_write_stops_with_one_line_and_keeps_the_old_checkpoint(
        demo_path, tmp_path, monkeypatch, capsys):
    assert run_main(tmp_path, demo_path, "--epochs", "1", "--checkpoint_iters", "0") == 0
    before = digest(tmp_path / "checkpoint.pth.tar")
    capsys.readouterr()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    assert run_main(tmp_path, demo_path) == 74
    line = one_line(capsys)
    assert "cannot write" in line and "checkpoint.pth.tar" in line and "No space left" in line
    assert digest(tmp_path / "checkpoint.pth.tar") == before
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_one(demo_path, tmp_path,
                                                                   capsys):
    assert run_main(tmp_path, demo_path, "--epochs", "1", "--checkpoint_iters", "4") == 0
    previous = torch.load(tmp_path / "checkpoint.prev.pth.tar", weights_only=True)
    assert (previous["epoch"], previous["iteration"]) == (0, 4)
    (tmp_path / "checkpoint.pth.tar").write_bytes(b"\0" * 1000)  # e.g. a bad disk block
    assert run_main(tmp_path, demo_path, "--epochs", "1") == 0
    log = (tmp_path / "out.log").read_text()
    assert "resuming from the previous checkpoint" in log
    assert "resumed from" in log and "checkpoint.prev.pth.tar at epoch 1, iteration 4" in log
    for name in ("checkpoint.pth.tar", "checkpoint.prev.pth.tar"):
        (tmp_path / name).write_text("garbage")
    capsys.readouterr()
    assert run_main(tmp_path, demo_path) == 2
    assert "move both away to start a new run" in one_line(capsys)


def test_resume_refuses_other_model_flags_and_warns_on_new_epochs(demo_path, tmp_path,
                                                                  capsys):
    assert run_main(tmp_path, demo_path, "--epochs", "1") == 0
    capsys.readouterr()
    for flags, needle in ((["--mlp_dim", "32"], "--mlp_dim 64 -> 32"),
                          (["--arch", "resnet34"], "--arch resnet18 -> resnet34"),
                          (["--batch_size", "16"], "total batch 8 -> 16"),
                          (["--mean", "0.5", "0.5", "0.5"], "--mean ")):
        assert run_main(tmp_path, demo_path, *flags) == 2
        line = one_line(capsys)
        assert needle in line and line.count(needle) == 1  # --mean: in two configs, once
    assert run_main(tmp_path, demo_path, "--epochs", "3", "--workers", "1",
                    "--checkpoint_iters", "0", "--log_every", "7") == 0
    log = (tmp_path / "out.log").read_text()
    assert "--epochs 1 -> 3: the learning-rate and EMA schedules were recomputed" in log
    assert "epoch 3/3 done" in log


def image_folder_with_bad_files(root, good=298, bad=()):
    rng = np.random.default_rng(0)
    for i in range(good):
        folder = root / "train" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        make_image(i % 3, rng, size=16).save(folder / f"{i}.JPEG")
    for name, content in bad:
        (root / "train" / "c0" / name).write_bytes(content)
    return root


def test_bad_images_are_replaced_reported_and_too_many_stop(tmp_path, monkeypatch, capsys):
    jpeg = tmp_path / "one.jpg"
    Image.new("RGB", (64, 64), (9, 200, 9)).save(jpeg)
    bad = [("truncated.JPEG", jpeg.read_bytes()[:300]), ("notes.JPEG", b"just text\n")]
    data = image_folder_with_bad_files(tmp_path / "data", bad=bad)
    flags = ["--dataset", "imagenet", "--crops_size", "16", "--size_dataset", "-1",
             "--epochs", "1", "--batch_size", "60"]
    assert run_main(tmp_path / "ok", str(data), *flags) == 0
    log = (tmp_path / "ok" / "out.log").read_text()
    assert "truncated.JPEG: replaced by another sample" in log
    assert "notes.JPEG: replaced by another sample" in log
    mostly_bad = image_folder_with_bad_files(tmp_path / "bad", good=30,
                                             bad=[(f"b{i}.JPEG", b"x") for i in range(270)])
    capsys.readouterr()
    assert run_main(tmp_path / "stop", str(mostly_bad), *flags) == 2
    line = one_line(capsys)
    assert "were unreadable (over 1%)" in line and "b" in line and ".JPEG" in line


def test_linear_probe_killed_inside_an_epoch_ends_bit_identical(image_folder, resnet18_file,
                                                                 tmp_path):
    """eval_linear.py shares the loop: its head, optimizer, scheduler and best scores
    continue exactly too."""
    flags = fast_flags(image_folder, tmp_path / "ref", "--pretrained", resnet18_file,
                       "--epochs", 2, "--batch_size", 5, "--seed", 0, "--checkpoint_iters", 1,
                       "--checkpoint_minutes", 0, "--scheduler", "cos", "--lr_classifier", 1)
    runs = {}
    for name, crash in (("ref", None), ("kill", "0:step:4")):
        command = [arg if arg != str(tmp_path / "ref") else str(tmp_path / name) for arg in flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        if crash:
            env["RESA_CRASH"] = crash
            killed = subprocess.run([sys.executable, "tests/crash_run.py", "eval_linear.py",
                                     *command], cwd=REPO, env=env, capture_output=True)
            assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
            env.pop("RESA_CRASH")
        done = subprocess.run([sys.executable, "eval_linear.py", *command], cwd=REPO, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = torch.load(tmp_path / name / "checkpoint.pth.tar", weights_only=True)
    ref, kill = runs["ref"], runs["kill"]
    assert "resumed from" in (tmp_path / "kill" / "out.log").read_text()
    expected = tensors({k: ref[k] for k in ("state_dict", "optimizer")})
    got = tensors({k: kill[k] for k in ("state_dict", "optimizer")})
    assert all(torch.equal(got[k], v) for k, v in expected.items()) and len(expected) > 100
    assert {k: kill[k] for k in ("scheduler", "best_acc", "last_acc", "best_epoch")} == \
        {k: ref[k] for k in ("scheduler", "best_acc", "last_acc", "best_epoch")}


@pytest.mark.parametrize("name", ["srun.sbatch", "torchrun.sbatch"])
def test_sbatch_scripts_requeue_on_usr1(name):
    script = REPO / "tools" / "slurm" / name
    text = script.read_text()
    assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text
    assert "main.py" in text
    assert ("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in text) == \
        (name == "torchrun.sbatch")  # torchrun forwards SIGUSR1 only when told to
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
