"""Weighted k-NN evaluation of a pretrained encoder, as in DINO (SPEC §6).

`python eval_knn.py ...` runs one process; under `torchrun` every process encodes a
shard of the images, the feature banks are gathered by index on every process, and
each process then votes for its share of the test images. `--use_cuda False` keeps
the banks in CPU memory.
"""
import sys

import torch

from args import get_args
from src.checkpoint import plain_args
from src.data import dataset_info
from src.distributed import (all_reduce_sum, get_rank, get_world_size, is_main_process,
                             run_distributed)
from src.engine import extract_features
from src.errors import exit_on_usage_error
from src.eval_data import eval_datasets
from src.logger import save_results, setup_logging
from src.metrics import percent
from src.models import build_encoder
from src.pretrained import load_pretrained_encoder
from src.runtime import prepare_dump_path, seed_everything

RESULTS = "knn_results.json"
MAX_SIMILARITIES = 2 ** 27  # entries of one test-chunk x bank similarity block (512 MB)


def chunk_rows(bank_size):
    """Test rows per similarity block: 1000 for small banks, ~100 for ImageNet's 1.28M."""
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


def evaluate(args):
    seed_everything(args.seed)
    prepare_dump_path(args.dump_path)
    log = setup_logging(args.dump_path, args.rank)
    log.info("command: " + " ".join(sys.argv))
    log.info(f"arguments: {plain_args(args)}")

    encoder, _ = build_encoder(args.arch, dataset_info(args.dataset).small_images)
    load_pretrained_encoder(encoder.to(args.device).eval(), args.pretrained)
    train, val = eval_datasets(args, "plain")
    log.info(f"{len(train)} train and {len(val)} val images of {len(train.classes)} "
             f"classes; {args.world_size} process(es) on {args.device}")
    torch.backends.cudnn.benchmark = True

    bank_device = args.device if args.use_cuda else torch.device("cpu")
    banks = [extract_features(encoder, dataset, args.batch_size, args.workers, args.device,
                              bank_device=bank_device, normalize=True, desc=f"{name} features")
             for name, dataset in (("train", train), ("val", val))]
    log.info(f"features ready: train {tuple(banks[0][0].shape)}, val "
             f"{tuple(banks[1][0].shape)} on {bank_device}")
    results = knn_eval(*banks[0], *banks[1], args.nb_knn, args.knn_temperature,
                       args.num_classes, args.device)
    for k, (top1, top5) in results.items():
        log.info(f"{k}-NN (T={args.knn_temperature}): top-1 {top1:.2f} top-5 {top5:.2f}")
    if is_main_process():
        save_results(args.dump_path, RESULTS,
                     {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()})
    return results


@exit_on_usage_error
def main(argv=None):
    run_distributed(evaluate, get_args(argv))


if __name__ == "__main__":
    main()
