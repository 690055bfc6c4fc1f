"""Weights & Biases beside TensorBoard (resa_cifar's --wandb_project / --env_name), with
the stand-in `wandb` of tests/stand_ins: the same scalars, one run id across restarts,
TensorBoard alone when the package is missing."""
import json
import os
import sys

import pytest

from args import get_args, run_config
from helpers_eval import STAND_INS, assert_ok, make_fake_cifar100, run_script
from src import logger
from src.logger import WANDB_RUN, ScalarWriter, setup_logging


def calls(path, kind):
    lines = path.read_text().splitlines() if path.exists() else []
    return [c for c in map(json.loads, lines) if c["call"] == kind]


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """`import wandb` gives the stand-in; returns the file where it records its calls."""
    record = tmp_path / "wandb_calls.jsonl"
    monkeypatch.setenv("WANDB_STAND_IN_LOG", str(record))
    monkeypatch.syspath_prepend(str(STAND_INS))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    return record


def writer_run(dump, *flags):
    """The config.Run of main.py with `flags` (its scalars go to `dump`/tb)."""
    return run_config(get_args(["--dataset", "demo", "--dump_path", str(dump), *flags]))


def test_flags_and_defaults_follow_resa_cifar():
    """resa_cifar always logs to W&B (project resa_cifar); we do so for main.py on its
    datasets, and elsewhere only when asked; '' turns it off."""
    cifar = get_args(["--dataset", "cifar100", "--wandb_project", "resa_cifar",
                      "--env_name", "resa_cifar"])
    assert (cifar.wandb_project, cifar.env_name) == ("resa_cifar", "resa_cifar")
    for dataset in ("cifar10", "cifar100", "stl10"):
        assert get_args(["--dataset", dataset]).wandb_project == "resa_cifar"
    assert get_args(["--dataset", "cifar10", "--wandb_project", ""]).wandb_project == ""
    assert get_args(["--dataset", "imagenet"]).wandb_project == ""
    assert get_args(["--dataset", "cifar10"], "eval_linear").wandb_project == ""
    assert get_args(["--dataset", "demo", "--wandb_project", "p", "--env_name", "r"],
                    "eval_linear").env_name == "r"


def test_the_same_scalars_go_to_wandb_and_a_resume_continues_its_run(stand_in, tmp_path):
    setup_logging(str(tmp_path), 0)
    run = writer_run(tmp_path, "--wandb_project", "proj", "--env_name", "run1")
    writer = ScalarWriter(run, True, purge_step=0)
    writer.add(0, "train/", loss=1.5, lr=0.1)
    writer.add(1, "epoch/", loss=1.25, train_minutes=0.5)
    writer.close()
    (init,) = calls(stand_in, "init")
    run_id = init["kwargs"]["id"]
    assert {k: init["kwargs"][k] for k in ("project", "name", "resume", "dir")} == {
        "project": "proj", "name": "run1", "resume": "allow", "dir": str(tmp_path)}
    assert init["kwargs"]["config"]["dataset"] == "demo"
    assert json.loads((tmp_path / WANDB_RUN).read_text()) == {"id": run_id}
    assert [(c["step"], c["data"]) for c in calls(stand_in, "log")] == [
        (0, {"train/loss": 1.5, "train/lr": 0.1}),
        (1, {"epoch/loss": 1.25, "epoch/train_minutes": 0.5})]
    assert len(calls(stand_in, "finish")) == 1

    ScalarWriter(run, True, purge_step=7).close()  # resumed
    assert calls(stand_in, "init")[-1]["kwargs"]["id"] == run_id
    ScalarWriter(run, True, purge_step=0).close()  # afresh
    assert calls(stand_in, "init")[-1]["kwargs"]["id"] != run_id
    ScalarWriter(run, False, purge_step=7).close()  # rank 1
    ScalarWriter(writer_run(tmp_path), True, purge_step=7).close()  # not asked for
    assert len(calls(stand_in, "init")) == 3


def test_without_wandb_one_info_line_and_tensorboard_alone(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    setup_logging(str(tmp_path), 0)
    writer = ScalarWriter(writer_run(tmp_path, "--wandb_project", "proj"), True, purge_step=0)
    writer.add(0, "train/", loss=1.0)
    writer.close()
    for handler in logger.get_logger().handlers:
        handler.flush()
    lines = (tmp_path / "out.log").read_text().splitlines()
    assert len([line for line in lines if "wandb is not installed" in line]) == 1
    assert writer.wandb is None and list((tmp_path / "tb").iterdir())
    assert not (tmp_path / WANDB_RUN).exists()


def test_a_wandb_that_does_not_start_leaves_tensorboard(stand_in, tmp_path, monkeypatch):
    import wandb

    def offline(**kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(wandb, "init", offline)
    setup_logging(str(tmp_path), 0)
    writer = ScalarWriter(writer_run(tmp_path, "--wandb_project", "proj"), True, purge_step=0)
    writer.add(0, "train/", loss=1.0)
    writer.close()
    assert writer.wandb is None and "did not start (ConnectionError" in (
        tmp_path / "out.log").read_text()


def tensorboard_tags(dump):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(dump / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {(tag, e.step) for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def test_resa_cifar_command_runs_and_resumes_its_wandb_run(tmp_path):
    """`main.py --dataset cifar100 --wandb_project resa_cifar --env_name resa_cifar` on
    a tiny stand-in of CIFAR-100, offline: the W&B run gets what TensorBoard gets
    (loss, lr, momentum, monitor scores, train minutes) and a restart continues it."""
    data, dump = tmp_path / "data", tmp_path / "run"
    make_fake_cifar100(data)
    record = tmp_path / "wandb_calls.jsonl"
    flags = ["--dataset", "cifar100", "--wandb_project", "resa_cifar", "--env_name",
             "resa_cifar", "--data_path", data, "--dump_path", dump, "--size_dataset", 16,
             "--batch_size", 8, "--mlp_dim", 64, "--emb", 32, "--workers", 0, "--seed", 0,
             "--warmup_epochs", 1, "--eval_every", 1, "--nb_knn", 5,
             "--stem", "imagenet"]  # 6x cheaper than CIFAR's (tested in test_resa.py)
    env = {"PYTHONPATH": os.pathsep.join([str(STAND_INS), os.environ.get("PYTHONPATH", "")]),
           "WANDB_STAND_IN_LOG": str(record), "WANDB_MODE": "offline"}
    first = run_script("tests/offline_run.py", "main.py", *flags, "--epochs", 1, env=env)
    assert_ok(first)
    assert "16 training images" in first.stdout
    again = run_script("tests/offline_run.py", "main.py", *flags, "--epochs", 2, env=env)
    assert_ok(again)
    assert "resumed from" in again.stdout

    inits = calls(record, "init")
    assert len(inits) == 2 and inits[0]["mode"] == "offline"
    assert inits[0]["kwargs"]["id"] == inits[1]["kwargs"]["id"]  # the same W&B run
    assert {(k, inits[0]["kwargs"][k]) for k in ("project", "name", "resume")} == {
        ("project", "resa_cifar"), ("name", "resa_cifar"), ("resume", "allow")}
    logged = {(key, c["step"]) for c in calls(record, "log") for key in c["data"]}
    shown = tensorboard_tags(dump)  # (TensorBoard purges, at the resume step, the epoch-end
    assert shown <= logged          # scalars of the epoch before: they share that step)
    keys = {key for key, _ in logged}
    assert keys == {tag for tag, _ in shown}
    assert {"train/loss", "train/lr", "train/ema_momentum", "epoch/loss",
            "epoch/train_minutes", "monitor/knn5_euclid_top1", "monitor/wknn5_top1",
            "monitor/linear_top1"} <= keys
    assert max(step for _, step in logged) == 4  # 2 epochs of 2 steps
    assert len(calls(record, "finish")) == 2
