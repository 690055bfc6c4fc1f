"""Quick start on a CPU: pretrain ReSA on the demo data, then compare the pretrained
encoder with a randomly initialised one by weighted k-NN, a linear probe and their
clustering properties, with a t-SNE picture of both.

Every step is an ordinary command of this repository, printed before it runs; run
again with the same --out, each step resumes from (or reuses) what it left there.
"""
import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(command):
    command = [str(part) for part in command]
    shown = ["python" if part == sys.executable else part for part in command]
    print("\n$ " + shlex.join(shown), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="folder for every output")
    parser.add_argument("--epochs", type=int, default=8, help="pretraining epochs")
    parser.add_argument("--linear_epochs", type=int, default=5, help="linear-probe epochs")
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers")
    parser.add_argument("--data_path", default=None,
                        help="where the demo data is generated (default: data/demo)")
    parser.add_argument("--tsne_samples", type=int, default=500,
                        help="validation images in the t-SNE picture (0: no picture)")
    args = parser.parse_args()

    start = time.perf_counter()
    out = Path(args.out)
    demo = ["--dataset", "demo", "--workers", args.workers, "--seed", 0]
    if args.data_path:
        demo += ["--data_path", args.data_path]
    pretrain = out / "pretrain"
    # a short run: a faster EMA (0.99) lets the momentum encoder follow within minutes;
    # the online monitor is off, since the steps below measure the result
    short = ["--warmup_epochs", args.epochs] if args.epochs < 2 else []  # default warm-up: 2
    run([sys.executable, "main.py", *demo, "--epochs", args.epochs, *short, "--batch_size", 64,
         "--momentum", 0.99, "--eval_every", 0, "--dump_path", pretrain])

    rows = []
    for name, checkpoint in (("random init", ""),
                             (f"ReSA, {args.epochs} epochs", pretrain / "checkpoint.pth.tar")):
        tag = "random" if not checkpoint else "resa"
        run([sys.executable, "eval_knn.py", *demo, "--pretrained", checkpoint,
             "--batch_size", 250, "--dump_path", out / f"knn_{tag}"])
        run([sys.executable, "eval_linear.py", *demo, "--pretrained", checkpoint,
             "--epochs", args.linear_epochs, "--scheduler", "cos", "--lr_classifier", 0.1,
             "--batch_size", 64, "--dump_path", out / f"linear_{tag}"])
        knn = json.loads((out / f"knn_{tag}" / "knn_results.json").read_text())
        linear = json.loads((out / f"linear_{tag}" / "linear_results.json").read_text())
        rows.append((name, knn["20"]["top1"], knn["5"]["top1"], linear["last_acc"]))

    clusters = out / "clusters"
    run([sys.executable, "eval_clusters.py", *demo,
         "--pretrained", pretrain / "checkpoint.pth.tar", "--random_baseline",
         "--features", "encoding", "embedding", "--batch_size", 250,
         "--tsne_samples", args.tsne_samples, "--dump_path", clusters])
    scores = json.loads((clusters / "clustering.json").read_text())

    print(f"\nDemo data, ResNet-18, 500 validation images "
          f"({(time.perf_counter() - start) / 60:.1f} min in all):")
    print(f"{'encoder':<20}{'k-NN top-1 (k=20)':>20}{'k-NN top-1 (k=5)':>19}"
          f"{'linear top-1':>15}")
    for name, knn20, knn5, linear in rows:
        print(f"{name:<20}{knn20:>20.1f}{knn5:>19.1f}{linear:>15.1f}")
    print(f"\n{'features':<28}{'silhouette':>11}{'k-means ARI':>13}")
    for name, label in (("random_encoding", "random init, encoding H"),
                        ("encoding", "ReSA, encoding H"), ("embedding", "ReSA, embedding Z")):
        print(f"{label:<28}{scores[name]['silhouette_mean']:>11.3f}{scores[name]['ari']:>13.3f}")
    if args.tsne_samples:
        print(f"\nt-SNE of both encoders: {clusters / 'tsne.png'}")


if __name__ == "__main__":
    main()
