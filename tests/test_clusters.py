"""Clustering properties (SPEC §9): the metrics against hand computations, the
momentum-branch features, and eval_clusters.py end to end and on bad input."""
import json
import logging
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import args as cli
import eval_clusters as clusters
from args import get_args
from helpers_eval import (TensorImages, assert_ok, assert_usage_error, run_script,
                          torchrun)
from method import build_model
from src import config
from src.checkpoint import with_module_prefix
from src.data.demo import MARKER, generate_demo_dataset
from src.data.readers import cifar100_superclasses
from src.errors import UsageError
from src.eval.clustering import (METRICS, KnnVote, branch_features, clustering_scores,
                                 feature_names, kmeans_agreement, nearest_k, projector_features,
                                 seeded_subset, silhouette)
from src.eval.features import Extraction
from src.eval.knn import Bank
from src.eval.pictures import draw_tsne
from src.logger import LOGGER_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_PER_CLASS, VAL_PER_CLASS, CLASSES = 8, 5, 10  # the demo's 10 classes


def unit(degrees):
    angle = math.radians(degrees)
    return [math.cos(angle), math.sin(angle)]


# ----------------------------------------------------------------------------- metrics

def two_clusters(n=10, seed=0):
    """Two tight bundles of unit vectors 90 degrees apart: cosine distance ~0 within
    a class, ~1 across."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat_interleave(n)
    centers = torch.tensor([unit(0), unit(90)])
    return F.normalize(centers[labels] + 0.01 * torch.randn(2 * n, 2, generator=generator)), labels


def test_well_separated_clusters_score_one():
    features, labels = two_clusters()
    sc_mean, sc_std = silhouette(features, labels)
    assert sc_mean == pytest.approx(1.0, abs=0.02) and sc_std < 0.01
    assert kmeans_agreement(features, labels) == (pytest.approx(1.0), pytest.approx(1.0))


def test_label_permutation_leaves_ari_and_nmi_unchanged():
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(60, 5, generator=generator))
    labels = torch.randint(0, 3, (60,), generator=generator)
    permuted = torch.tensor([2, 0, 1])[labels]
    first = kmeans_agreement(features, labels)
    assert kmeans_agreement(features, permuted) == pytest.approx(first)
    assert 0 < first[1] < 1  # random labels: a real, non-trivial value


def test_silhouette_of_four_points_by_hand():
    # class A at 0 and 45 degrees, class B at 90 and 180 degrees
    angles, labels = [0, 45, 90, 180], [0, 0, 1, 1]

    def distance(i, j):  # cosine distance of unit vectors
        return 1 - math.cos(math.radians(angles[i] - angles[j]))

    def s(i):
        own = [distance(i, j) for j in range(4) if labels[j] == labels[i] and j != i]
        other = [distance(i, j) for j in range(4) if labels[j] != labels[i]]
        a, b = sum(own) / len(own), sum(other) / len(other)
        return (b - a) / max(a, b)

    by_hand = [s(i) for i in range(4)]
    assert by_hand == pytest.approx([0.80474, 0.70711, -0.35355, 0.46050], abs=1e-5)
    class_means = [(by_hand[0] + by_hand[1]) / 2, (by_hand[2] + by_hand[3]) / 2]
    features = torch.tensor([unit(a) for a in angles])
    sc_mean, sc_std = silhouette(features, torch.tensor(labels))
    assert sc_mean == pytest.approx(sum(by_hand) / 4, abs=1e-6)
    # the spread is the std of the per-class means, not of the samples
    assert sc_std == pytest.approx(abs(class_means[0] - class_means[1]) / 2, abs=1e-6)
    assert sc_std != pytest.approx(float(np.std(by_hand)), abs=1e-3)


def test_silhouette_std_of_unequal_classes_by_hand():
    features = torch.tensor([unit(a) for a in (0, 10, 20, 100, 110, 200)])
    labels = np.array([0, 0, 0, 1, 1, 2])
    from sklearn.metrics import silhouette_samples
    per_sample = silhouette_samples(features.numpy(), labels, metric="cosine")
    means = [per_sample[:3].mean(), per_sample[3:5].mean(), per_sample[5]]
    assert silhouette(features, labels) == (pytest.approx(per_sample.mean()),
                                            pytest.approx(np.std(means)))


def test_scores_hold_the_five_metrics_and_the_knn_top1_of_a_toy_bank():
    bank = torch.tensor([unit(0), unit(10), unit(90), unit(100)])
    bank_labels = torch.tensor([0, 0, 1, 1])
    # the first two are right, the last one's nearest bank rows are class 1: 2 of 3
    test = torch.tensor([unit(3), unit(97), unit(93)])
    scores = clustering_scores(test, torch.tensor([0, 1, 0]), Bank(bank, bank_labels),
                               KnnVote(k=2, temperature=0.07, num_classes=2))
    assert tuple(scores) == METRICS
    assert scores["knn_top1"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("ks, k", [([5, 10, 15, 20, 25], 20), ([5, 15, 25], 15), ([100, 10], 10)])
def test_one_knn_figure_nearest_20(ks, k):
    assert nearest_k(ks) == k


def test_seeded_subset_is_fixed_sorted_and_capped():
    first = seeded_subset(100, 10, seed=3)
    assert torch.equal(first, seeded_subset(100, 10, seed=3))
    assert not torch.equal(first, seeded_subset(100, 10, seed=4))
    assert first.tolist() == sorted(set(first.tolist())) and len(first) == 10
    assert torch.equal(seeded_subset(7, 10, seed=3), torch.arange(7))


# ----------------------------------------------------------------------------- features

def tiny_flags(**flags):
    """The pretraining flags of a ReSA model with a small projector (64 wide, 32-d
    embedding), and `flags` ({"--name": value})."""
    argv = ["--dataset", "demo", "--data_path", "unused", "--mlp_dim", "64", "--emb", "32"]
    return get_args(argv + [str(x) for pair in flags.items() for x in pair])


def tiny_method(**flags):
    """The model of `tiny_flags(**flags)`, BN statistics moved away from their
    defaults so that a load that skipped them would show."""
    configs = cli.pretraining(tiny_flags(**flags))
    torch.manual_seed(0)
    model = build_model(configs.method, configs.heads, configs.encoder)
    for name, buffer in model.momentum_projector.state_dict().items():
        if name.endswith("running_mean"):
            buffer.uniform_(-0.1, 0.1)
    return model


def full_checkpoint(model, flags=None):
    """A full checkpoint of `model` in our layout: what main.py writes (its flags
    recorded, its evaluated encoder named), or without `flags` the authors' (neither),
    with an authors'-style numpy lr in the optimizer."""
    recorded = {"args": cli.recorded_flags(flags),
                "evaluated_encoder": model.evaluated_prefix()} if flags else {}
    return {"epoch": 1, "state_dict": with_module_prefix(model.state_dict()),
            "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(0.05),
                                                         "params": [0]}]}, **recorded}


def test_branch_features_are_the_normalised_momentum_outputs_in_eval_mode():
    model = tiny_method()
    encoder, projector = model.momentum_encoder.train(), model.momentum_projector.train()
    images = torch.randn(6, 3, 32, 32)
    dataset = TensorImages(images, [0, 1, 2, 0, 1, 2], 3)
    features, labels = branch_features(encoder, projector, dataset, Extraction(4),
                                       torch.device("cpu"))
    assert list(features) == ["encoding", "projector_hidden1", "projector_hidden2", "embedding"]
    assert list(features) == feature_names(projector) and labels.tolist() == dataset.targets
    assert encoder.training and projector.training  # modes restored
    with torch.no_grad():
        encoder.eval(), projector.eval()
        h = encoder(images)
        expected = [h, projector[:3](h), projector[:6](h), projector(h)]
    for got, want in zip(features.values(), expected):
        assert torch.allclose(got, F.normalize(want, dim=1), atol=1e-5)
    assert torch.allclose(projector_features(projector, h, 6)["embedding"],
                          features["embedding"], atol=1e-5)


def test_feature_names_follow_the_projector_depth():
    assert feature_names(None) == ["encoding"]
    assert feature_names(tiny_method(**{"--mlp_layers": 2}).momentum_projector) == [
        "encoding", "projector_hidden1", "embedding"]


# ----------------------------------------------------------------------------- the tool

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo ImageFolder (8 train + 5 val images per class), with the marker
    that makes `--dataset demo` use it as it is."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    generate_demo_dataset(root, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS)
    (root / MARKER).write_text("small demo for the tests\n")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A full checkpoint as main.py writes it (its flags recorded: the tool's flags
    below give none of its network's sizes) and the encoder-only export of the same
    model."""
    folder = tmp_path_factory.mktemp("checkpoints")
    model = tiny_method()
    full, encoder_only = folder / "checkpoint.pth.tar", folder / "encoder.pth"
    torch.save(full_checkpoint(model, tiny_flags()), full)
    torch.save(model.momentum_encoder.state_dict(), encoder_only)
    return SimpleNamespace(full=full, encoder_only=encoder_only)


def tool_flags(demo, dump, *extra):
    return ["--dataset", "demo", "--data_path", demo, "--workers", "0", "--batch_size", "32",
            "--dump_path", dump, *map(str, extra)]


@pytest.fixture
def in_process(capsys):
    """Run eval_clusters.py's main here (faster than a subprocess); returns an object
    like subprocess.CompletedProcess. The log handlers it opens are closed after."""
    logger = logging.getLogger(LOGGER_NAME)
    handlers, level = list(logger.handlers), logger.level

    def run(*argv):
        try:
            clusters.main([str(a) for a in argv])
            code = 0
        except SystemExit as err:
            code = err.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    yield run
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:], logger.level = handlers, level


@pytest.fixture(scope="module")
def full_run(demo, checkpoints, tmp_path_factory):
    """The tool as users start it, on the full checkpoint."""
    dump = tmp_path_factory.mktemp("clusters_full")
    result = run_script("eval_clusters.py", *tool_flags(demo, dump, "--pretrained",
                                                         checkpoints.full))
    assert_ok(result)
    return SimpleNamespace(result=result, dump=dump,
                           json=json.loads((dump / "clustering.json").read_text()))


def test_full_checkpoint_gives_every_feature_and_the_picture(full_run):
    names = ["encoding", "projector_hidden1", "projector_hidden2", "embedding"]
    assert list(full_run.json) == [*names, "meta"]
    for name in names:
        scores = full_run.json[name]
        assert list(scores) == list(METRICS)
        assert -1 <= scores["silhouette_mean"] <= 1 and 0 <= scores["silhouette_std"] <= 1
        assert -1 <= scores["ari"] <= 1 and 0 <= scores["nmi"] <= 1
        assert 0 <= scores["knn_top1"] <= 100
    meta = full_run.json["meta"]
    assert (meta["samples"], meta["bank_samples"], meta["classes"], meta["knn_k"]) == (
        VAL_PER_CLASS * CLASSES, TRAIN_PER_CLASS * CLASSES, CLASSES, 20)
    assert "momentum encoder" in meta["form"]
    log = (full_run.dump / "out.log").read_text()
    assert all(f"| {name} " in log for name in names) and "k-NN top-1" in log
    assert "| embedding " in full_run.result.stdout  # the table is printed too
    with Image.open(full_run.dump / "tsne.png") as picture:
        assert picture.format == "PNG"
        width, height = picture.size
    assert 600 < width < 2000 and 300 < height < 1000 and width > 1.5 * height  # H | Z


def test_encoder_only_checkpoint_gives_the_encoding_alone(full_run, demo, checkpoints,
                                                          tmp_path, in_process):
    result = in_process(*tool_flags(demo, tmp_path, "--pretrained", checkpoints.encoder_only))
    assert_ok(result)
    assert "has no projector: only the encoding is measured" in result.stdout
    assert "error" not in result.stderr  # an info line, not an error
    scores = json.loads((tmp_path / "clustering.json").read_text())
    assert list(scores) == ["encoding", "meta"]
    # the same momentum encoder, the same samples and seeds: the same numbers, up to
    # float rounding (the other run was another process, with its own thread count)
    assert scores["encoding"] == pytest.approx(full_run.json["encoding"], rel=1e-4, abs=1e-6)
    with Image.open(tmp_path / "tsne.png") as picture:
        assert picture.size[0] < 1.5 * picture.size[1]  # one column: H only


def test_torchrun_two_processes_give_the_same_results(full_run, demo, checkpoints, tmp_path):
    """Also the former command, tools/clusters.py, which runs eval_clusters.py."""
    result = run_script("tools/clusters.py", *tool_flags(demo, tmp_path, "--pretrained",
                                                          checkpoints.full, "--tsne_samples", 0),
                        launcher=torchrun(2))
    assert_ok(result)
    scores = json.loads((tmp_path / "clustering.json").read_text())
    for name in ("encoding", "projector_hidden1", "projector_hidden2", "embedding"):
        assert scores[name] == pytest.approx(full_run.json[name], abs=1e-4)
    assert not (tmp_path / "tsne.png").exists()


def test_subsets_and_chosen_features(demo, checkpoints, tmp_path, in_process):
    result = in_process(*tool_flags(demo, tmp_path, "--pretrained", checkpoints.full,
                                    "--features", "embedding", "encoding", "--max_samples", 30,
                                    "--bank_samples", 40, "--tsne_samples", 0))
    assert_ok(result)
    scores = json.loads((tmp_path / "clustering.json").read_text())
    assert list(scores) == ["encoding", "embedding", "meta"]  # depth order
    assert (scores["meta"]["samples"], scores["meta"]["bank_samples"]) == (30, 40)
    assert not (tmp_path / "tsne.png").exists()


def test_help_documents_every_flag(in_process):
    result = in_process("--help")
    assert result.returncode == 0
    clustering = result.stdout.split("clustering:")[1].split("\n\n")[0]
    for _, _, names, kwargs in clusters.OWN_FLAGS:
        assert names[0] in clustering and kwargs["help"]
    for shared in ("--pretrained", "--dataset", "--nb_knn", "--knn_temperature", "--dump_path"):
        assert shared in result.stdout.split("accepted for compatibility")[0]


@pytest.mark.parametrize("extra, needles", [
    (("--features", "encoding", "logits"), ("unknown feature 'logits'", "embedding")),
    (("--max_samples", 51), ("--max_samples 51 exceeds the 50 samples of the test split",)),
    (("--bank_samples", 81), ("--bank_samples 81 exceeds the 80 samples",)),
    (("--max_samples", 20, "--tsne_samples", 21), ("--tsne_samples 21 exceeds the 20",)),
    (("--max_samples", 0), ("--max_samples must be at least 1",)),
])
def test_bad_subsets_and_features_are_one_line(extra, needles, demo, checkpoints, tmp_path,
                                               in_process):
    result = in_process(*tool_flags(demo, tmp_path, "--pretrained", checkpoints.full, *extra))
    assert_usage_error(result, *needles)
    assert not (tmp_path / "clustering.json").exists()


def test_embedding_of_an_encoder_only_checkpoint_is_one_line(demo, checkpoints, tmp_path,
                                                             in_process):
    result = in_process(*tool_flags(demo, tmp_path, "--pretrained", checkpoints.encoder_only,
                                    "--features", "embedding"))
    assert_usage_error(result, "--features embedding", "has no projector")


def test_unreadable_checkpoint_is_one_line(demo, tmp_path, in_process):
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    result = in_process(*tool_flags(demo, tmp_path / "out", "--pretrained", junk))
    assert_usage_error(result, "junk.pth", "not a readable PyTorch checkpoint")


def test_empty_dataset_is_one_line(checkpoints, tmp_path, in_process):
    for split in ("train", "val"):
        (tmp_path / "data" / split / "cls").mkdir(parents=True)
    result = in_process("--dataset", "imagenet", "--data_path", tmp_path / "data",
                        "--crops_size", 32, "--arch", "resnet18", "--workers", 0,
                        "--dump_path", tmp_path / "out", "--pretrained", checkpoints.encoder_only)
    assert_usage_error(result, "without image files")


def test_cifar100_superclasses_come_from_the_dataset_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "test", "wb") as f:
        pickle.dump({"fine_labels": [0, 1, 2], "coarse_labels": [4, 1, 4]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"coarse_label_names": [f"super{i}" for i in range(20)]}, f)
    coarse, names = cifar100_superclasses(tmp_path)
    assert coarse.tolist() == [4, 1, 4] and names[4] == "super4" and len(names) == 20
    # the coarse row of the picture: one row per labelling, one column per feature
    points = {"encoding H": np.random.default_rng(0).normal(size=(3, 2)),
              "embedding Z": np.random.default_rng(1).normal(size=(3, 2))}
    draw_tsne(tmp_path / "two_rows.png", points,
              [(np.array([0, 1, 2]), ["a", "b", "c"], "classes"),
               (coarse, names, "superclasses")])
    with Image.open(tmp_path / "two_rows.png") as picture:
        assert picture.format == "PNG" and picture.size[1] > 600  # two rows
    with pytest.raises(UsageError, match="superclasses"):
        cifar100_superclasses(tmp_path / "elsewhere")


def analysis(*argv):
    """The eval_clusters.Analysis of the tool's flags `argv`, as its main builds it."""
    flags = get_args([str(a) for a in argv], "clusters", own_flags=clusters.OWN_FLAGS)
    return clusters.Analysis(cli.run_config(flags), cli.pick(config.Data, flags),
                             cli.encoder_config(flags), flags)


def assert_same_tensors(module, reference):
    assert list(module.state_dict()) == list(reference.state_dict())
    for (name, got), want in zip(module.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(got, want), name


def test_the_method_is_rebuilt_from_the_flags_the_checkpoint_records(checkpoints, tmp_path):
    """The momentum branch of a full checkpoint, its projector as deep and wide as its
    recorded flags say whatever the tool's flags; the authors' layout, which records
    none, read with the tool's flags (and refused, one clear error, when they do not
    fit); an encoder-only file has no projector."""
    shallow = {"--mlp_layers": 2}
    model = tiny_method(**shallow)
    ours, authors = tmp_path / "ours.pth.tar", tmp_path / "authors.pth.tar"
    torch.save(full_checkpoint(model, tiny_flags(**shallow)), ours)
    torch.save(full_checkpoint(model), authors)
    tool = ("--dataset", "demo", "--data_path", "unused")  # projector: 3 layers, 2048, 512
    authors_flags = (*tool, "--mlp_layers", 2, "--mlp_dim", 64, "--emb", 32)
    for path, flags in ((ours, tool), (authors, authors_flags)):
        encoder, projector, form, _ = clusters.load_branch(
            analysis(*flags, "--pretrained", path), 0, torch.device("cpu"))
        assert [type(layer) for layer in projector] == [type(layer) for layer in
                                                        model.momentum_projector]
        assert_same_tensors(projector, model.momentum_projector)
        assert_same_tensors(encoder, model.momentum_encoder)
        assert isinstance(projector[-1], nn.BatchNorm1d) and not projector[-1].affine
        assert "momentum encoder" in form
    with pytest.raises(UsageError, match="does not fit this model"):
        clusters.load_branch(analysis(*tool, "--pretrained", authors), 0, torch.device("cpu"))
    encoder, projector, _, _ = clusters.load_branch(
        analysis(*tool, "--pretrained", checkpoints.encoder_only), 0, torch.device("cpu"))
    assert projector is None
    exported = torch.load(checkpoints.encoder_only)
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in exported.items())


def test_random_baseline_is_built_as_the_checkpoint_records(tmp_path):
    """The baseline of a checkpoint trained with other network flags than the tool's
    (here the cifar stem and no zero-init) is that network, not the tool's default."""
    trained = {"--stem": "cifar", "--mlp_layers": 2}
    model = tiny_method(**trained)
    path = tmp_path / "cifar_stem.pth.tar"
    torch.save(full_checkpoint(model, tiny_flags(**trained)), path)
    tool = analysis("--dataset", "demo", "--data_path", "unused", "--pretrained", path)
    assert tool.encoder.stem == "imagenet"
    encoder, _, _, built_as = clusters.load_branch(tool, 0, torch.device("cpu"))
    assert built_as == cli.encoder_config(tiny_flags(**trained)) and built_as.stem == "cifar"
    baseline = clusters.random_encoder(built_as, 0, torch.device("cpu"))
    assert baseline.conv1.weight.shape == encoder.conv1.weight.shape == (64, 3, 3, 3)


def test_random_baseline_is_the_initialisation_pretraining_starts_from(demo, tmp_path,
                                                                       in_process):
    """With no checkpoint, the measured encoder is the random one: the baseline row,
    built from the same --seed, must give the very same numbers; another seed must not."""
    result = in_process(*tool_flags(demo, tmp_path, "--pretrained", "", "--random_baseline",
                                    "--tsne_samples", 20))
    assert_ok(result)
    scores = json.loads((tmp_path / "clustering.json").read_text())
    assert list(scores) == ["random_encoding", "encoding", "meta"]
    assert scores["random_encoding"] == scores["encoding"]
    assert "| random_encoding " in result.stdout
    with Image.open(tmp_path / "tsne.png") as picture:
        assert picture.size[0] > 1.5 * picture.size[1]  # two panels side by side

    other = tmp_path / "seed1"
    assert_ok(in_process(*tool_flags(demo, other, "--pretrained", "", "--random_baseline",
                                     "--seed", 1, "--tsne_samples", 0)))
    moved = json.loads((other / "clustering.json").read_text())
    assert moved["random_encoding"] != scores["random_encoding"]


def test_precision_reaches_the_encoder(demo, checkpoints, tmp_path, in_process, monkeypatch):
    """--precision bf16: the encoder runs under bfloat16 autocast, the scores are those
    of fp32 features close to the fp32 run's."""
    seen = []
    build = clusters.build_encoder

    def recording(*args, **kwargs):
        encoder, dim = build(*args, **kwargs)
        encoder.conv1.register_forward_hook(lambda m, i, output: seen.append(output.dtype))
        return encoder, dim
    monkeypatch.setattr(clusters, "build_encoder", recording)
    flags = ("--pretrained", checkpoints.encoder_only, "--max_samples", 20, "--bank_samples",
             20, "--tsne_samples", 0)
    assert_ok(in_process(*tool_flags(demo, tmp_path / "fp32", *flags)))
    assert_ok(in_process(*tool_flags(demo, tmp_path / "bf16", *flags, "--precision", "bf16")))
    assert set(seen[:len(seen) // 2]) == {torch.float32}
    assert set(seen[len(seen) // 2:]) == {torch.bfloat16}
    fp32, bf16 = (json.loads((tmp_path / p / "clustering.json").read_text())["encoding"]
                  for p in ("fp32", "bf16"))
    assert bf16["silhouette_mean"] == pytest.approx(fp32["silhouette_mean"], abs=0.05)
