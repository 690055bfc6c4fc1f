"""Online monitor of pretraining on the small datasets (SPEC §7).

Every few epochs main.py measures how well the momentum encoder's features of the
un-augmented train and test images classify, with three cheap probes that need no
extra training run: Euclidean 5-NN (the authors' CIFAR protocol), DINO's weighted
k-NN, and a linear classifier trained on the features held in memory. The images are
normalised as resa_cifar's monitor normalises them: with CIFAR-10's statistics on
CIFAR-10 and CIFAR-100 alike (`DatasetSpec.monitor_norm`). With the
momentum projector it also follows the paper's clustering properties (SPEC §9) of the
encoding H and the embedding Z: the silhouette and the k-means ARI, on a fixed
subset of the test features small enough to cost little against an epoch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from src.eval.clustering import (kmeans_agreement, nearest_k, projector_features,
                            seeded_subset, silhouette)
from src.data.datasets import eval_datasets
from src.eval.features import Extraction, extract_features
from src.eval.knn import euclid_knn_predict, knn_classifier
from src.eval.metrics import percent

CLUSTER_SAMPLES = 2000  # test features on which the silhouette and k-means are computed
LINEAR_BATCH = 1000
LINEAR_LR, LINEAR_FINAL_LR, LINEAR_WD = 1e-2, 1e-6, 5e-6


def linear_probe_predict(train_x, train_y, test_x, num_classes, epochs, seed,
                         check_stop=None):
    """Predictions of a linear classifier trained on frozen features: Adam (lr 1e-2
    decaying exponentially to 1e-6 over `epochs`, weight decay 5e-6), batch 1000.

    Seeded by `seed` alone and leaves the global random state untouched. `check_stop`
    (a collective, see OnlineMonitor.evaluate) runs before each epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = nn.Linear(train_x.shape[1], num_classes)
    classifier.to(train_x.device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=LINEAR_LR, weight_decay=LINEAR_WD)
    gamma = (LINEAR_FINAL_LR / LINEAR_LR) ** (1 / epochs)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    with torch.enable_grad():
        for _ in range(epochs):
            if check_stop is not None:
                check_stop()
            for index in torch.randperm(train_x.shape[0], generator=generator).split(LINEAR_BATCH):
                index = index.to(train_x.device)
                loss = F.cross_entropy(classifier(train_x[index]), train_y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
    with torch.no_grad():
        return classifier(test_x).argmax(dim=1)


class OnlineMonitor:
    """Probes of the evaluated encoder on the un-augmented train and test sets of
    config.Data `data` at `crop` pixels, as config.Monitor `config` says.

    The datasets are built once. Under torchrun, construct it and call `evaluate` on
    every process (both take part in collectives); each process shards the feature
    extraction, holds all the gathered features and gets the same numbers.
    `classifier_epochs` is the linear classifier's number of epochs (500 in the
    authors' protocol).
    """

    def __init__(self, data, config, crop, device, classifier_epochs=500):
        self.config, self.device = config, device
        self.classifier_epochs = classifier_epochs
        self.train, self.test = eval_datasets(data, crop, config.num_classes, "monitor",
                                              "monitor")
        self.how = Extraction(data.batch_size, data.workers)
        self.wknn_k = nearest_k(config.nb_knn)

    def features(self, encoder, dataset, name, check_stop=None):
        return extract_features(encoder, dataset, self.how, self.device,
                                desc=f"monitor {name} features", check_stop=check_stop)

    def evaluate(self, encoder, projector=None, seed=0, check_stop=None):
        """{'knn5_euclid_top1', 'wknn{k}_top1', 'linear_top1'}: top-1 in percent of
        `encoder` (the momentum encoder) on the test set; then 'sc_encoding' and
        'ari_encoding' (silhouette mean and k-means ARI of H), and with `projector`
        (the momentum projector) 'sc_embedding' and 'ari_embedding' of Z.
        `seed` seeds the linear classifier and the clustering subset. `check_stop` (a
        collective on every process, e.g. TrainLoop.stop_if_requested)
        runs between the feature batches and the linear classifier's epochs, so that a
        stop signal does not wait for the whole evaluation."""
        config = self.config
        train_x, train_y = self.features(encoder, self.train, "train", check_stop)
        test_x, test_y = self.features(encoder, self.test, "test", check_stop)
        total = test_y.shape[0]
        knn5 = euclid_knn_predict(train_x, train_y, test_x, config.num_classes, k=5)
        wknn_top1, _ = knn_classifier(F.normalize(train_x, dim=1), train_y,
                                      F.normalize(test_x, dim=1), test_y, self.wknn_k,
                                      T=config.knn_temperature, num_classes=config.num_classes)
        linear = linear_probe_predict(train_x, train_y, test_x, config.num_classes,
                                      self.classifier_epochs, seed, check_stop)
        return {"knn5_euclid_top1": percent((knn5 == test_y).sum(), total),
                f"wknn{self.wknn_k}_top1": wknn_top1,
                "linear_top1": percent((linear == test_y).sum(), total),
                **self.cluster_scores(test_x, test_y, projector, seed)}

    def cluster_scores(self, test_x, test_y, projector, seed=0):
        """Silhouette and ARI of the L2-normalised H (and Z) of a fixed seeded subset
        of the raw test features `test_x`; Z is the projector run over them."""
        subset = seeded_subset(len(test_y), CLUSTER_SAMPLES, seed).to(test_x.device)
        encodings, labels = test_x[subset], test_y[subset]
        features = {"encoding": F.normalize(encodings, dim=1)}
        if projector is not None:
            features["embedding"] = projector_features(projector, encodings,
                                                       self.how.batch_size)["embedding"]
        scores = {}
        for name, x in features.items():
            scores[f"sc_{name}"] = silhouette(x, labels)[0]
            scores[f"ari_{name}"] = kmeans_agreement(x, labels, seed)[0]
        return scores
