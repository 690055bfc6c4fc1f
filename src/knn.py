"""k-nearest-neighbour classification of feature banks, shared by eval_knn.py and the
online monitor: DINO's weighted cosine k-NN (SPEC §6) and the authors' Euclidean
majority-vote 5-NN (SPEC §7). Similarities are computed chunk by chunk, so memory
stays bounded whatever the bank size."""
import torch

from src.distributed import all_reduce_sum, get_rank, get_world_size
from src.metrics import percent

MAX_SIMILARITIES = 2 ** 27  # entries of one test-chunk x bank similarity block (512 MB)
MAX_DISTANCES = 2 ** 25     # the same for the Euclidean vote's distance blocks


def chunk_rows(bank_size):
    """Test rows per block: 1000 for small banks, ~100 for ImageNet's 1.28M."""
    return max(1, min(1000, MAX_SIMILARITIES // max(bank_size, 1)))


@torch.no_grad()
def nearest_neighbors(train_features, test_features, k):
    """Cosine similarities and indices of the k nearest training rows of every test
    row, most similar first (rows must be L2-normalised); computed chunk by chunk."""
    k = min(k, train_features.shape[0])
    rows = chunk_rows(train_features.shape[0])
    sims = [torch.zeros(0, k, device=train_features.device)]
    index = [torch.zeros(0, k, dtype=torch.long, device=train_features.device)]
    for start in range(0, test_features.shape[0], rows):
        chunk = test_features[start:start + rows].to(train_features.device)
        top = (chunk @ train_features.T).topk(k, dim=1)
        sims.append(top.values)
        index.append(top.indices)
    return torch.cat(sims), torch.cat(index)


@torch.no_grad()
def knn_correct(similarities, neighbor_labels, test_labels, T, num_classes):
    """Top-1 and top-5 hit counts (float64 tensor of 2) of DINO's weighted vote.

    Neighbour j votes for its class with weight exp(sim_j / T); classes are ranked by
    their summed votes and top-5 looks at the first min(5, k) of them, as DINO does.
    """
    weights = (similarities / T).exp()
    votes = weights.new_zeros(similarities.shape[0], num_classes)
    votes.scatter_add_(1, neighbor_labels, weights)
    ranked = votes.sort(dim=1, descending=True).indices
    hits = ranked.eq(test_labels.to(votes.device).view(-1, 1))
    k = similarities.shape[1]
    return torch.stack([hits[:, 0].sum(), hits[:, :min(5, k)].sum()]).double()


def knn_classifier(train_features, train_labels, test_features, test_labels, k, T=0.07,
                   num_classes=1000):
    """DINO's weighted k-NN on L2-normalised rows; returns (top-1, top-5) in percent."""
    sims, index = nearest_neighbors(train_features, test_features, k)
    counts = knn_correct(sims, train_labels[index], test_labels, T, num_classes)
    total = test_labels.shape[0]
    return percent(counts[0], total), percent(counts[1], total)


def knn_eval(train_features, train_labels, test_features, test_labels, ks, T, num_classes,
             device):
    """{k: (top-1, top-5)} over all processes: each votes for the test rows rank::W and
    the hit counts are summed; the neighbours are searched once for the largest k."""
    mine = slice(get_rank(), None, get_world_size())
    sims, index = nearest_neighbors(train_features, test_features[mine], max(ks))
    neighbor_labels, own_labels = train_labels[index], test_labels[mine]
    results = {}
    for k in ks:
        counts = knn_correct(sims[:, :k], neighbor_labels[:, :k], own_labels, T, num_classes)
        counts = all_reduce_sum(counts.to(device))
        total = test_labels.shape[0]
        results[k] = (percent(counts[0], total), percent(counts[1], total))
    return results


@torch.no_grad()
def euclid_knn_predict(train_x, train_y, test_x, num_classes, k=5):
    """Majority vote of the k Euclidean-nearest training rows (k <= 60).

    Ties go to the class that holds the nearest neighbour: each neighbour j (0 = the
    nearest) adds 2^k + 2^(k-1-j) to its class, so counts decide first and, among equal
    counts, the integer comparison is the lexicographic one of the neighbours' ranks.
    """
    k = min(k, train_x.shape[0])
    weights = 2 ** k + 2 ** torch.arange(k - 1, -1, -1, device=train_x.device)
    rows = max(1, MAX_DISTANCES // max(train_x.shape[0], 1))
    predictions = []
    for start in range(0, test_x.shape[0], rows):
        distances = torch.cdist(test_x[start:start + rows], train_x)
        labels = train_y[distances.topk(k, dim=1, largest=False).indices]
        scores = torch.zeros(labels.shape[0], num_classes, dtype=torch.long,
                             device=labels.device)
        scores.scatter_add_(1, labels, weights.expand_as(labels))
        predictions.append(scores.argmax(dim=1))
    return torch.cat(predictions) if predictions else test_x.new_zeros(0, dtype=torch.long)
