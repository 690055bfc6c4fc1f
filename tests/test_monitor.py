"""Online monitor (SPEC §7): Euclidean 5-NN, weighted k-NN and the linear classifier;
the silhouette and k-means ARI of H and Z (SPEC §9)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import args as cli
from args import get_args
from helpers_eval import TensorImages, fast_flags, resnet
from src import config
from src.data.datasets import eval_datasets
from src.distributed import init_distributed
from src.eval import knn, monitor
from src.eval.clustering import kmeans_agreement, seeded_subset, silhouette
from src.eval.knn import euclid_knn_predict, knn_classifier
from src.eval.monitor import OnlineMonitor, linear_probe_predict
from src.models import build_projector

pytestmark = pytest.mark.usefixtures("one_thread")


def points(*xs):
    return torch.tensor([[float(x)] for x in xs])


@pytest.mark.parametrize("labels, expected", [
    ([0, 0, 1, 1, 1, 0], 1),  # plain majority: three 1s beat the two nearest 0s
    ([1, 0, 0, 2, 2, 0], 0),  # 0 and 2 tie with two votes: the smaller class id wins
    ([1, 2, 0, 2, 0, 0], 0),  # the same tie with a 2 nearer: still 0, the smaller id
    ([2, 1, 2, 1, 0, 2], 1),  # 2 holds the nearest neighbour, 1 ties it and wins
    ([4, 3, 3, 4, 0, 4], 3),  # 3 and 4 tie (the sixth, far away, does not vote)
])
def test_euclid_5nn_majority_vote_ties_go_to_the_smallest_class(labels, expected):
    """resa_cifar's vote: the first maximum of unique(return_counts=True), whose values
    are sorted, so among equal counts the smallest class id."""
    # distances to the test point 0 are 0.1 < 0.2 < 0.3 < 0.4 < 0.5 < 3 (sixth is too far)
    train = points(0.1, -0.2, 0.3, -0.4, 0.5, 3.0)
    prediction = euclid_knn_predict(train, torch.tensor(labels), points(0), num_classes=5)
    assert prediction.tolist() == [expected]


def test_euclid_chunks_give_resa_cifars_predictions(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(200, 6, generator=generator), torch.randn(37, 6, generator=generator)
    labels = torch.randint(0, 4, (200,), generator=generator)
    whole = euclid_knn_predict(train, labels, test, 4)
    monkeypatch.setattr(knn, "MAX_DISTANCES", 1000)  # 5 test rows per block
    assert torch.equal(euclid_knn_predict(train, labels, test, 4), whole)
    # their eval/evaluate.py, row by row (4 classes and 5 votes: many ties)
    neighbours = labels[torch.cdist(test, train).topk(5, dim=1, largest=False).indices]
    theirs = []
    for row in neighbours:
        values, counts = row.unique(return_counts=True)
        theirs.append(values[counts.argmax()].item())
    assert whole.tolist() == theirs


def blobs(n_per_class, seed, dim=12, classes=3):
    """Well-separated Gaussian clusters (centers 14 apart, noise 0.3 per axis)."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.eye(classes, dim) * 10
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centers[labels] + 0.3 * torch.randn(len(labels), dim, generator=generator), labels


def test_linear_probe_learns_deterministically_without_touching_global_rng():
    (train_x, train_y), (test_x, test_y) = blobs(40, 0), blobs(10, 1)
    state = torch.get_rng_state()
    first = linear_probe_predict(train_x, train_y, test_x, 3, epochs=300, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    second = linear_probe_predict(train_x, train_y, test_x, 3, epochs=300, seed=0)
    assert torch.equal(first, test_y) and torch.equal(first, second)
    # it follows the training labels: permuted labels give permuted predictions
    permuted = linear_probe_predict(train_x, (train_y + 1) % 3, test_x, 3, epochs=300, seed=0)
    assert torch.equal(permuted, (test_y + 1) % 3)


def small_monitor(classifier_epochs=500, **overrides):
    """An OnlineMonitor on CPU, batch 16, 3 classes, config.Monitor fields `overrides`
    (its datasets are stubbed by the tests: the crop size is not used)."""
    values = dict(num_classes=3, nb_knn=(5, 10, 25), knn_temperature=0.07)
    return OnlineMonitor(config.Data(batch_size=16, workers=0),
                         config.Monitor(**{**values, **overrides}), 2, torch.device("cpu"),
                         classifier_epochs=classifier_epochs)


PROBES = ("knn5_euclid_top1", "wknn25_top1", "linear_top1")


def blob_monitor(monkeypatch, test_shift=0):
    """(monitor, raw test features, test set, transform kinds asked for) on flattened
    3-class blobs; `test_shift` relabels the test set."""
    (train_x, train_y), (test_x, test_y) = blobs(40, 0), blobs(10, 1)
    train = TensorImages(train_x.view(-1, 3, 2, 2), train_y, 3)
    test = TensorImages(test_x.view(-1, 3, 2, 2), (test_y + test_shift) % 3, 3)
    kinds = []
    monkeypatch.setattr(monitor, "eval_datasets",
                        lambda data, crop, num_classes, *kind: kinds.append(kind) or (train, test))
    return small_monitor(classifier_epochs=300), test_x, test, kinds


def test_evaluate_returns_the_three_probes_of_the_encoder(monkeypatch):
    probe, test_x, test, kinds = blob_monitor(monkeypatch, test_shift=1)  # all wrong
    train_x, train_y = blobs(40, 0)
    test_y = torch.tensor(test.targets)
    encoder = nn.Sequential(nn.Flatten()).train()
    results = probe.evaluate(encoder)
    assert kinds == [("monitor", "monitor")] and encoder.training
    assert set(results) == {*PROBES, "sc_encoding", "ari_encoding"}  # no projector, no Z
    wknn, _ = knn_classifier(F.normalize(train_x), train_y, F.normalize(test_x), test_y, 25,
                             T=0.07, num_classes=3)
    assert results["wknn25_top1"] == pytest.approx(wknn) == 0.0
    assert results["knn5_euclid_top1"] == 0.0 and results["linear_top1"] == 0.0
    test.targets = blobs(10, 1)[1].tolist()  # the right labels: every probe is perfect
    assert {k: probe.evaluate(encoder)[k] for k in PROBES} == {k: 100.0 for k in PROBES}


def test_clustering_scores_of_h_and_z_on_the_test_features(monkeypatch):
    probe, test_x, test, _ = blob_monitor(monkeypatch)
    labels = torch.tensor(test.targets)
    torch.manual_seed(0)
    projector = build_projector(12, 2, 16, 8).train()
    for name, buffer in projector.state_dict().items():  # eval mode must use these
        if name.endswith("running_mean"):
            buffer.uniform_(-1, 1)
    results = probe.evaluate(nn.Flatten(), projector)
    assert list(results)[3:] == ["sc_encoding", "ari_encoding", "sc_embedding", "ari_embedding"]
    assert projector.training
    # separated blobs: H clusters perfectly
    assert results["sc_encoding"] == pytest.approx(silhouette(F.normalize(test_x), labels)[0])
    assert results["sc_encoding"] > 0.9 and results["ari_encoding"] == pytest.approx(1.0)
    with torch.no_grad():
        z = F.normalize(projector.eval()(test_x), dim=1)
    assert results["sc_embedding"] == pytest.approx(silhouette(z, labels)[0], abs=1e-5)
    assert results["ari_embedding"] == pytest.approx(kmeans_agreement(z, labels)[0])


def test_clustering_scores_use_a_fixed_seeded_subset(monkeypatch):
    probe, test_x, test, _ = blob_monitor(monkeypatch)
    monkeypatch.setattr(monitor, "CLUSTER_SAMPLES", 12)
    subset = seeded_subset(len(test), 12, seed=0)  # evaluate's default seed
    labels = torch.tensor(test.targets)[subset]
    first, second = probe.evaluate(nn.Flatten()), probe.evaluate(nn.Flatten())
    assert first == second
    assert first["sc_encoding"] == pytest.approx(
        silhouette(F.normalize(test_x[subset]), labels)[0])
    assert first["sc_encoding"] != pytest.approx(silhouette(F.normalize(test_x),
                                                            torch.tensor(test.targets))[0])


@pytest.mark.parametrize("nb_knn, k", [([5, 15, 25], 15), ([20], 20), ([100, 10], 10)])
def test_weighted_knn_uses_20_or_the_nearest_k(nb_knn, k, monkeypatch):
    monkeypatch.setattr(monitor, "eval_datasets", lambda *args: (None, None))
    assert small_monitor(nb_knn=tuple(nb_knn)).wknn_k == k


def test_monitor_on_an_image_folder_is_deterministic(image_folder, tmp_path):
    configs = cli.pretraining(get_args(fast_flags(image_folder, tmp_path, "--seed", 0)))
    processes = init_distributed(configs.run)
    probe = OnlineMonitor(configs.data, configs.monitor, configs.views.crops_size[0],
                          processes.device, classifier_epochs=10)
    assert len(probe.train) == len(probe.test) == 12
    torch.manual_seed(0)
    encoder, _ = resnet(configs.encoder.arch)
    encoder.train()
    seed = configs.run.seed
    first, second = probe.evaluate(encoder, seed=seed), probe.evaluate(encoder, seed=seed)
    assert first == second and encoder.training
    assert set(first) == {"knn5_euclid_top1", "wknn20_top1", "linear_top1", "sc_encoding",
                          "ari_encoding"}
    assert all(0.0 <= first[k] <= 100.0 for k in ("knn5_euclid_top1", "wknn20_top1",
                                                  "linear_top1"))
    assert -1 <= first["sc_encoding"] <= 1 and -1 <= first["ari_encoding"] <= 1


def test_monitor_normalises_cifar100_with_cifar10_statistics(tmp_path, monkeypatch):
    """resa_cifar's eval/dataloader.py normalises the monitor's CIFAR-100 images with
    CIFAR-10's mean and std, the std written (0.247, 0.243, 0.261); the evaluation
    scripts keep the statistics the network was pretrained with."""
    from torchvision.datasets import cifar
    from helpers_eval import make_fake_cifar100
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    train_pixels, test_pixels = make_fake_cifar100(tmp_path)
    configs = cli.pretraining(get_args(["--dataset", "cifar100", "--data_path", str(tmp_path),
                                        "--workers", "0"]))
    crop, num_classes = configs.views.crops_size[0], configs.monitor.num_classes
    probe = OnlineMonitor(configs.data, configs.monitor, crop, torch.device("cpu"))

    def normalised(pixels, mean, std):
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255
        return (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    cifar10 = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
    for dataset, pixels in ((probe.train, train_pixels), (probe.test, test_pixels)):
        image, label = dataset[3]
        assert label == 3
        torch.testing.assert_close(image, normalised(pixels[3], *cifar10))
    train, _ = eval_datasets(configs.data, crop, num_classes, "plain")
    torch.testing.assert_close(train[3][0], normalised(
        train_pixels[3], (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)))
