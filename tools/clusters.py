"""Clustering properties of a pretrained checkpoint (SPEC §9, the paper's analysis).

    python tools/clusters.py --pretrained RUN/checkpoint.pth.tar --dataset cifar10 --dump_path OUT

For the encoding H, the projector's hidden layers and the embedding Z of the momentum
branch, on a fixed seeded subset of the test split: the silhouette with the classes
as clusters, the ARI and NMI of k-means, and the weighted k-NN top-1 against a subset
of the train split. Writes clustering.json, out.log and tsne.png (t-SNE of H and Z
by class; for CIFAR-100 also by superclass). Under torchrun every process extracts a
share of the features; rank 0 alone computes the metrics and writes the files.
"""
import math
import pickle
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch.utils.data import Subset

matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from args import CLUSTERS, get_args  # noqa: E402
from src.checkpoint import load_file, load_model_state, strip_prefix  # noqa: E402
from src.clustering import (KMEANS_N_INIT, branch_features, check_clusterable,  # noqa: E402
                            clustering_scores, feature_names, nearest_k, seeded_subset,
                            tsne_2d)
from src.distributed import is_main_process, run_distributed  # noqa: E402
from src.errors import UsageError, script_entry  # noqa: E402
from src.eval_data import eval_datasets  # noqa: E402
from src.logger import get_logger, save_results  # noqa: E402
from src.models import build_encoder, build_projector, pretraining_encoder  # noqa: E402
from src.pretrained import load_encoder_state, load_pretrained_encoder  # noqa: E402
from src.runtime import start_run  # noqa: E402
from src.seeding import seed_everything  # noqa: E402

RESULTS, PICTURE = "clustering.json", "tsne.png"
SUBSET_DEFAULTS = {"max_samples": 10000, "bank_samples": 50000, "tsne_samples": 2000}
MAX_LEGEND = 100  # more classes than this get no legend: it could not be read

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
        "--seed (and --arch, --dataset, --stem) starts from, as a first row and a first "
        "t-SNE panel")),
    ("clustering", CLUSTERS, ("--kmeans_n_init",), dict(
        type=int, default=KMEANS_N_INIT,
        help="k-means restarts (the best one is kept); fewer make ImageNet's 1000 "
        "clusters faster")),
]


def momentum_projector(checkpoint, path, feature_dim, device):
    """The momentum projector of a full checkpoint, or None (an encoder-only file).

    Its depth and widths are read from the Linear weights' shapes, so the authors'
    files, which hold no `args`, load as well as ours.
    """
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        return None
    state = strip_prefix({k.removeprefix("module."): v for k, v in state.items()},
                         "momentum_projector.")
    linears = sorted((int(k.split(".")[0]), v) for k, v in state.items()
                     if k.split(".")[0].isdigit() and k.endswith(".weight") and v.ndim == 2)
    if not linears:
        return None
    weights = [w for _, w in linears]
    if weights[0].shape[1] != feature_dim:
        raise UsageError(f"{path}: its momentum projector takes {weights[0].shape[1]} features "
                         f"but the {feature_dim}-feature encoder gives another size")
    projector = build_projector(feature_dim, len(weights), weights[0].shape[0],
                                weights[-1].shape[0])
    load_model_state(projector, state, f"{path} (momentum projector)")
    return projector.to(device)


def load_branch(args):
    """(encoder, projector or None, description) of the momentum branch in
    --pretrained, read once; an empty --pretrained is a random encoder alone."""
    log = get_logger()
    if not args.pretrained:
        return random_encoder(args), None, "random initialisation"
    encoder, feature_dim = build_encoder(args.arch, args.stem == "cifar")
    encoder.to(args.device)
    checkpoint = load_file(args.pretrained)
    form = load_encoder_state(encoder, checkpoint, args.pretrained)
    projector = momentum_projector(checkpoint, args.pretrained, feature_dim, args.device)
    if projector is None:
        log.info(f"{args.pretrained} has no projector: only the encoding is measured")
    else:
        log.info(f"momentum projector: {len(feature_names(projector)) - 1} layers")
    return encoder, projector, form


def random_encoder(args):
    """The encoder that main.py with these flags starts from (same seed, stem and
    initialisation), rank 0's on every process."""
    seed_everything(args.seed)
    encoder, _ = pretraining_encoder(args.arch, args.dataset, args.stem)
    load_pretrained_encoder(encoder.to(args.device), "")
    return encoder


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


def cifar100_superclasses(data_path):
    """(coarse label of every test image, the 20 superclass names), read from the
    dataset's own files in --data_path (cifar-100-python/test and meta)."""
    folder = Path(data_path) / "cifar-100-python"
    try:
        with open(folder / "test", "rb") as f:
            coarse = pickle.load(f, encoding="latin1")["coarse_labels"]
        with open(folder / "meta", "rb") as f:
            names = pickle.load(f, encoding="latin1")["coarse_label_names"]
    except (OSError, KeyError, pickle.UnpicklingError) as err:
        raise UsageError(f"cannot read CIFAR-100's superclasses from {folder} "
                         f"({type(err).__name__}: {err})")
    return np.asarray(coarse), list(names)


def class_colours(n):
    """One colour per class: the qualitative tables when they suffice, else hues."""
    if n <= 10:
        return plt.get_cmap("tab10")(np.arange(n))
    if n <= 20:
        return plt.get_cmap("tab20")(np.arange(n))
    return plt.get_cmap("hsv")(np.linspace(0, 1, n, endpoint=False))


def draw_tsne(path, points, rows):
    """Save a grid of t-SNE scatter plots: one column per feature (`points`: {title:
    n x 2 array}), one row per labelling (`rows`: [(labels, class names, heading)])."""
    fig, axes = plt.subplots(len(rows), len(points), figsize=(5 * len(points), 5 * len(rows)),
                             squeeze=False)
    for row, (labels, names, heading) in zip(axes, rows):
        colours = class_colours(len(names))
        for ax, (title, xy) in zip(row, points.items()):
            size = min(30.0, max(3.0, 12000 / len(xy)))  # visible dots, few or many
            ax.scatter(xy[:, 0], xy[:, 1], c=colours[labels], s=size, linewidths=0)
            ax.set_title(f"{title}, {heading}")
            ax.set_xticks([])
            ax.set_yticks([])
        if len(names) <= MAX_LEGEND:
            handles = [Line2D([], [], marker="o", linestyle="", color=colour, label=name)
                       for name, colour in zip(names, colours)]
            row[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1),
                           frameon=False, fontsize=8 if len(names) <= 20 else 6,
                           ncol=math.ceil(len(names) / 25))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def picture(args, features, labels, size, test_index, classes):
    """t-SNE of H and Z (H alone without a projector) of `size` seeded samples of the
    measured subset, by class, and for CIFAR-100 by superclass too."""
    part = seeded_subset(len(labels), size, args.subset_seed)
    titles = {"random_encoding": "random encoder, H", "encoding": "encoding H",
              "embedding": "embedding Z"}
    points = {title: tsne_2d(features[name][part.to(features[name].device)], args.kmeans_seed)
              for name, title in titles.items() if name in features}
    rows = [(labels[part.numpy()], list(classes), "classes")]
    if args.dataset == "cifar100":
        coarse, names = cifar100_superclasses(args.data_path)
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


def analyse(args):
    check_flags(args)
    log = start_run(args)[0]
    encoder, projector, form = load_branch(args)
    names = chosen_features(args.features, feature_names(projector), args.pretrained)
    train, test = eval_datasets(args, "plain")
    for split, dataset in (("train", train), ("test", test)):
        if len(dataset) == 0:
            raise UsageError(f"the {split} split of --dataset {args.dataset} is empty")
    measured = subset_size(args, "max_samples", len(test), "test split")
    tsne_size = subset_size(args, "tsne_samples", measured, "measured subset (--max_samples)")
    test_index = seeded_subset(len(test), measured, args.subset_seed)
    bank_index = seeded_subset(len(train), subset_size(args, "bank_samples", len(train),
                                                       "train split"), args.subset_seed)
    check_clusterable(torch.as_tensor(test.targets)[test_index])

    baseline = None
    if args.random_baseline:
        baseline = random_encoder(args)
        names.insert(0, "random_encoding")
    features, labels = branch_features(encoder, projector, Subset(test, test_index.tolist()),
                                       args.batch_size, args.workers, args.device, "test",
                                       baseline, args.precision)
    bank, bank_labels = branch_features(encoder, projector, Subset(train, bank_index.tolist()),
                                        args.batch_size, args.workers, args.device, "bank",
                                        baseline, args.precision)
    if not is_main_process():
        return None  # no collective follows: the other ranks are done

    k = nearest_k(args.nb_knn)
    log.info(f"measuring {', '.join(names)} on {len(test_index)} test samples of "
             f"{len(test.classes)} classes; weighted {k}-NN against {len(bank_index)} "
             f"train samples")
    results = {name: clustering_scores(features[name], labels, bank[name], bank_labels, k=k,
                                       temperature=args.knn_temperature,
                                       num_classes=args.num_classes, seed=args.kmeans_seed,
                                       n_init=args.kmeans_n_init)
               for name in names}
    for line in table(results):
        log.info(line)
    meta = {"checkpoint": args.pretrained, "form": form, "dataset": args.dataset,
            "samples": len(test_index), "bank_samples": len(bank_index),
            "classes": len(test.classes), "knn_k": k, "subset_seed": args.subset_seed,
            "kmeans_seed": args.kmeans_seed}
    path = save_results(args.dump_path, RESULTS, {**results, "meta": meta})
    log.info(f"results written to {path}")
    if tsne_size:
        path = picture(args, features, labels.cpu().numpy(), tsne_size, test_index,
                       test.classes)
        log.info(f"t-SNE of {tsne_size} samples drawn in {path}")
    return results


@script_entry
def main(argv=None):
    run_distributed(analyse, get_args(argv, "clusters", own_flags=OWN_FLAGS))


if __name__ == "__main__":
    main()
