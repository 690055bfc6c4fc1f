"""Fashion-MNIST on a CPU at equal minutes: ReSA, BYOL, SwAV and SimCLR, each given the
same training-time budget, against the random initialisation they all start from.

    python tools/fashion_mnist.py --out runs/fashion_mnist --minutes 30

A short main.py run times each method's step first (--timing_steps); its run then gets
the whole number of epochs that fills --minutes best (--epochs fixes them), and the
minutes it really trained are read from main.py's TensorBoard events (evaluations
excluded). main.py's online monitor (src/eval/monitor.py: weighted 20-NN, Euclidean
5-NN, an Adam linear probe on all 60,000 training and 10,000 test images; silhouette
and k-means ARI of H and Z) measures the random encoder (OUT/random/init.pth.tar) and
each run after epoch 1, every --eval_every epochs and the last: OUT/curve.png. Then
eval_clusters.py on each final checkpoint; tables printed and in OUT/results.json.
Every step prints its command (python main.py ...) and runs it in this process; rerun
with the same --out, what is finished is reused, an interrupted run continues.
"""
import argparse
import json
import os
import runpy
import shlex
import sys
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import matplotlib.pyplot as plt  # noqa: E402

import args  # noqa: E402
from method import METHODS, build_model  # noqa: E402
from src.checkpoint import load_file, save_atomic, with_module_prefix  # noqa: E402
from src.distributed import init_distributed  # noqa: E402
from src.eval.monitor import OnlineMonitor  # noqa: E402
from src.seeding import seed_everything  # noqa: E402

CHECKPOINT, CLUSTERING = "checkpoint.pth.tar", "clustering.json"  # what the scripts write
KNN, LINEAR = "wknn20_top1", "linear_top1"  # the two panels of the curve
FEATURES = ("encoding", "embedding")  # H and Z
NAMES = {"resa": "ReSA", "byol": "BYOL", "swav": "SwAV", "simclr": "SimCLR"}
COLOURS = {"resa": "tab:red", "byol": "tab:blue", "swav": "tab:green", "simclr": "tab:purple"}


def recipe_flags(opts, method, epochs):
    """(the dataset flags every script reads, main.py's other flags for `method`): one
    recipe for all; the EMA methods share --momentum, ReSA alone reads --temperature
    and --pred (the others keep their papers' temperature and heads)."""
    common = ["--dataset", "fashion_mnist", "--stem", opts.stem, "--crops_size", opts.crops_size,
              "--seed", opts.seed, "--workers", opts.workers]
    pretrain = ["--method", method, "--size_dataset", opts.size_dataset, "--epochs", epochs,
                "--batch_size", opts.batch_size, "--lr", opts.lr,
                "--warmup_epochs", opts.warmup_epochs, "--crops_min_scale", opts.crops_min_scale,
                "--solarization_prob", opts.solarization_prob,
                "--eval_every", opts.eval_every, "--checkpoint_minutes", 0]
    if method in ("resa", "byol"):
        pretrain += ["--momentum", opts.momentum]
    if method == "resa":
        pretrain += ["--temperature", opts.temperature, "--pred" if opts.pred else "--no_pred"]
    return [str(f) for f in common], [str(f) for f in pretrain]


def run_script(script, argv):
    """`python script argv`, printed, run in this process (runpy: the script is called,
    not imported); a failure ends the tool with the script's exit code."""
    print(f"\n$ python {script} {shlex.join(argv)}", flush=True)
    saved = sys.argv
    sys.argv = [str(REPO / script), *argv]
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as stop:
        if stop.code:
            raise
    finally:
        sys.argv = saved


def model_and_config(argv):
    """(main.py's configuration from `argv`, the model it builds, seeded as it seeds)."""
    config = args.pretraining(args.get_args(argv))
    device = init_distributed(config.run).device
    seed_everything(config.run.seed)
    return config, build_model(config.method, config.heads, config.encoder).to(device), device


def seconds_per_step(opts, method, folder):
    """Seconds per training step of `method`, as main.py trains it: one epoch of
    --timing_steps steps of the recipe (its loader and workers, its step, these
    threads) in `folder`, its training seconds (the checkpoint's, evaluations excluded)."""
    common, pretrain = recipe_flags(opts, method, 1)
    run_script("main.py", [*common, *pretrain, "--size_dataset", str(opts.timing_steps
               * opts.batch_size), "--eval_every", "0", "--dump_path", str(folder)])
    return load_file(folder / CHECKPOINT)["loop"]["seconds"] / opts.timing_steps


def random_baseline(argv, folder):
    """Monitor scores of the initialisation main.py starts from with `argv` (its
    evaluated encoder and projector); the whole model is saved, with its flags, as a
    checkpoint that eval_clusters.py reads."""
    results = folder / "monitor.json"
    if results.is_file():
        print(f"\nrandom baseline: reusing {results}")
        return json.loads(results.read_text())
    print("\nrandom baseline: main.py's model for these flags, before its first step",
          flush=True)
    config, model, device = model_and_config(argv)
    folder.mkdir(parents=True, exist_ok=True)
    save_atomic({"state_dict": with_module_prefix(model.state_dict()),
                 "args": args.recorded_flags(args.get_args(argv)),
                 "evaluated_encoder": model.evaluated_prefix()}, folder / "init.pth.tar")
    monitor = OnlineMonitor(config.data, config.monitor, config.views.crops_size[0], device)
    scores = monitor.evaluate(model.evaluated_encoder(), model.evaluated_projector(),
                              config.run.seed)
    results.write_text(json.dumps(scores, indent=2))
    return scores


def read_curve(tb_folder, steps_per_epoch):
    """[{step, epoch, minutes, <monitor scores>}] from main.py's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb_folder), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("monitor/")]
    minutes = {e.step: e.value for e in events.Scalars("epoch/train_minutes")}
    points = {}
    for tag in tags:
        for e in events.Scalars(tag):
            points.setdefault(e.step, {})[tag.removeprefix("monitor/")] = e.value
    return [{"step": step, "epoch": step / steps_per_epoch, "minutes": minutes[step], **scores}
            for step, scores in sorted(points.items())]


def draw_curves(path, curves, random, title):
    """Linear probe and weighted 20-NN against training minutes, one line per method."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for ax, (key, name) in zip(axes, ((LINEAR, "linear top-1"), (KNN, "weighted 20-NN top-1"))):
        for method, curve in curves.items():
            ax.plot([0.0] + [p["minutes"] for p in curve], [random[key]] + [p[key] for p in curve],
                    marker="o", color=COLOURS[method], label=NAMES[method])
        ax.axhline(random[key], linestyle="--", color="gray",
                   label=f"random encoder ({random[key]:.1f})")
        ax.set(xlabel="training minutes (evaluations excluded)", ylabel=f"test {name} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Fashion-MNIST: {title}", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def clustering(common, checkpoint, folder, opts):
    """eval_clusters.py on `checkpoint`: {feature: scores} of H and Z."""
    results = folder / CLUSTERING
    if not results.is_file():
        argv = [*common, "--pretrained", str(checkpoint), "--dump_path", str(folder),
                "--features", *FEATURES, "--max_samples", str(opts.cluster_samples),
                "--bank_samples", str(opts.bank_samples), "--tsne_samples", str(opts.tsne_samples)]
        run_script("eval_clusters.py", argv)
    found = json.loads(results.read_text())
    return {name: found[name] for name in FEATURES}


def tables(results):
    """Markdown tables: the monitor's figures of every encoder, then eval_clusters.py's."""
    lines = ["| encoder | epochs | training minutes | 20-NN | 5-NN | linear | SC of H | ARI of H "
             "| SC of Z | ARI of Z |", "|---" * 10 + "|"]
    for name, epochs, s in [("random init", 0, {"minutes": 0.0, **results["random"]})] + [
            (NAMES[m], r["epochs"], r["final"]) for m, r in results["methods"].items()]:
        keys = (KNN, "knn5_euclid_top1", LINEAR, "sc_encoding", "ari_encoding", "sc_embedding",
                "ari_embedding")
        lines.append(f"| {name} | {epochs} | {s['minutes']:.1f} | "
                     + " | ".join(f"{s[k]:.2f}" if "top1" in k else f"{s[k]:.3f}" for k in keys)
                     + " |")
    if results["clusters"]:
        lines += ["", "| eval_clusters.py | silhouette | ARI | NMI | 20-NN |", "|---" * 5 + "|"]
    for encoder, by_feature in results["clusters"].items():
        for feature, s in by_feature.items():
            lines.append(f"| {encoder}, {'H' if feature == 'encoding' else 'Z'} | "
                         f"{s['silhouette_mean']:.4f} | {s['ari']:.4f} | {s['nmi']:.4f} | "
                         f"{s['knn_top1']:.2f} |")
    return lines


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--out", default="runs/fashion_mnist", help="folder of every output")
    add("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
        help="the methods to pretrain, in table order (default: all)")
    add("--minutes", type=float, default=30.0, help="training budget of each method (30)")
    add("--epochs", type=int, default=None, help="the same epochs for all, not --minutes")
    add("--timing_steps", type=int, default=100,
        help="steps of the short main.py run that times each method first (100)")
    recipe = p.add_argument_group("the recipe, alike for all (main.py flags of the same names)")
    add = recipe.add_argument
    add("--size_dataset", type=int, default=20000, help="pretrain on the first N training "
        "images; the monitor measures on all 60,000 and the 10,000 test images (20000)")
    add("--batch_size", type=int, default=64, help="pretraining batch (64)")
    add("--lr", type=float, default=0.5, help="base learning rate, times batch / 256 (0.5)")
    add("--warmup_epochs", type=int, default=1, help="linear lr warm-up (1)")
    add("--momentum", type=float, default=0.99, help="base EMA of ReSA and BYOL (0.99)")
    add("--temperature", type=float, default=0.4,
        help="ReSA's tau; SwAV and SimCLR keep theirs, 0.1 and 0.2 (0.4)")
    add("--crops_min_scale", type=float, default=0.5, help="crop scale lower bound (0.5)")
    add("--solarization_prob", type=float, default=0.2, help="of the strong view (0.2)")
    add("--crops_size", type=int, default=32, help="resolution in px (32)")
    add("--stem", default="imagenet", choices=("imagenet", "cifar"),
        help="ResNet-18 stem; cifar costs about 6x (imagenet)")
    add("--pred", dest="pred", action="store_true", default=True,
        help="ReSA with its predictor (default; BYOL always has one)")
    add("--no_pred", dest="pred", action="store_false", help="ReSA without it")
    add("--seed", type=int, default=0, help="of the initialisation and the data (0)")
    run = p.add_argument_group("evaluation and running")
    add = run.add_argument
    add("--eval_every", type=int, default=5, help="monitor (one curve point, about 1.5 "
        "minutes on 2 threads) after epoch 1, every N epochs and after the last (5)")
    add("--cluster_samples", type=int, default=10000,
        help="test images of eval_clusters.py; 0 = no eval_clusters.py (10000)")
    add("--bank_samples", type=int, default=60000, help="eval_clusters.py's k-NN bank (60000)")
    add("--tsne_samples", type=int, default=0, help="eval_clusters.py's t-SNE points (0)")
    add("--workers", type=int, default=1, help="data-loading workers (1)")
    return p.parse_args(argv)


def pretrain_method(opts, method, out, steps_per_epoch):
    """Pretrain `method` within the budget (or reuse a finished run): its results. Its
    epochs: the whole number that fills --minutes best at its timed step, or --epochs;
    kept in OUT/METHOD/plan.json, so that a continued run keeps them."""
    folder = out / method
    plan = folder / "plan.json"
    if not plan.is_file():
        step = seconds_per_step(opts, method, folder / "timing")
        epochs = opts.epochs or max(1, round(opts.minutes * 60 / (step * steps_per_epoch)))
        folder.mkdir(parents=True, exist_ok=True)
        plan.write_text(json.dumps({"epochs": epochs, "step_s": step}))
    epochs, step = (json.loads(plan.read_text())[k] for k in ("epochs", "step_s"))
    print(f"\n{NAMES[method]}: {step:.3f} s per step, {epochs} epochs "
          f"(about {epochs * steps_per_epoch * step / 60:.1f} training minutes)", flush=True)
    common, pretrain = recipe_flags(opts, method, epochs)
    argv = [*common, *pretrain, "--dump_path", str(folder / "pretrain")]
    checkpoint = folder / "pretrain" / CHECKPOINT
    load = os.getloadavg()
    finished = checkpoint.is_file() and load_file(checkpoint)["epoch"] >= epochs
    curve = read_curve(folder / "pretrain" / "tb", steps_per_epoch) if finished else []
    if curve and curve[-1]["epoch"] >= epochs:
        print(f"{NAMES[method]}: reusing the finished run in {checkpoint.parent}")
    else:  # a new run, the continuation of an interrupted one, or its last monitor point
        run_script("main.py", argv)
        curve = read_curve(folder / "pretrain" / "tb", steps_per_epoch)
    if not curve:
        raise SystemExit("no monitor point in the TensorBoard events: was --eval_every 0?")
    return {"command": "python main.py " + shlex.join(argv), "epochs": epochs,
            "timed_step_s": step, "curve": curve, "final": curve[-1],
            "load_average_at_start": list(load), "checkpoint": str(checkpoint)}


def main(argv=None):
    opts = parse(argv)
    start, load = time.perf_counter(), os.getloadavg()
    out = Path(opts.out)
    images = 60000 if opts.size_dataset < 0 else min(opts.size_dataset, 60000)
    steps_per_epoch = images // opts.batch_size  # main.py drops the last partial batch
    common, pretrain = recipe_flags(opts, "resa", 1)
    random = random_baseline(common + pretrain, out / "random")
    runs = {m: pretrain_method(opts, m, out, steps_per_epoch) for m in opts.methods}
    encoders = [("random init", out / "random" / "init.pth.tar", out / "random")] + [
        (NAMES[m], r["checkpoint"], out / m) for m, r in runs.items()]
    clusters = {name: clustering(common, checkpoint, folder / "clusters", opts)
                for name, checkpoint, folder in encoders if opts.cluster_samples}
    results = {"options": vars(opts), "random": random, "methods": runs, "clusters": clusters,
               "load_average": {"start": list(load), "end": list(os.getloadavg())},
               "wall_minutes": (time.perf_counter() - start) / 60,
               "torch_threads": torch.get_num_threads()}
    budget = f"{opts.epochs} epochs each" if opts.epochs else f"{opts.minutes:g} minutes each"
    title = (f"ResNet-18 ({opts.stem} stem, {opts.crops_size} px), first {images} images, "
             f"batch {opts.batch_size}, {budget}, {torch.get_num_threads()} threads")
    draw_curves(out / "curve.png", {m: r["curve"] for m, r in runs.items()}, random, title)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nFashion-MNIST test set ({results['wall_minutes']:.1f} min in all; load average "
          f"at start {load[0]:.2f}):", *tables(results), f"\ncurves: {out / 'curve.png'}; "
          f"results: {out / 'results.json'}", sep="\n")
    return results


if __name__ == "__main__":
    main()
