"""Linear probe, fine-tuning and the ImageNet subsets (SPEC §5)."""
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision import datasets

import args as cli
import eval_linear
from args import get_args
from helpers_eval import (REPO, assert_ok, assert_usage_error, fast_flags, make_image_folder,
                          resnet, run_script, torchrun)
from src.config import Probe
from src.data import subsets
from src.data.subsets import parse_subset, select_subset, shipped_subset, subset_names
from src.distributed import init_distributed
from src.errors import UsageError
from src.eval.linear import (Classifier, changed_tensors, probe_optimizer, resumed_reference,
                             snapshot)

pytestmark = pytest.mark.usefixtures("one_thread")

SUMMARY = re.compile(r"best top-1 ([\d.]+) top-5 ([\d.]+) \(epoch (\d+)\); "
                     r"last top-1 ([\d.]+) top-5 ([\d.]+)")


def encoder_part(state_dict):
    return {k[len("module.encoder."):]: v for k, v in state_dict.items()
            if k.startswith("module.encoder.")}


# ------------------------------------------------------------------ end to end

def test_linear_probe_keeps_the_encoder_and_resumes(image_folder, resnet18_file, tmp_path):
    dump = tmp_path / "probe"
    flags = fast_flags(image_folder, dump, "--pretrained", resnet18_file, "--seed", 0,
                       "--lr_classifier", 10)
    result = run_script("eval_linear.py", *flags, "--epochs", 1)
    assert_ok(result)
    assert "frozen encoder verified" in result.stdout
    assert "iter 2/2" in result.stdout  # 12 images at batch 8: the last, partial batch kept
    assert SUMMARY.search((dump / "out.log").read_text())
    assert list((dump / "tb").iterdir()), "no TensorBoard events"

    checkpoint = torch.load(dump / "checkpoint.pth.tar", weights_only=True)
    best = torch.load(dump / "best.pth.tar", weights_only=True)
    assert checkpoint["epoch"] == best["epoch"] == 1
    assert all(k.startswith("module.") for k in checkpoint["state_dict"])
    pretrained = torch.load(resnet18_file, weights_only=True)
    encoder = encoder_part(checkpoint["state_dict"])
    assert set(encoder) == set(pretrained)
    assert all(torch.equal(encoder[k], v) for k, v in pretrained.items())  # buffers too
    assert checkpoint["state_dict"]["module.fc.weight"].shape == (1000, 512)
    assert len(checkpoint["optimizer"]["param_groups"]) == 1  # the head only
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(10 * 8 / 256)
    assert isinstance(checkpoint["best_acc"], float) and 0 <= checkpoint["best_acc"] <= 100
    assert "scheduler" in checkpoint

    again = run_script("eval_linear.py", *flags, "--epochs", 2)
    assert_ok(again)
    assert "resumed from" in again.stdout and "at epoch 2, iteration 0" in again.stdout
    assert "epoch 1/2 iter" not in again.stdout
    checkpoint = torch.load(dump / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert all(torch.equal(encoder_part(checkpoint["state_dict"])[k], v)
               for k, v in pretrained.items())
    summary = SUMMARY.findall(again.stdout)
    assert len(summary) == 1
    assert float(summary[0][3]) == pytest.approx(checkpoint["last_acc"], abs=0.005)
    saved = json.loads((dump / "linear_results.json").read_text())
    assert saved["last_acc"] == checkpoint["last_acc"] and saved["best_epoch"] in (1, 2)


def test_finetune_low_shot_trains_everything(resnet18_file, tmp_path):
    # The authors' low-shot command on a tiny tree: 1% subset from --train_files.
    data = make_image_folder(tmp_path / "data", per_class=6)
    names = [f"{c}_{i}.JPEG" for c in ("n01000001", "n01000002") for i in range(4)]
    (tmp_path / "1percent.txt").write_text("\n".join(names) + "\n")
    dump = tmp_path / "finetune"
    result = run_script("eval_linear.py", *fast_flags(
        data, dump, "--pretrained", resnet18_file, "--epochs", 1, "--lr_classifier", 40,
        "--lr_encoder", 0.0002, "--weights", "finetune", "--train_percent", 1,
        "--train_files", tmp_path / "1percent.txt", "--scheduler", "cos"))
    assert_ok(result)
    assert "1% subset: 8 images" in result.stdout
    assert "frozen encoder verified" not in result.stdout
    checkpoint = torch.load(dump / "checkpoint.pth.tar", weights_only=True)
    groups = checkpoint["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["classifier", "encoder"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([40 * 8 / 256, 2e-4 * 8 / 256])
    assert [g["lr"] for g in groups] == pytest.approx([0, 0], abs=1e-12)  # cosine over 1 epoch
    pretrained = torch.load(resnet18_file, weights_only=True)
    encoder = encoder_part(checkpoint["state_dict"])
    assert not torch.equal(encoder["conv1.weight"], pretrained["conv1.weight"])
    assert not torch.equal(encoder["bn1.running_mean"], pretrained["bn1.running_mean"])
    assert SUMMARY.search(result.stdout)


def test_torchrun_linear_probe(image_folder, resnet18_file, tmp_path):
    dump = tmp_path / "ddp"
    result = run_script("eval_linear.py", *fast_flags(
        image_folder, dump, "--pretrained", resnet18_file, "--epochs", 1, "--batch_size", 4),
        launcher=torchrun(2))
    assert_ok(result)
    assert "2 process(es)" in result.stdout and "frozen encoder verified" in result.stdout
    checkpoint = torch.load(dump / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(40 * 8 / 256)


def test_a_moving_encoder_fails_the_frozen_check(image_folder, tmp_path, monkeypatch, capsys):
    # Sabotage: let the encoder's batch norm train; the run must end with an error.
    monkeypatch.setattr(Classifier, "train", nn.Module.train)
    config = cli.probe(get_args(fast_flags(image_folder, tmp_path / "out", "--epochs", 1),
                                "eval_linear"))
    with pytest.raises(SystemExit) as stop:
        eval_linear.linear_eval(config, init_distributed(config.run))
    assert "frozen encoder changed" in str(stop.value.code)
    assert "running_mean" in str(stop.value.code)


# ------------------------------------------------------------------ pieces

def test_frozen_classifier_stays_in_eval_mode_and_has_a_zero_bias_head():
    torch.manual_seed(0)
    encoder, dim = resnet("resnet18", "cifar")
    model = Classifier(encoder, dim, 10, frozen=True).train()
    assert model.fc.training and not any(m.training for m in model.encoder.modules())
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert torch.equal(model.fc.bias, torch.zeros(10))
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)
    reference = snapshot(model.encoder)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert changed_tensors(model.encoder, reference) == []
    model.encoder.bn1.running_mean += 1
    assert changed_tensors(model.encoder, reference) == ["bn1.running_mean"]


def test_a_resumed_frozen_encoder_must_be_the_pretrained_one():
    encoder, _ = resnet("resnet18", "cifar")
    loaded = snapshot(encoder)
    assert resumed_reference(encoder, loaded, "w.pth", "c") is loaded
    encoder.conv1.weight.data += 1  # as if the dump folder held another run's checkpoint
    with pytest.raises(UsageError, match="holds another encoder than --pretrained w.pth"):
        resumed_reference(encoder, loaded, "w.pth", "c")
    random = resumed_reference(encoder, loaded, "", "c")
    assert changed_tensors(encoder, random) == []  # a random encoder: the resumed one counts


@pytest.mark.parametrize("scheduler, factors", [("step", {59: 1, 60: 0.1, 80: 0.01}),
                                                ("cos", {50: 0.5, 100: 0.0})])
def test_learning_rate_scaling_and_schedules(scheduler, factors):
    probe = Probe(lr_classifier=40.0, lr_encoder=2e-4, scheduler=scheduler, epochs=100)
    encoder, dim = resnet("resnet18", "cifar")
    model = Classifier(encoder, dim, 10, frozen=False)
    optimizer, schedule = probe_optimizer(model, probe, total_batch=64 * 2, fused=False)
    base = [40 * 128 / 256, 2e-4 * 128 / 256]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(base)
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 0 for g in optimizer.param_groups)
    for epoch in range(1, 101):
        optimizer.step()  # no gradients: only keeps the scheduler's call order
        schedule.step()
        if epoch in factors:
            assert [g["lr"] for g in optimizer.param_groups] == \
                pytest.approx([b * factors[epoch] for b in base], abs=1e-12)


def test_bad_subset_names_and_small_num_classes(image_folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("n01000001_0.JPEG\nn01000001_77.JPEG\nn03333333_5.JPEG\n")
    result = run_script("eval_linear.py", *fast_flags(
        image_folder, tmp_path / "out", "--train_percent", 10, "--train_files", listing))
    assert_usage_error(result, "2 of the 3 subset images", "n01000001_77.JPEG",
                       "n03333333_5.JPEG")
    result = run_script("eval_linear.py", *fast_flags(image_folder, tmp_path / "out",
                                                      "--num_classes", 1))
    assert_usage_error(result, "--num_classes 1")


# ------------------------------------------------------------------ subsets

def synthetic_subset(classes=1000, per_class=13, seed=0):
    """Names shaped like the public lists (`n01440764_10026.JPEG`), `per_class` per class."""
    rng = np.random.default_rng(seed)
    wnids = sorted({f"n{rng.integers(1_000_000, 10_000_000):08d}" for _ in range(classes * 2)})
    return [f"{w}_{i}.JPEG" for w in wnids[:classes]
            for i in rng.choice(1_300, per_class, replace=False)]


@pytest.mark.parametrize("percent, count", [(1, 12_811), (10, 128_116)])
def test_the_shipped_lists_are_the_public_ones(percent, count):
    """The authors' src/imagenet_subset/ lists, shipped here in src/data/imagenet_subset/:
    --train_percent reads them with no --train_files and no network; they are
    committed, not ignored."""
    path = shipped_subset(percent)
    assert path.parent == REPO / "src" / "data" / "imagenet_subset"
    names = subset_names(percent)
    assert names == subsets.read_subset(path)
    assert len(names) == len(set(names)) == count
    assert len({subsets.subset_class(n) for n in names}) == 1000
    assert "n01440764" in {subsets.subset_class(n) for n in names}
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 1, f"{path} is ignored by git"


def test_selection_on_a_real_folder_tree(tmp_path):
    names = synthetic_subset(classes=5, per_class=4)
    classes = sorted({subsets.subset_class(n) for n in names})[:3]
    chosen = [n for n in names if subsets.subset_class(n) in classes]
    for name in chosen + [f"{c}_999999.JPEG" for c in classes]:  # plus images not in the list
        path = tmp_path / "train" / subsets.subset_class(name) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    folder = datasets.ImageFolder(tmp_path / "train", allow_empty=True,
                                  is_valid_file=lambda p: p.endswith(".JPEG"))
    select_subset(folder, chosen)
    assert sorted(Path(p).name for p, _ in folder.samples) == sorted(chosen)
    assert folder.targets == [folder.class_to_idx[Path(p).parent.name] for p, _ in folder.samples]
    assert folder.imgs == folder.samples


def selection_at_scale(names):
    classes = sorted({subsets.subset_class(n) for n in names})
    index = {c: i for i, c in enumerate(classes)}
    samples = sorted([(f"/train/{subsets.subset_class(n)}/{n}", index[subsets.subset_class(n)])
                      for n in names] + [(f"/train/{c}/{c}_0x.JPEG", i) for c, i in index.items()])
    fake = SimpleNamespace(samples=samples, targets=[t for _, t in samples])
    select_subset(fake, names)
    assert len(fake.samples) == len(names) and len(set(fake.targets)) == len(classes)
    with pytest.raises(UsageError, match=f"1 of the {len(names) + 1} subset images.*"
                                         f"n99999999_1.JPEG"):
        select_subset(fake, names + ["n99999999_1.JPEG"])


def test_selection_of_a_list_the_size_of_the_10_percent_list():
    names = synthetic_subset(per_class=128)
    assert len(names) == 128_000
    selection_at_scale(names)


def test_selection_of_the_full_10_percent_list():
    names = subsets.read_subset(shipped_subset(10))
    assert len(names) == 128_116 and len({subsets.subset_class(n) for n in names}) == 1000
    selection_at_scale(names)


def test_parse_rejects_what_is_not_a_list():
    assert parse_subset("\n n01_1.JPEG \n\nn02_2.JPEG\n", "x") == ["n01_1.JPEG", "n02_2.JPEG"]
    with pytest.raises(UsageError, match="not a subset list"):
        parse_subset("<html><body>404</body></html>", "x")
    with pytest.raises(UsageError, match="empty"):
        parse_subset("\n", "x")


def test_train_percent_1_needs_no_network_and_no_train_files(tmp_path):
    """`eval_linear.py --train_percent 1` on a folder that holds the 1% list's 12,811
    file names (hard links of one tiny JPEG), with no way to the network: it selects
    the shipped list's images and starts training (stopped there: a whole epoch of
    12,811 images would take a minute here)."""
    names = subset_names(1)
    image = tmp_path / "one.JPEG"
    make_image_folder(tmp_path / "seed", per_class=1, size=8, val_copy=False)
    os.link(next((tmp_path / "seed" / "train").rglob("*.JPEG")), image)
    for split, chosen in (("train", names), ("val", {n.split("_")[0]: n for n in names}.values())):
        for name in chosen:
            folder = tmp_path / "data" / split / subsets.subset_class(name)
            folder.mkdir(parents=True, exist_ok=True)
            os.link(image, folder / name)
    command = [sys.executable, "tests/offline_run.py", "eval_linear.py", *fast_flags(
        tmp_path / "data", tmp_path / "out", "--train_percent", 1, "--crops_size", 8,
        "--epochs", 1)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    watchdog = threading.Timer(240, process.kill)
    watchdog.start()
    output = []
    try:
        for line in process.stdout:
            output.append(line)
            if "epoch 1/1 iter 1/" in line or "Traceback" in line:
                break
    finally:
        process.kill()
        process.wait()
        watchdog.cancel()
    text = "".join(output)
    assert "training on the 1% subset: 12811 images" in text, text[-3000:]
    assert "epoch 1/1 iter 1/1602" in text  # 12,811 images at batch 8, the last one partial


def test_train_files_that_do_not_exist(tmp_path):
    with pytest.raises(UsageError, match="--train_files .* does not exist"):
        subset_names(1, str(tmp_path / "missing.txt"))
