"""tools/fashion_mnist.py end to end on a tiny copy of Fashion-MNIST (the first 256
training and 100 test images of the Debian package): the random baseline is main.py's
own initialisation, the curve comes from main.py's monitor, the PNG, the JSON and the
tables are written, each method gets the epochs that fill the budget at its timed step,
and a second call reuses what the first left."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from src.checkpoint import load_file
from src.data import readers
from src.data.readers import FASHION_MNIST_DIR, read_idx
from tools import fashion_mnist

pytestmark = [
    pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                       reason="Debian package dataset-fashion-mnist is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

TINY = ["--size_dataset", "128", "--batch_size", "32", "--warmup_epochs", "0",
        "--eval_every", "1", "--cluster_samples", "60", "--bank_samples", "100",
        "--tsne_samples", "0", "--workers", "0"]


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion_mnist(tmp_path, monkeypatch):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix, n in (("train", 256), ("t10k", 100)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            write_idx(folder / name, read_idx(Path(FASHION_MNIST_DIR) / name)[:n])
    monkeypatch.setattr(readers, "FASHION_MNIST_DIR", str(folder))  # read before --data_path
    return folder


def test_tool_end_to_end(tiny_fashion_mnist, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    timed = []

    def half_a_second(opts, method, folder):  # makes the budget 2 epochs of 4 steps
        timed.append(method)
        return 0.5

    monkeypatch.setattr(fashion_mnist, "seconds_per_step", half_a_second)
    # --momentum 1: the EMA never moves the momentum encoder's parameters, so ReSA's final
    # checkpoint still holds the initialisation, which must be the random baseline's
    argv = ["--out", str(out), "--methods", "resa", "simclr", "--minutes", str(2 * 4 * 0.5 / 60),
            "--momentum", "1.0", *TINY]
    results = fashion_mnist.main(argv)
    printed = capsys.readouterr().out
    assert timed == ["resa", "simclr"]

    random_init = load_file(out / "random" / "init.pth.tar")["state_dict"]
    final = load_file(out / "resa" / "pretrain" / "checkpoint.pth.tar")["state_dict"]
    parameters = [k for k in final if k.startswith("module.momentum_")
                  and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert parameters and all(torch.equal(final[k], random_init[k]) for k in parameters)
    online = "module.encoder.conv1.weight"  # the online encoder did train
    assert not torch.equal(final[online], random_init[online])
    simclr = load_file(out / "simclr" / "pretrain" / "checkpoint.pth.tar")
    assert simclr["args"]["method"] == "simclr" and simclr["epoch"] == 2

    written = json.loads((out / "results.json").read_text())
    assert set(written) == {"options", "random", "methods", "clusters", "load_average",
                            "wall_minutes", "torch_threads"}
    assert list(written["methods"]) == ["resa", "simclr"]
    for method, run in written["methods"].items():
        assert run["command"].startswith("python main.py --dataset fashion_mnist")
        assert f"--method {method} " in run["command"] and "--epochs 2 " in run["command"]
        curve = run["curve"]
        assert [p["epoch"] for p in curve] == [1, 2] and [p["step"] for p in curve] == [4, 8]
        assert 0 < curve[0]["minutes"] < curve[1]["minutes"] and run["final"] == curve[-1]
        for scores in (written["random"], *curve):
            assert {"wknn20_top1", "linear_top1", "knn5_euclid_top1", "sc_encoding",
                    "sc_embedding"} <= set(scores)
            assert all(0 <= scores[k] <= 100 for k in ("wknn20_top1", "linear_top1"))
    assert set(written["clusters"]) == {"random init", "ReSA", "SimCLR"}
    for by_feature in written["clusters"].values():
        assert set(by_feature) == {"encoding", "embedding"}
        for scores in by_feature.values():
            assert {"silhouette_mean", "ari", "nmi", "knn_top1"} <= set(scores)
    assert (out / "resa" / "clusters" / "clustering.json").is_file()
    assert not (out / "resa" / "clusters" / "tsne.png").exists()  # --tsne_samples 0
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["methods"]["resa"]["final"] == written["methods"]["resa"]["final"]

    assert "$ python main.py --dataset fashion_mnist" in printed
    assert "$ python eval_clusters.py" in printed
    rows = {l.split(" | ")[0].lstrip("| "): l for l in printed.splitlines() if l.startswith("| ")}
    assert f"| 0 | 0.0 | {written['random']['wknn20_top1']:.2f} |" in rows["random init"]
    resa = written["methods"]["resa"]["final"]
    assert f"| 2 | {resa['minutes']:.1f} | {resa['wknn20_top1']:.2f} |" in rows["ReSA"]
    assert {"SimCLR", "ReSA, Z", "random init, H", "SimCLR, H"} <= set(rows)

    # a second call reuses the baseline, the plans, the finished runs and the clustering
    again = fashion_mnist.main(argv)
    printed = capsys.readouterr().out
    assert "random baseline: reusing" in printed and "$ python eval_clusters.py" not in printed
    assert "$ python main.py" not in printed and timed == ["resa", "simclr"]
    for method, run in written["methods"].items():
        assert {k: again["methods"][method][k] for k in ("command", "epochs", "curve")} == {
            k: run[k] for k in ("command", "epochs", "curve")}
    assert again["random"] == written["random"]


def test_a_methods_step_is_timed_by_a_short_run_of_main(tiny_fashion_mnist, tmp_path):
    opts = fashion_mnist.parse([*TINY, "--timing_steps", "2"])
    seconds = fashion_mnist.seconds_per_step(opts, "byol", tmp_path / "timing")
    checkpoint = load_file(tmp_path / "timing" / "checkpoint.pth.tar")
    assert checkpoint["args"]["method"] == "byol" and checkpoint["args"]["size_dataset"] == 64
    assert checkpoint["epoch"] == 1 and checkpoint["args"]["eval_every"] == 0  # 2 steps alone
    assert seconds == checkpoint["loop"]["seconds"] / 2 > 0
