"""Clustering properties of features (SPEC §9): how well the ground-truth classes
form clusters in the encoding H, the embedding Z and the projector's hidden layers.

Every metric is scikit-learn's, on L2-normalised rows: the silhouette coefficient
with the classes as clusters (cosine distance), k-means (k = number of classes)
scored against the labels by ARI and NMI, and the weighted k-NN top-1 against a bank
of training features of the same kind. The features come from the momentum branch,
the one the paper analyses and the evaluations use.
"""
from collections import namedtuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from src.eval.features import evaluating, extract_features
from src.errors import UsageError
from src.eval.knn import knn_classifier

KNN_K = 20            # the one weighted k-NN figure kept: --nb_knn's value nearest 20
KMEANS_N_INIT = 10    # k-means restarts: fixed, so that a seed gives one answer
METRICS = ("silhouette_mean", "silhouette_std", "ari", "nmi", "knn_top1")


def nearest_k(ks, target=KNN_K):
    """The value of `ks` nearest `target` (the smaller one on a tie)."""
    return min(ks, key=lambda k: (abs(k - target), k))


def seeded_subset(n, size, seed):
    """Sorted indices of a fixed random subset of `size` of range(n) (all of it when
    size >= n): one seed picks the same samples for every feature and every run."""
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:size].sort().values


def as_numpy(values):
    """A numpy copy of a tensor (floats as float32) or array-like, for scikit-learn."""
    if not torch.is_tensor(values):
        return np.asarray(values)
    values = values.detach().cpu()
    return (values.float() if values.is_floating_point() else values).numpy()


def check_clusterable(labels):
    """UsageError unless the silhouette is defined: 2 <= classes < samples."""
    classes, samples = len(np.unique(as_numpy(labels))), len(labels)
    if not 2 <= classes < samples:
        raise UsageError(f"clustering metrics need at least 2 classes and more samples than "
                         f"classes; the selected samples hold {samples} sample(s) of "
                         f"{classes} class(es)")


# scikit-learn is imported where it is used: it would add a second to the start of
# every script that imports the online monitor.

def silhouette(features, labels):
    """(mean, std) of the silhouette with the classes as clusters, cosine distance:
    the mean over samples, and the spread as the std of the per-class means."""
    from sklearn.metrics import silhouette_samples
    labels = as_numpy(labels)
    per_sample = silhouette_samples(as_numpy(features), labels, metric="cosine")
    class_means = [per_sample[labels == c].mean() for c in np.unique(labels)]
    return float(per_sample.mean()), float(np.std(class_means))


def kmeans_agreement(features, labels, seed=0, n_init=KMEANS_N_INIT):
    """(ARI, NMI) against `labels` of k-means with k = the number of classes present."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    labels = as_numpy(labels)
    kmeans = KMeans(n_clusters=len(np.unique(labels)), n_init=n_init, random_state=seed)
    clusters = kmeans.fit_predict(as_numpy(features))
    return (float(adjusted_rand_score(labels, clusters)),
            float(normalized_mutual_info_score(labels, clusters)))


class KnnVote(namedtuple("KnnVote", "k temperature num_classes")):
    """How the weighted k-NN of `clustering_scores` votes: k neighbours, temperature T."""


def clustering_scores(features, labels, bank, vote, *, seed=0, n_init=KMEANS_N_INIT):
    """The five METRICS of one kind of feature (rows L2-normalised); `knn_top1` is in
    percent, voted by KnnVote `vote` among the knn.Bank `bank` (training features of
    the same kind)."""
    sc_mean, sc_std = silhouette(features, labels)
    ari, nmi = kmeans_agreement(features, labels, seed, n_init)
    top1, _ = knn_classifier(bank.features, bank.labels, features, torch.as_tensor(labels),
                             vote.k, T=vote.temperature, num_classes=vote.num_classes)
    return dict(zip(METRICS, (sc_mean, sc_std, ari, nmi, top1)))


def tsne_2d(features, seed=0):
    """2-D t-SNE of L2-normalised rows (PCA init, fixed seed), the paper's picture."""
    from sklearn.manifold import TSNE
    perplexity = min(30.0, max(1.0, (features.shape[0] - 1) / 3))  # must stay below n
    tsne = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed)
    return tsne.fit_transform(as_numpy(features))


def feature_names(projector):
    """Names of the features of a momentum branch, from input to output: `encoding`,
    one `projector_hiddenI` per hidden layer (after its ReLU), `embedding`."""
    if projector is None:
        return ["encoding"]
    hidden = sum(isinstance(layer, nn.ReLU) for layer in projector)
    return ["encoding", *(f"projector_hidden{i}" for i in range(1, hidden + 1)), "embedding"]


@torch.no_grad()
def projector_features(projector, encodings, batch_size):
    """{'projector_hidden1': ..., 'embedding': ...}: the L2-normalised output of each
    hidden layer (after its ReLU) and of the last layer of `projector` (a Sequential),
    run in eval mode over the raw `encodings` batch by batch."""
    batches = []
    with evaluating(projector):
        for x in encodings.split(batch_size):
            outputs = []
            for layer in projector:
                x = layer(x)
                if isinstance(layer, nn.ReLU):
                    outputs.append(F.normalize(x, dim=1))
            batches.append(outputs + [F.normalize(x, dim=1)])
    return {name: torch.cat(parts) for name, parts in zip(feature_names(projector)[1:],
                                                           zip(*batches))}


class EncoderPair(nn.Module):
    """Two encoders of the same width over the same images, outputs concatenated: one
    read of the images serves both."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return torch.cat([self.first(x), self.second(x)], dim=1)


def branch_features(encoder, projector, dataset, how, device, desc="features", baseline=None):
    """({name: L2-normalised features}, labels) of every sample of `dataset`, in its
    order, on every rank. The encoder runs over the images (sharded over processes and
    gathered, see `extract_features`, as eval.features.Extraction `how` says); the
    projector (None: encoding only) then runs over the gathered encodings, so the
    images are read once. `baseline`, an encoder of the same architecture, runs beside
    it on the same batches and gives `random_encoding`."""
    net = encoder if baseline is None else EncoderPair(baseline, encoder)
    with evaluating(net, projector):
        encodings, labels = extract_features(net, dataset, how, device, desc=desc)
        features = {}
        if baseline is not None:
            random, encodings = encodings.chunk(2, dim=1)
            features["random_encoding"] = F.normalize(random, dim=1)
        features["encoding"] = F.normalize(encodings, dim=1)
        if projector is not None:
            features.update(projector_features(projector, encodings, how.batch_size))
    return features, labels
