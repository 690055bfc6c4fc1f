"""Clustering properties of a pretrained checkpoint (SPEC §9, the paper's analysis).

    python eval_clusters.py --pretrained RUN/checkpoint.pth.tar --dataset cifar10 --dump_path OUT

For the encoding H, the projector's hidden layers and the embedding Z of the evaluated
branch (the momentum branch for ReSA), on a fixed seeded subset of the test split: the
silhouette with the classes as clusters, the ARI and NMI of k-means, and the weighted
k-NN top-1 against a subset of the train split. Writes clustering.json, out.log and
tsne.png (t-SNE of H and Z by class; for CIFAR-100 also by superclass). Under torchrun
every process extracts a share of the features; rank 0 alone computes the metrics and
writes the files. (`python tools/clusters.py ...`, its former name, runs this.)
"""
import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Subset

import args as cli
from flags import CLUSTERS
from method import METHODS, build_model
from src import config
from src.checkpoint import encoder_form, load_file, load_model_state, strip_prefix
from src.data.datasets import dataset_spec, eval_datasets
from src.distributed import is_main_process, run_distributed
from src.errors import UsageError, script_entry
from src.eval.clustering import (KMEANS_N_INIT, KnnVote, branch_features, check_clusterable,
                                 clustering_scores, feature_names, nearest_k, seeded_subset,
                                 tsne_2d)
from src.eval.features import Extraction
from src.eval.knn import Bank
from src.eval.pictures import draw_tsne
from src.eval.pretrained import load_encoder_state, load_pretrained_encoder
from src.logger import get_logger, save_results
from src.models import build_encoder
from src.seeding import seed_everything
from src.train.startup import start_run

RESULTS, PICTURE = "clustering.json", "tsne.png"
SUBSET_DEFAULTS = {"max_samples": 10000, "bank_samples": 50000, "tsne_samples": 2000}

OWN_FLAGS = [
    ("clustering", CLUSTERS, ("--features",), dict(
        type=str, nargs="+", default=None, metavar="NAME",
        help="features to measure: encoding, projector_hidden1, projector_hidden2, ..., "
        "embedding (default: all that the checkpoint has; an encoder-only file has only "
        "encoding)")),
    ("clustering", CLUSTERS, ("--max_samples",), dict(
        type=int, default=None,
        help="size of the seeded subset of the test split on which every metric is "
        "computed (default: 10000, or the whole split when smaller)")),
    ("clustering", CLUSTERS, ("--bank_samples",), dict(
        type=int, default=None,
        help="size of the seeded subset of the train split used as the k-NN bank "
        "(default: 50000, or the whole split when smaller)")),
    ("clustering", CLUSTERS, ("--tsne_samples",), dict(
        type=int, default=None,
        help="samples of the t-SNE picture, taken from the measured subset; 0 = no "
        "picture (default: 2000, or the whole measured subset when smaller)")),
    ("clustering", CLUSTERS, ("--subset_seed",), dict(
        type=int, default=0, help="seed of the subsets of the test and train splits")),
    ("clustering", CLUSTERS, ("--kmeans_seed",), dict(
        type=int, default=0, help="seed of k-means and of t-SNE")),
    ("clustering", CLUSTERS, ("--random_baseline",), dict(
        action="store_true",
        help="also measure `random_encoding`: the encoder that pretraining with this "
        "--seed starts from (the network the checkpoint records: arch, stem and "
        "initialisation; these flags' for a file that records none), as a first row and a "
        "first t-SNE panel")),
    ("clustering", CLUSTERS, ("--kmeans_n_init",), dict(
        type=int, default=KMEANS_N_INIT,
        help="k-means restarts (the best one is kept); fewer make ImageNet's 1000 "
        "clusters faster")),
]


@dataclass(frozen=True)
class Analysis:
    """The configs of this script; `args` (the flags) rebuilds a checkpoint's method."""
    run: config.Run
    data: config.Data
    encoder: config.Encoder
    args: argparse.Namespace


def saved_flags(args, checkpoint):
    """These flags, overridden by those the checkpoint records (a file that records
    none, such as the authors', is taken to have these flags)."""
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    saved = saved if isinstance(saved, dict) else {}
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items()
                                                  if k in vars(args)}}), saved


def saved_method(flags, saved):
    """The method the checkpoint was trained with, built from its flags `flags`."""
    name = saved.get("method", "resa")  # files from before --method are ReSA's
    hyper = {h.name: h.default if getattr(flags, h.name, None) is None else getattr(flags, h.name)
             for h in METHODS[name].HYPER}
    return build_model(config.Method(name, hyper), cli.pick(config.Heads, flags),
                       cli.encoder_config(flags))


def load_branch(analysis, seed, device):
    """(encoder, projector or None, description, config.Encoder it was built with) of
    the evaluated branch in --pretrained, read once; an empty --pretrained is a random
    encoder alone."""
    path = analysis.args.pretrained
    if not path:
        encoder = random_encoder(analysis.encoder, seed, device)
        return encoder, None, "random initialisation", analysis.encoder
    checkpoint = load_file(path)
    flags, saved = saved_flags(analysis.args, checkpoint)
    built_as = cli.encoder_config(flags)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    state = strip_prefix(state, "module.") if isinstance(state, dict) and any(
        str(k).removeprefix("module.").startswith("projector.") for k in state) else None
    if state is None:  # an encoder alone
        encoder, _ = build_encoder(built_as)
        form = load_encoder_state(encoder.to(device), checkpoint, path)
        get_logger().info(f"{path} has no projector: only the encoding is measured")
        return encoder, None, form, built_as
    method = saved_method(flags, saved)
    load_model_state(method, state, path)
    form = encoder_form(checkpoint)[1]
    projector = method.evaluated_projector()
    get_logger().info(f"loaded {path} ({form}); its projector: "
                      f"{len(feature_names(projector)) - 1} layers")
    return method.evaluated_encoder().to(device), projector.to(device), form, built_as


def random_encoder(encoder, seed, device):
    """The encoder that main.py with these flags starts from (same seed, stem and
    initialisation: config.Encoder `encoder`), rank 0's on every process."""
    seed_everything(seed)
    model, _ = build_encoder(encoder)
    load_pretrained_encoder(model.to(device), "")
    return model

def chosen_features(requested, available, path):
    """The --features names in depth order; a name the checkpoint lacks is a UsageError."""
    if requested is None:
        return available
    for name in requested:
        if name not in available:
            if available == ["encoding"] and (name == "embedding"
                                              or name.startswith("projector_hidden")):
                raise UsageError(f"--features {name}: {path or 'a random encoder'} has no "
                                 f"projector, only 'encoding' can be measured")
            raise UsageError(f"unknown feature {name!r} in --features; this checkpoint gives "
                             f"{', '.join(available)}")
    return [name for name in available if name in requested]


def subset_size(args, flag, available, split):
    """The size of a --flag subset: the default capped at `available`, or the value
    given, which must fit."""
    requested = getattr(args, flag)
    if requested is None:
        return min(SUBSET_DEFAULTS[flag], available)
    if requested > available:
        raise UsageError(f"--{flag} {requested} exceeds the {available} samples of the {split}")
    return requested


def check_flags(args):
    """Subset sizes and restarts must be positive; t-SNE needs 2 points (0: no picture)."""
    for flag in ("max_samples", "bank_samples", "kmeans_n_init"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be at least 1, got {value}")
    if args.tsne_samples is not None and (args.tsne_samples < 0 or args.tsne_samples == 1):
        raise UsageError(f"--tsne_samples must be 0 (no picture) or at least 2, got "
                         f"{args.tsne_samples}")


def picture(args, features, labels, size, test_index, classes):
    """t-SNE of H and Z (H alone without a projector) of `size` seeded samples of the
    measured subset, by class, and by superclass too where the dataset has them."""
    part = seeded_subset(len(labels), size, args.subset_seed)
    titles = {"random_encoding": "random encoder, H", "encoding": "encoding H",
              "embedding": "embedding Z"}
    points = {title: tsne_2d(features[name][part.to(features[name].device)], args.kmeans_seed)
              for name, title in titles.items() if name in features}
    rows = [(labels[part.numpy()], list(classes), "classes")]
    superclasses = dataset_spec(args.dataset).superclasses
    if superclasses:
        coarse, names = superclasses(args.data_path)
        rows.append((coarse[test_index.numpy()][part.numpy()], names, "superclasses"))
    path = Path(args.dump_path) / PICTURE
    draw_tsne(path, points, rows)
    return path


def table(results):
    """The results as aligned text lines, one row per feature."""
    lines = [f"{'feature':<20}{'silhouette':>11}{'(std)':>8}{'ARI':>8}{'NMI':>8}"
             f"{'k-NN top-1':>12}"]
    for name, r in results.items():
        lines.append(f"{name:<20}{r['silhouette_mean']:>11.4f}{r['silhouette_std']:>8.4f}"
                     f"{r['ari']:>8.4f}{r['nmi']:>8.4f}{r['knn_top1']:>12.2f}")
    return lines


def measured_subsets(args, train, test):
    """(test subset, bank subset, t-SNE size) of the flags, checked against the data."""
    for split, dataset in (("train", train), ("test", test)):
        if len(dataset) == 0:
            raise UsageError(f"the {split} split of --dataset {args.dataset} is empty")
    measured = subset_size(args, "max_samples", len(test), "test split")
    tsne_size = subset_size(args, "tsne_samples", measured, "measured subset (--max_samples)")
    test_index = seeded_subset(len(test), measured, args.subset_seed)
    bank_index = seeded_subset(len(train), subset_size(args, "bank_samples", len(train),
                                                       "train split"), args.subset_seed)
    check_clusterable(torch.as_tensor(test.targets)[test_index])
    return test_index, bank_index, tsne_size


def analyse(analysis, processes):
    args, device = analysis.args, processes.device
    check_flags(args)
    started = start_run(analysis.run, processes, workers=args.workers)
    log = started.log
    encoder, projector, form, built_as = load_branch(analysis, started.seed, device)
    names = chosen_features(args.features, feature_names(projector), args.pretrained)
    train, test = eval_datasets(analysis.data, args.crops_size[0], args.num_classes, "plain")
    test_index, bank_index, tsne_size = measured_subsets(args, train, test)
    baseline = None
    if args.random_baseline:
        baseline = random_encoder(built_as, started.seed, device)  # the checkpoint's network
        names.insert(0, "random_encoding")
    how = Extraction(args.batch_size, args.workers, args.precision)
    features, labels = branch_features(encoder, projector, Subset(test, test_index.tolist()),
                                       how, device, "test", baseline)
    bank, bank_labels = branch_features(encoder, projector, Subset(train, bank_index.tolist()),
                                        how, device, "bank", baseline)
    if not is_main_process():
        return None  # no collective follows: the other ranks are done

    k = nearest_k(args.nb_knn)
    log.info(f"measuring {', '.join(names)} on {len(test_index)} test samples of "
             f"{len(test.classes)} classes; weighted {k}-NN against {len(bank_index)} "
             f"train samples")
    vote = KnnVote(k, args.knn_temperature, args.num_classes)
    results = {name: clustering_scores(features[name], labels, Bank(bank[name], bank_labels),
                                       vote, seed=args.kmeans_seed, n_init=args.kmeans_n_init)
               for name in names}
    for line in table(results):
        log.info(line)
    meta = {"checkpoint": args.pretrained, "form": form, "dataset": args.dataset,
            "samples": len(test_index), "bank_samples": len(bank_index),
            "classes": len(test.classes), "knn_k": k, "subset_seed": args.subset_seed,
            "kmeans_seed": args.kmeans_seed}
    log.info(f"results written to {save_results(args.dump_path, RESULTS, {**results, 'meta': meta})}")
    if tsne_size:
        path = picture(args, features, labels.cpu().numpy(), tsne_size, test_index, test.classes)
        log.info(f"t-SNE of {tsne_size} samples drawn in {path}")
    return results


@script_entry
def main(argv=None):
    flags = cli.get_args(argv, "clusters", own_flags=OWN_FLAGS)
    analysis = Analysis(cli.run_config(flags), cli.pick(config.Data, flags),
                        cli.encoder_config(flags), flags)
    run_distributed(analyse, analysis)


if __name__ == "__main__":
    main()
