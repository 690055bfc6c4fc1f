"""The paper's analysis across methods: for several pretrained checkpoints, the
clustering of the encoding H and of the embedding Z (the silhouette with the classes as
clusters: its mean and the std of its per-class means; the k-means ARI), the weighted k-NN and the linear probe, in one table
and one figure.

    python tools/compare_methods.py --runs resa=runs/resa byol=runs/byol random= \\
        --out runs/compare -- --dataset demo --workers 2 --seed 0

Each run is NAME=PATH: PATH is a main.py dump folder (its checkpoint.pth.tar), a
checkpoint file, or empty for the randomly initialised encoder that pretraining with
--seed starts from (H only). The flags after `--` go to every evaluation script
(eval_clusters.py, eval_knn.py, eval_linear.py, each run as a subprocess, its command
printed); --linear_flags go to eval_linear.py alone. Writes, in --out: one folder per
run and script, table.md, results.json and comparison.png. Run again with the same
--out, it reuses the results that are there.
"""
import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"clusters": ("eval_clusters.py", "clustering.json"),
           "knn": ("eval_knn.py", "knn_results.json"),
           "linear": ("eval_linear.py", "linear_results.json")}
FEATURES = (("encoding", "H"), ("embedding", "Z"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=PATH",
                        help="the runs to compare, in table order: NAME=DUMP_FOLDER, "
                        "NAME=CHECKPOINT_FILE, or NAME= for the random initialisation")
    parser.add_argument("--out", required=True, help="folder of every output")
    parser.add_argument("--knn_k", type=int, default=20,
                        help="the k of the weighted k-NN top-1 reported (one of the "
                        "scripts' --nb_knn, 5 10 15 20 25 by default) (default: 20)")
    parser.add_argument("--linear_flags", default="--epochs 10 --scheduler cos "
                        "--lr_classifier 0.1 --batch_size 64",
                        help="flags of eval_linear.py alone, one string, given as "
                        "--linear_flags='...' (default: "
                        "'%(default)s', the quick start's probe)")
    parser.add_argument("--clusters_flags", default="--features encoding embedding",
                        help="flags of eval_clusters.py alone, one string (as "
                        "--clusters_flags='...'); --features "
                        "encoding embedding is dropped to encoding for the random "
                        "initialisation (default: '%(default)s')")
    parser.add_argument("eval_flags", nargs=argparse.REMAINDER,
                        help="after `--`: flags of every evaluation script (--dataset, "
                        "--data_path, --workers, --seed, --batch_size, ...)")
    args = parser.parse_args(argv)
    args.eval_flags = args.eval_flags[1:] if args.eval_flags[:1] == ["--"] else args.eval_flags
    args.runs = [checked_run(spec, parser) for spec in args.runs]
    if len({name for name, _ in args.runs}) < len(args.runs):
        parser.error("--runs: every NAME must be different")
    return args


def checked_run(spec, parser):
    """(name, checkpoint path or '') of a NAME=PATH spec; a bad one is a usage error."""
    name, equals, path = spec.partition("=")
    if not equals or not name:
        parser.error(f"--runs {spec!r}: expected NAME=PATH (NAME= for a random encoder)")
    if not path:
        return name, ""
    path = Path(path)
    checkpoint = path / "checkpoint.pth.tar" if path.is_dir() else path
    if not checkpoint.is_file():
        parser.error(f"--runs {spec!r}: no checkpoint at {checkpoint}")
    return name, str(checkpoint)


def fail(message, code=2):
    """One line on stderr and the exit code: 2 for bad input, a script's own otherwise."""
    print(f"compare_methods.py: error: {message}", file=sys.stderr)
    sys.exit(code)


def evaluate(kind, checkpoint, dump, args):
    """The results of one evaluation script on one checkpoint, run unless already there."""
    script, results = SCRIPTS[kind]
    own = {"clusters": args.clusters_flags, "linear": args.linear_flags}.get(kind, "")
    own = shlex.split(own)
    if kind == "clusters" and not checkpoint and "embedding" in own:
        own.remove("embedding")  # a random encoder has no projector
    if not (dump / results).is_file():
        command = [sys.executable, script, *args.eval_flags, *own, "--pretrained", checkpoint,
                   "--dump_path", str(dump)]
        print("\n$ " + shlex.join(["python", *command[1:]]), flush=True)
        code = subprocess.run(command, cwd=REPO).returncode
        if code:
            fail(f"{script} failed on {checkpoint or 'a random encoder'} (exit code {code}; "
                 f"its log: {dump / 'out.log'})", code)
    return json.loads((dump / results).read_text())


def scores(name, checkpoint, args):
    """One row: k-NN and linear top-1, and the silhouette and ARI of H and Z."""
    out = Path(args.out) / name
    clusters = evaluate("clusters", checkpoint, out / "clusters", args)
    knn = evaluate("knn", checkpoint, out / "knn", args)
    linear = evaluate("linear", checkpoint, out / "linear", args)
    if str(args.knn_k) not in knn:
        fail(f"--knn_k {args.knn_k} is not among the k of {out / 'knn'} ({', '.join(knn)})")
    row = {"checkpoint": checkpoint, f"knn_top1_k{args.knn_k}": knn[str(args.knn_k)]["top1"],
           "linear_top1": linear["last_acc"], "linear_best_top1": linear["best_acc"]}
    for feature, letter in FEATURES:
        if feature in clusters:
            row.update({f"{metric}_{letter}": clusters[feature][metric]
                        for metric in ("silhouette_mean", "silhouette_std", "ari")})
    return row


def markdown(rows, knn_k):
    """The table: one row per run, '–' where a run has no Z."""
    lines = [f"| run | k-NN top-1 (k={knn_k}) | linear top-1 | silhouette H (± class std) | ARI H "
             "| silhouette Z (± class std) | ARI Z |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        cells = [f"{row[f'knn_top1_k{knn_k}']:.1f}", f"{row['linear_top1']:.1f}"]
        for _, letter in FEATURES:
            if f"ari_{letter}" in row:
                cells += [f"{row[f'silhouette_mean_{letter}']:.3f} ± "
                          f"{row[f'silhouette_std_{letter}']:.3f}", f"{row[f'ari_{letter}']:.3f}"]
            else:
                cells += ["–", "–"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bars(axis, rows, series, title, legend="best"):
    """Grouped bars, one group per run: `series` is [(label, key, error key or None)]."""
    import numpy as np
    x, width = np.arange(len(rows)), 0.8 / len(series)
    for i, (label, key, error) in enumerate(series):
        values = [row.get(key, np.nan) for row in rows.values()]
        errors = [row.get(error, np.nan) for row in rows.values()] if error else None
        axis.bar(x + (i - (len(series) - 1) / 2) * width, values, width, yerr=errors,
                 capsize=3, label=label)
    axis.set_xticks(x, list(rows), rotation=30, ha="right")
    axis.set_title(title)
    axis.axhline(0, color="black", linewidth=0.5)
    axis.legend(fontsize=8, loc=legend)


def figure(rows, knn_k, path):
    """Silhouette (mean, and the std of its per-class means) and ARI of H against Z per
    run, and the two accuracies."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    bars(axes[0], rows, [(f"{feature} {letter}", f"silhouette_mean_{letter}",
                          f"silhouette_std_{letter}") for feature, letter in FEATURES],
         "silhouette (bars: std of the class means)")
    bars(axes[1], rows, [(f"{feature} {letter}", f"ari_{letter}", None)
                         for feature, letter in FEATURES], "k-means ARI")
    bars(axes[2], rows, [(f"weighted {knn_k}-NN", f"knn_top1_k{knn_k}", None),
                         ("linear probe", "linear_top1", None)], "top-1 accuracy (%)",
         legend="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {name: scores(name, checkpoint, args) for name, checkpoint in args.runs}
    table = markdown(rows, args.knn_k)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(
        {"runs": rows, "eval_flags": args.eval_flags, "linear_flags": args.linear_flags,
         "clusters_flags": args.clusters_flags}, indent=2))
    figure(rows, args.knn_k, out / "comparison.png")
    print(f"\n{table}\nwritten: {out / 'table.md'}, {out / 'results.json'}, "
          f"{out / 'comparison.png'}")


if __name__ == "__main__":
    main()
