"""main.py end to end: two-process torchrun with resume, non-finite stop, bad input."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import main as main_script
from args import all_flags, build_parser, get_args, pretraining
from src.errors import script_entry

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "resnet18", "--mlp_dim", "64", "--emb", "32", "--batch_size", "8",
        "--size_dataset", "32", "--warmup_epochs", "1", "--workers", "0", "--eval_every", "0",
        "--seed", "0"]


def run(*args, torchrun=False, timeout=300):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"] if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "main.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(demo_path, tmp_path, monkeypatch):
    dump = tmp_path / "run"
    common = ["--dataset", "demo", "--data_path", demo_path, "--dump_path", str(dump), *TINY]
    assert run(*common, "--epochs", "1").returncode == 0
    good = digest(dump / "checkpoint.pth.tar")
    nan = torch.tensor(float("nan"), requires_grad=True)
    monkeypatch.setattr("method.resa.resa_loss", lambda *args, **kwargs: nan * 1)
    with pytest.raises(SystemExit) as exit_info:
        main_script.main([*common, "--epochs", "2"])
    assert exit_info.value.code == 1
    assert digest(dump / "checkpoint.pth.tar") == good
    log = (dump / "out.log").read_text()
    assert "loss is nan at epoch 2" in log and "last good checkpoint" in log


def one_line_error(argv, capsys):
    """main.py's exit code 2 and its one line on stderr, run in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main_script.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    return lines[0]


def test_bad_data_and_dump_paths(demo_path, tmp_path, capsys):
    dump = tmp_path / "never"
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "noimg"
    (no_images / "train" / "class_a").mkdir(parents=True)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {
        "no data path": [],
        "missing": ["--data_path", str(tmp_path / "missing")],
        "empty": ["--data_path", str(empty)],
        "no images": ["--data_path", str(no_images)],
        "batch > data": ["--dataset", "demo", "--data_path", demo_path, "--size_dataset", "10",
                         "--batch_size", "64"],
        "warmup > epochs": ["--dataset", "demo", "--data_path", demo_path, "--epochs", "2",
                            "--warmup_epochs", "5"],
    }
    for name, flags in cases.items():
        message = one_line_error([*flags, "--arch", "resnet18", "--dump_path", str(dump)],
                                 capsys)
        assert not dump.exists(), name
        assert name != "batch > data" or "larger than the 10 training samples" in message
    message = one_line_error(["--dataset", "demo", "--data_path", demo_path, "--arch",
                              "resnet18", "--size_dataset", "64", "--batch_size", "8",
                              "--dump_path",
                              str(a_file / "sub")], capsys)
    assert "--dump_path" in message


@pytest.mark.parametrize("flags,expected", [
    (["--crops_nmb", "1", "2", "--crops_size", "32"], "equal lengths"),
    (["--arch", "resnet999"], "invalid choice"),
    (["--dataset", "imagenet2"], "invalid choice"),
    (["--train_files", "list.txt"], "--train_percent"),
    (["--crops_min_scale", "0.9", "--crops_max_scale", "0.5"], "crop scales"),
])
def test_conflicting_flags_one_line(flags, expected, capsys):
    argv = ["--dataset", "demo", *flags] if "--dataset" not in flags else flags
    configs = script_entry(lambda: pretraining(get_args(argv)))  # main.py's first step
    with pytest.raises(SystemExit) as exit_info:
        configs()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]


def test_precision_defaults_per_script_and_dataset(monkeypatch):
    """The authors' choices: fp16 autocast for ImageNet-style pretraining on CUDA, fp32
    for the CIFAR recipe and for both evaluations (eval_linear has no autocast)."""
    from src.train.optim import AmpOptimizer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    expected = {("main", "imagenet"): "fp16", ("main", "demo"): "fp16",
                ("main", "cifar10"): "fp32", ("main", "cifar100"): "fp32",
                ("main", "stl10"): "fp32",
                ("eval_linear", "imagenet"): "fp32", ("eval_knn", "imagenet"): "fp32"}
    for (script, dataset), precision in expected.items():
        args = get_args(["--dataset", dataset], script)
        assert args.precision == precision, (script, dataset)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        dtype = AmpOptimizer(optimizer, torch.device("cuda"), args.precision).dtype
        assert dtype == (torch.float16 if precision == "fp16" else None)
    assert get_args(["--precision", "bf16"], "eval_linear").precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_args([]).precision == "fp32"  # CPU


def test_fp16_without_cuda_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        get_args(["--precision", "fp16"])
    assert exit_info.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_authors_flags_parse_unchanged():
    args = get_args(["--epoch", "200", "--data_path", "X", "--dump_path", "Y",
                     "--warmup_epochs", "10", "--lr", "0.4", "--batch_size", "256"])
    assert (args.epochs, args.warmup_epochs, args.lr, args.arch) == (200, 10, 0.4, "resnet50")
    assert (args.optimizer, args.wd, args.temperature, args.momentum) == ("sgd", 1e-5, 0.4, 0.996)
    # the parser alone never needs the data: a model can be built from bare flags
    assert get_args(["--arch", "resnet18"]).data_path is None
    cifar = get_args(["--dataset", "cifar10", "--dump_path", "Y"])
    assert (cifar.arch, cifar.epochs, cifar.lr, cifar.wd, cifar.crops_size) == \
        ("resnet18", 1000, 0.3, 1e-4, [32])


def test_help_documents_every_flag_own_flags_first(capsys):
    import eval_knn
    import eval_linear
    from flags import FLAGS, SCRIPTS
    from method import METHODS
    result = subprocess.run([sys.executable, "main.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "pretraining" in result.stdout
    scripts = {"main": main_script.main, "eval_linear": eval_linear.main,
               "eval_knn": eval_knn.main}
    assert set(scripts) == set(SCRIPTS) - {"clusters"}  # eval_clusters.py: its own test
    for script, entry in scripts.items():
        with pytest.raises(SystemExit) as exit_info:
            entry(["--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        options = text[text.index("options:"):]
        others = options.index(f"accepted for compatibility, not read by {script}.py")
        for method in METHODS.values():  # one group per method, among main.py's own
            title = options.find(f"\n{method.__name__} (--method ")
            assert (-1 < title < others) == (script == "main"), (script, method)
        for _, readers, names, kwargs in all_flags()[0]:
            if not names:  # a method group without flags of its own
                continue
            assert kwargs["help"], names
            place = re.search(rf"\n  {re.escape(names[0])}[ ,\n]", options).start()
            assert (place < others) == (script in readers), (script, names)
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in result.stdout
    ignored = [kw["help"] for _, readers, names, kw in FLAGS if names[0] in ("--world_size",
                                                                             "--rank")]
    assert all(h.startswith("ignored:") for h in ignored) and len(ignored) == 2


def test_readme_flag_table_is_current():
    """The README's table is what tools/flags_table.py prints from the parser."""
    table = subprocess.run([sys.executable, "tools/flags_table.py"], cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=True).stdout
    assert table.strip() and table.strip() in (REPO / "README.md").read_text()
    assert "1% or 10% subset" in table and "%%" not in table  # argparse's escape undone


def test_quickstart_runs(demo_path, tmp_path):
    """The README's quick-start command end to end (1 epoch each)."""
    result = subprocess.run(
        [sys.executable, "tools/quickstart.py", "--epochs", "1", "--linear_epochs", "1",
         "--workers", "0", "--tsne_samples", "30", "--data_path", demo_path,
         "--out", str(tmp_path / "qs")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("encoder ")):]
    assert table[1].startswith("random init") and table[2].startswith("ReSA, 1 epochs")
    assert all(0 <= float(x) <= 100 for row in table[1:3] for x in row.split()[-3:])
    clustering = lines[next(i for i, line in enumerate(lines) if line.startswith("features ")):]
    scores = json.loads((tmp_path / "qs" / "clusters" / "clustering.json").read_text())
    for row, name in zip(clustering[1:4], ("random_encoding", "encoding", "embedding")):
        assert float(row.split()[-2]) == pytest.approx(scores[name]["silhouette_mean"], abs=1e-3)
        assert float(row.split()[-1]) == pytest.approx(scores[name]["ari"], abs=1e-3)
    with Image.open(tmp_path / "qs" / "clusters" / "tsne.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 2 * picture.size[1]  # 3 panels


def readme_commands():
    """(script, flags, processes) of every `torchrun ... SCRIPT.py ...` README line."""
    for line in (REPO / "README.md").read_text().splitlines():
        words = line.split()
        index = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        if words[:1] == ["torchrun"] and index is not None:
            launcher = dict(w.split("=") for w in words[1:index] if "=" in w)
            processes = int(launcher["--nproc_per_node"]) * int(launcher.get("--nnodes", 1))
            script = Path(words[index]).stem
            yield {"eval_clusters": "clusters"}.get(script, script), words[index + 1:], processes


def test_readme_quotes_the_authors_recipes():
    """batch 256 = 1 GPU; batch 1024 = 4 GPUs with 10 warm-up epochs; --lr 0.4 only with
    800 epochs; the linear probe uses --lr_classifier 10 after a batch-256 pretraining;
    the low-shot command is the authors', `--scheduler cos` included."""
    commands = list(readme_commands())
    assert len(commands) >= 10
    finetune = False
    from eval_clusters import OWN_FLAGS
    for script, flags, nproc in commands:
        args = get_args(flags, script, OWN_FLAGS if script == "clusters" else ())  # parses
        if script == "main" and args.dataset == "imagenet":
            total = args.batch_size * nproc
            assert (args.warmup_epochs == 10) == (total == 1024), flags
            assert (args.lr == 0.4) == (args.epochs == 800), flags
        if script == "eval_linear" and args.weights == "freeze":
            expected = 10.0 if "bs256" in args.pretrained else 40.0
            assert args.lr_classifier == expected, flags
        if script == "eval_linear" and args.weights == "finetune":  # their low-shot command
            assert flags[:8] == ["--epochs", "20", "--scheduler", "cos", "--weights",
                                 "finetune", "--train_percent", "1"], flags
            finetune = True
    assert finetune
