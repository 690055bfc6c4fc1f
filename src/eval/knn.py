"""k-nearest-neighbour classification of feature banks, shared by eval_knn.py and the
online monitor: DINO's weighted cosine k-NN (SPEC §6) and the authors' Euclidean
majority-vote 5-NN (SPEC §7). Similarities are computed chunk by chunk, so memory
stays bounded whatever the bank size; a bank can also be sharded over processes, each
holding 1/W of it, with the same neighbours as one process holding it all."""
from collections import namedtuple

import torch

from src.distributed import gather, get_world_size
from src.eval.metrics import percent

MAX_SIMILARITIES = 2 ** 27  # entries of one test-chunk x bank similarity block (512 MB)
MAX_DISTANCES = 2 ** 25     # the same for the Euclidean vote's distance blocks


def chunk_rows(bank_size):
    """Test rows per block: 1000 for small banks, ~100 for ImageNet's 1.28M."""
    return max(1, min(1000, MAX_SIMILARITIES // max(bank_size, 1)))


def similarity_order(sims, index, k):
    """Per row, the positions of the first k candidates ordered by similarity, then by
    bank index: ties go to the smaller index, so the result depends neither on how the
    bank is split nor on topk's order among equal values."""
    by_index = index.argsort(dim=1)
    by_sims = torch.sort(sims.gather(1, by_index), dim=1, descending=True, stable=True)
    return by_index.gather(1, by_sims.indices[:, :k])


def top_k(sims, k):
    """(similarities, columns) of the k largest entries of each row, ordered as
    `similarity_order`; ties at the k-th value are resolved towards smaller columns."""
    values, columns = sims.topk(k, dim=1)
    kth = values[:, -1:]
    excess = (sims == kth).sum(1) > (values == kth).sum(1)  # equals that topk left out
    if excess.any():
        rows = excess.nonzero().squeeze(1)
        block, cut = sims[rows], kth[rows]
        equal = block == cut
        need = k - (block > cut).sum(1, keepdim=True)
        take = (block > cut) | (equal & (equal.cumsum(1) <= need))
        columns[rows] = take.nonzero()[:, 1].view(len(rows), k)
        values[rows] = block.gather(1, columns[rows])
    order = similarity_order(values, columns, k)
    return values.gather(1, order), columns.gather(1, order)


@torch.no_grad()
def nearest_neighbors(bank, bank_labels, queries, k, bank_index=None, bank_size=None):
    """(similarities, labels, bank indices) of the k nearest bank rows of every query
    row, most similar first, ties to the smaller index (rows L2-normalised).

    With `bank_index`, `bank` is this process's shard of a bank of `bank_size` rows
    (its rows `bank_index`, ascending): every process searches every query against its
    shard and the per-shard top-k are merged over processes into the top-k of the whole
    bank (a collective per chunk), exactly what one process holding all of it finds.
    """
    sharded = bank_index is not None
    bank_size = bank_size or len(bank)
    if not sharded:
        bank_index = torch.arange(len(bank), device=bank.device)
    k = min(k, bank_size)
    parts = [(torch.zeros(0, k, device=bank.device),
              torch.zeros(0, k, dtype=torch.long, device=bank.device),
              torch.zeros(0, k, dtype=torch.long, device=bank.device))]
    for chunk in queries.split(chunk_rows(bank_size)):  # the same chunks on every process
        if len(bank):
            sims, columns = top_k(chunk.to(bank.device) @ bank.T, min(k, len(bank)))
        else:  # an empty shard (more processes than bank rows)
            sims = torch.zeros(len(chunk), 0, device=bank.device)
            columns = torch.zeros(len(chunk), 0, dtype=torch.long, device=bank.device)
        found = (sims, bank_labels[columns], bank_index[columns])
        parts.append(merge_shards(*found, k) if sharded else found)
    return tuple(torch.cat(column) for column in zip(*parts))


def merge_shards(sims, labels, index, k):
    """The top-k over processes of each row's per-shard top-k (a collective). A shard
    of fewer than k rows is padded with -inf, which the k best of the others outrank."""
    missing = k - sims.shape[1]
    if missing:
        sims = torch.cat([sims, sims.new_full((len(sims), missing), -float("inf"))], 1)
        pad = index.new_full((len(index), missing), torch.iinfo(torch.long).max)
        index, labels = torch.cat([index, pad], 1), torch.cat([labels, pad], 1)
    sims, labels, index = (columns_of_every_process(t) for t in (sims, labels, index))
    order = similarity_order(sims, index, k)
    return sims.gather(1, order), labels.gather(1, order), index.gather(1, order)


def columns_of_every_process(tensor):
    """The (rows x c) tensors of every process as one (rows x W·c), rank by rank."""
    world_size = get_world_size()
    rows, columns = tensor.shape
    return gather(tensor).view(world_size, rows, columns).permute(1, 0, 2).reshape(
        rows, world_size * columns)


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


class Bank(namedtuple("Bank", "features labels index size", defaults=(None, None))):
    """A bank of L2-normalised training features and their labels; with `index` and
    `size`, this process's shard (rows `index`, ascending) of a bank of `size` rows."""


def knn_classifier(train_features, train_labels, test_features, test_labels, k, T=0.07,
                   num_classes=1000):
    """DINO's weighted k-NN on L2-normalised rows; returns (top-1, top-5) in percent."""
    return knn_eval(Bank(train_features, train_labels), test_features, test_labels, [k], T,
                    num_classes)[k]


def knn_eval(bank, test_features, test_labels, ks, T, num_classes):
    """{k: (top-1, top-5) in percent} for every k in `ks`, the neighbours searched once
    for the largest among the Bank `bank`. A sharded bank is searched on every process
    (see `nearest_neighbors`); every process then gets the whole bank's results."""
    sims, labels, _ = nearest_neighbors(bank.features, bank.labels, test_features, max(ks),
                                        bank.index, bank.size)
    total = test_labels.shape[0]
    results = {}
    for k in ks:
        counts = knn_correct(sims[:, :k], labels[:, :k], test_labels, T, num_classes)
        results[k] = (percent(counts[0], total), percent(counts[1], total))
    return results


@torch.no_grad()
def euclid_knn_predict(train_x, train_y, test_x, num_classes, k=5):
    """Majority vote of the k Euclidean-nearest training rows, as resa_cifar's monitor
    votes (SPEC §7): among classes with equal counts the smallest class id wins (their
    first maximum of `unique(return_counts=True)`; argmax returns the first maximum)."""
    k = min(k, train_x.shape[0])
    rows = max(1, MAX_DISTANCES // max(train_x.shape[0], 1))
    predictions = []
    for start in range(0, test_x.shape[0], rows):
        distances = torch.cdist(test_x[start:start + rows], train_x)
        labels = train_y[distances.topk(k, dim=1, largest=False).indices]
        counts = torch.zeros(labels.shape[0], num_classes, dtype=torch.long,
                             device=labels.device)
        counts.scatter_add_(1, labels, torch.ones_like(labels))
        predictions.append(counts.argmax(dim=1))
    return torch.cat(predictions) if predictions else test_x.new_zeros(0, dtype=torch.long)
