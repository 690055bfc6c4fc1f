"""BYOL, SwAV and SimCLR through the scripts: the registry and --help, two gloo ranks
against one at the main.py level, every evaluation on each method's checkpoint and
encoder.pth, and tools/compare_methods.py (the kill tests: test_fault_tolerance.py)."""
import json
import logging

import pytest
import torch

import eval_clusters
import eval_knn
import eval_linear
import main as main_script
from helpers_eval import REPO, fast_flags
from helpers_run import launch
from method import METHODS
from src.logger import LOGGER_NAME
from test_fault_tolerance import losses, tensors
from tools import compare_methods

BASELINES = ("byol", "swav", "simclr")
GLOBAL_BN = "tests/global_bn_run.py"  # batch norm over every rank's samples, as on GPUs


def test_the_registry_lists_the_four_methods_and_help_shows_their_groups(capsys):
    assert list(METHODS) == ["resa", "byol", "swav", "simclr"]
    with pytest.raises(SystemExit) as done:
        main_script.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--method {resa,byol,swav,simclr}" in text
    titles = {"resa": "ReSA", "byol": "BYOL", "swav": "SwAV", "simclr": "SimCLR"}
    groups = {name: text.index(f"\n{titles[name]} (--method {name}):") for name in METHODS}
    assert list(groups) == sorted(groups, key=groups.get)  # in the registry's order
    ends = [*list(groups.values())[1:], text.index("\narchitecture:")]
    for (name, start), end in zip(groups.items(), ends):
        group = text[start:end]
        for hyper in METHODS[name].HYPER:  # its own flag, or the note that it reads one
            assert f"\n  --{hyper.name} " in group or f"reads --{hyper.name} " in group, \
                (name, hyper.name)
    assert "--nmb_prototypes" in text[groups["swav"]:groups["simclr"]]


def relative_differences(dump, reference):
    """{name: ‖a − b‖ / ‖b‖} of the final weights and buffers of two runs (tensors of
    norm under 1e-3, such as biases that hardly moved from 0, left out)."""
    got, expected = [tensors(torch.load(d / "checkpoint.pth.tar", weights_only=True)
                             ["state_dict"]) for d in (dump, reference)]
    assert set(got) == set(expected) and len(expected) > 100
    return {k: ((got[k].double() - v.double()).norm() / v.double().norm()).item()
            for k, v in expected.items() if v.is_floating_point() and v.norm() > 1e-3}


@pytest.mark.parametrize("method", ["swav", "simclr"])
def test_two_gloo_ranks_train_as_one_rank(method, demo_path, tmp_path):
    """The two baselines whose loss couples the ranks (SwAV's Sinkhorn sums, SimCLR's
    gathered negatives; BYOL's loss is per sample, and test_methods.py checks all
    three losses on two ranks): main.py on 2 processes of 4 samples against 1 process of 8, both with batch norm
    over the whole batch (GLOBAL_BN: SyncBatchNorm's rule, which main.py applies on
    GPUs only): the same loss before and after an SGD step, up to float rounding
    (per-process batch norm alone changes the first by percents), and the same weights
    within 2% (the gradients agree to 1e-5, and batch norm over 4 to 8 values amplifies
    that in a step: up to 0.5% seen). SwAV's prototypes learn from the first step."""
    flags = ["--method", method, "--epochs", "1", "--size_dataset", "16", "--warmup_epochs",
             "0", "--workers", "0",
             *(["--freeze_prototypes_epochs", "0"] if method == "swav" else [])]
    for processes in (1, 2):
        code, output = launch(tmp_path / str(processes), demo_path, *flags,
                              processes=processes, wrapper=GLOBAL_BN)
        assert code == 0, output[-3000:]
    assert "2 process(es)" in (tmp_path / "2" / "out.log").read_text()
    one, two = losses(tmp_path / "1"), losses(tmp_path / "2")
    assert [s for s, _ in one] == [s for s, _ in two] == [0, 1]
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)
    differences = relative_differences(tmp_path / "2", tmp_path / "1")
    worst = max(differences, key=differences.get)
    assert differences[worst] < 2e-2, (worst, differences[worst])


def run_here(entry, *argv):
    """A script's main(argv) in this process (faster than a subprocess): its exit code,
    its log files closed after."""
    logger = logging.getLogger(LOGGER_NAME)
    handlers = list(logger.handlers)
    try:
        entry([str(a) for a in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    for handler in logger.handlers[len(handlers):]:
        handler.close()
    logger.handlers[:] = handlers
    return code


def results(dump, name):
    return json.loads((dump / name).read_text())


def test_every_evaluation_reads_each_methods_checkpoint_and_encoder(method_run, image_folder,
                                                                    tmp_path, one_thread):
    """eval_knn, eval_linear (probe and fine-tuning), eval_clusters (H and Z) and the
    hub entry point on each baseline's checkpoint.pth.tar and encoder.pth: both files
    give the evaluated encoder (BYOL's online one, as its authors evaluate) and the same
    scores of the encoding H; the checkpoint also gives Z."""
    for method in BASELINES:
        run = method_run(method)
        checkpoint, export = run / "checkpoint.pth.tar", run / "encoder.pth"
        saved = torch.load(checkpoint, weights_only=True)
        assert saved["args"]["method"] == method and saved["evaluated_encoder"] == "encoder."
        online = {k.removeprefix("module.encoder."): v for k, v in saved["state_dict"].items()
                  if k.startswith("module.encoder.")}
        exported = torch.load(export, weights_only=True)
        assert exported.keys() == online.keys()
        assert all(torch.equal(exported[k], v) for k, v in online.items())
        hub = torch.hub.load(str(REPO), "resnet18", source="local", weights=str(checkpoint))
        assert all(torch.equal(hub.state_dict()[k], v) for k, v in exported.items())

        out = tmp_path / method
        assert run_here(eval_knn.main, *fast_flags(image_folder, out / "knn", "--pretrained",
                                                   checkpoint, "--nb_knn", 5)) == 0
        assert results(out / "knn", "knn_results.json")["5"]["top1"] >= 0
        measured = {}
        for name, path in (("checkpoint", checkpoint), ("export", export)):
            assert run_here(eval_clusters.main, *fast_flags(
                image_folder, out / name, "--pretrained", path, "--tsne_samples", 0)) == 0
            measured[name] = results(out / name, "clustering.json")
        assert set(measured["checkpoint"]) == {"encoding", "projector_hidden1", "embedding",
                                               "meta"}
        assert set(measured["export"]) == {"encoding", "meta"}  # the same encoder:
        assert measured["checkpoint"]["encoding"] == measured["export"]["encoding"]
        for mode, path in (("freeze", checkpoint), ("finetune", export)):
            linear = out / mode
            assert run_here(eval_linear.main, *fast_flags(
                image_folder, linear, "--pretrained", path, "--weights", mode,
                "--epochs", 1, "--lr_classifier", 0.1)) == 0
            assert results(linear, "linear_results.json")["last_acc"] >= 0


def test_compare_methods_tabulates_and_draws_two_runs(method_run, image_folder, tmp_path,
                                                      capsys):
    """tools/compare_methods.py on two tiny checkpoints: the table and the JSON hold
    the scores the scripts wrote, the figure is a PNG, and a second call reuses them."""
    runs = [f"{name}={method_run(name)}" for name in ("byol", "simclr")]
    shared = fast_flags(image_folder, "unused", "--nb_knn", 5)
    at = shared.index("--dump_path")
    del shared[at:at + 2]  # the tool gives each script its own
    flags = ["--runs", *runs, "--out", str(tmp_path), "--knn_k", "5",
             "--linear_flags=--epochs 1 --lr_classifier 0.1",
             "--clusters_flags=--features encoding embedding --tsne_samples 0", "--", *shared]
    compare_methods.main(flags)
    assert capsys.readouterr().out.count("\n$ python eval_") == 6  # 3 scripts x 2 runs
    rows = results(tmp_path, "results.json")["runs"]
    assert list(rows) == ["byol", "simclr"]
    for name, row in rows.items():
        knn = results(tmp_path / name / "knn", "knn_results.json")
        clusters = results(tmp_path / name / "clusters", "clustering.json")
        linear = results(tmp_path / name / "linear", "linear_results.json")
        assert row["knn_top1_k5"] == knn["5"]["top1"]
        assert row["linear_top1"] == linear["last_acc"]
        assert (row["silhouette_mean_H"], row["silhouette_std_Z"], row["ari_Z"]) == (
            clusters["encoding"]["silhouette_mean"], clusters["embedding"]["silhouette_std"],
            clusters["embedding"]["ari"])
    table = (tmp_path / "table.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| byol | ")
    assert f"{rows['simclr']['ari_H']:.3f}" in table[3]
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compare_methods.main(flags)
    assert "$ python" not in capsys.readouterr().out  # every result reused
    flags[flags.index("--knn_k") + 1] = "7"  # a k that the k-NN did not compute
    with pytest.raises(SystemExit) as refused:
        compare_methods.main(flags)
    assert refused.value.code == 2 and "--knn_k 7 is not among" in capsys.readouterr().err


def test_compare_methods_refuses_bad_runs_in_one_line(tmp_path, capsys):
    for spec, needle in (("byol", "expected NAME=PATH"), (f"a={tmp_path}", "no checkpoint at")):
        with pytest.raises(SystemExit) as refused:
            compare_methods.parse_args(["--runs", spec, "--out", str(tmp_path)])
        assert refused.value.code == 2 and needle in capsys.readouterr().err
