"""Shared pieces of the evaluation tests: tiny generated ImageFolders, checkpoints,
and a runner that starts the scripts the way users do (a subprocess in the repo)."""
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("n01000001", "n01000002")


def make_image_folder(root, per_class=6, classes=CLASSES, size=40, seed=0, val_copy=True):
    """root/train/<class>/<class>_<i>.JPEG noise images; val/ is a copy of train/ when
    `val_copy` (so every val image has an identical training image)."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        folder = Path(root) / "train" / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{cls}_{i}.JPEG", quality=95)
    if val_copy:
        shutil.copytree(Path(root) / "train", Path(root) / "val")
    return Path(root)


def fast_flags(data, dump, *extra):
    """The flags of a seconds-long run on a tiny ImageFolder."""
    return ["--dataset", "imagenet", "--data_path", str(data), "--crops_size", "32",
            "--arch", "resnet18", "--batch_size", "8", "--workers", "0",
            "--dump_path", str(dump), *map(str, extra)]


def run_script(script, *args, launcher=(sys.executable,), timeout=300, env=None):
    """Run `launcher script args` from the repo root, with the variables `env` added to
    the environment; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([*launcher, script, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def torchrun(nproc):
    """A launcher like the authors' `torchrun --nproc_per_node=N --master_port=P`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return (sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={port}")


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def assert_usage_error(result, *needles):
    """Exit code 2 and exactly one line on stderr that contains every needle."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


class TensorImages(Dataset):
    """(image, label) pairs from tensors, with the `.classes`/`.targets` of a dataset."""

    def __init__(self, images, labels, num_classes):
        self.images, self.targets = images, [int(y) for y in labels]
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def resnet(arch="resnet18", stem="imagenet"):
    """(encoder, feature_dim) in torchvision's default initialisation, the one the
    evaluations load weights into."""
    from src.config import Encoder
    from src.models import build_encoder
    return build_encoder(Encoder(arch, stem, zero_init_residual=False))


def small_encoder():
    """A few-layer CNN with batch norm; seed before calling for identical weights."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def extraction_worker(rank, world_size, init_file, out_dir, dataset, batch_size, ks):
    """One of `world_size` gloo processes: extract the bank and run the sharded k-NN."""
    from src.eval.features import Extraction, extract_features
    from src.eval.knn import Bank, knn_eval
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        torch.manual_seed(0)
        encoder = small_encoder().train()
        bank, labels = extract_features(encoder, dataset, Extraction(batch_size, normalize=True),
                                        torch.device("cpu"))
        results = knn_eval(Bank(bank, labels), bank, labels, ks, 0.07, len(dataset.classes))
        torch.save({"bank": bank, "labels": labels, "knn": results,
                    "training": encoder.training}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


STAND_INS = REPO / "tests" / "stand_ins"  # a `wandb` stand-in that records its calls


def make_fake_cifar100(root, train=48, test=24, classes=4, seed=0):
    """root/cifar-100-python as torchvision's CIFAR100 reads it (pickled dicts of
    uint8 rows of 3x32x32 pixels, fine and coarse labels, meta), with a few noise
    images of the first `classes` classes. Returns (train pixels, test pixels) as
    N x 32 x 32 x 3 arrays, the layout torchvision gives."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    pixels = {}
    for split, count in (("train", train), ("test", test)):
        rows = rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8)
        fine = [i % classes for i in range(count)]
        with open(folder / split, "wb") as f:
            pickle.dump({"data": rows, "fine_labels": fine,
                         "coarse_labels": [label // 2 for label in fine],
                         "filenames": [f"{split}_{i}.png" for i in range(count)],
                         "batch_label": split}, f)
        pixels[split] = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f)
    return pixels["train"], pixels["test"]


def make_fake_stl10(root, train=20, unlabeled=30, test=10, seed=0):
    """root/stl10_binary as torchvision's STL10 reads it: column-major 3x96x96 uint8
    images, 1-based uint8 labels, class_names.txt."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", train), ("unlabeled", unlabeled), ("test", test)):
        rng.integers(0, 256, count * 3 * 96 * 96, dtype=np.uint8).tofile(folder / f"{name}_X.bin")
        if name != "unlabeled":
            np.array([1 + i % 10 for i in range(count)], np.uint8).tofile(folder / f"{name}_y.bin")
    (folder / "class_names.txt").write_text("".join(f"class{i}\n" for i in range(10)))
