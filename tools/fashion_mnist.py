"""Fashion-MNIST on a CPU: ReSA against the randomly initialised encoder it starts from.

    python tools/fashion_mnist.py --out runs/fashion_mnist

1. The random encoder: the exact initialisation main.py starts from (same flags, same
   seed), measured with the online monitor's protocol (src/monitor.py: weighted 20-NN,
   Euclidean 5-NN and an Adam linear probe on frozen features of all 60,000 training
   and 10,000 test images). It is saved as OUT/random/init.pth.tar (checkpoint layout).
2. Pretraining: main.py with the recipe's flags; its monitor measures the momentum
   encoder after epoch 1, every --eval_every epochs and after the last.
3. The curve: the monitor's scores against `epoch/train_minutes` (training time,
   evaluations excluded), read from OUT/pretrain/tb, drawn in OUT/curve.png.
4. The clustering of the encoding H and the embedding Z: eval_clusters.py on the final
   checkpoint and on the random initialisation.
5. The table, printed and written to OUT/results.json.

Every step prints the command it stands for (python main.py ..., python
eval_clusters.py ...) and runs it in this process. Run again with the same --out:
a finished pretraining, the random baseline and the clustering results already there
are reused, and an interrupted pretraining continues from its checkpoint.
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
from method import build_model  # noqa: E402
from src.checkpoint import load_file, save_atomic, with_module_prefix  # noqa: E402
from src.distributed import init_distributed  # noqa: E402
from src.eval.monitor import OnlineMonitor  # noqa: E402
from src.seeding import seed_everything  # noqa: E402

CHECKPOINT, CLUSTERING = "checkpoint.pth.tar", "clustering.json"  # what the scripts write

KNN, LINEAR = "wknn20_top1", "linear_top1"  # the two figures of the curve
FEATURES = ("encoding", "embedding")  # H and Z


def recipe_flags(opts):
    """main.py's flags for the recipe (the evaluations read the same dataset flags)."""
    flags = ["--dataset", "fashion_mnist", "--stem", opts.stem, "--crops_size", opts.crops_size,
             "--seed", opts.seed, "--workers", opts.workers]
    pretrain = ["--size_dataset", opts.size_dataset, "--epochs", opts.epochs,
                "--batch_size", opts.batch_size, "--lr", opts.lr,
                "--warmup_epochs", opts.warmup_epochs, "--momentum", opts.momentum,
                "--temperature", opts.temperature,
                "--crops_min_scale", opts.crops_min_scale,
                "--solarization_prob", opts.solarization_prob,
                "--pred" if opts.pred else "--no_pred",
                "--eval_every", opts.eval_every, "--checkpoint_minutes", 0]
    return [str(f) for f in flags], [str(f) for f in pretrain]


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


def random_baseline(argv, folder):
    """Monitor scores of the initialisation main.py starts from with `argv`: seeded as
    main.py seeds (start_run), then built as main.py builds it; main.py's monitor
    evaluates the method's evaluated encoder and projector (ReSA's momentum copies,
    at this point equal to the online ones). Saves the whole model, with its flags, as
    a checkpoint that eval_clusters.py reads."""
    results = folder / "monitor.json"
    if results.is_file():
        print(f"\nrandom baseline: reusing {results}")
        return json.loads(results.read_text())
    print("\nrandom baseline: the model `python main.py` builds from these flags, before its "
          "first step, measured by its monitor (src/eval/monitor.py)", flush=True)
    flags = args.get_args(argv)
    config = args.pretraining(flags)
    device = init_distributed(config.run).device
    seed_everything(config.run.seed)
    model = build_model(config.method, config.heads, config.encoder).to(device)
    folder.mkdir(parents=True, exist_ok=True)
    save_atomic({"state_dict": with_module_prefix(model.state_dict()),
                 "args": args.recorded_flags(flags),
                 "evaluated_encoder": model.evaluated_prefix()}, folder / "init.pth.tar")
    monitor = OnlineMonitor(config.data, config.monitor, config.views.crops_size[0], device)
    scores = monitor.evaluate(model.evaluated_encoder(), model.evaluated_projector(),
                              config.run.seed)
    results.write_text(json.dumps(scores, indent=2))
    return scores


def read_curve(tb_folder, steps_per_epoch):
    """[{step, epoch, minutes, <monitor scores>}] from main.py's TensorBoard events: the
    monitor's scores are logged at the step where `epoch/train_minutes` is."""
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


def draw_curve(path, curve, random, title):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, name, colour in ((LINEAR, "linear top-1", "tab:blue"),
                              (KNN, "weighted 20-NN top-1", "tab:orange")):
        xs = [0.0] + [p["minutes"] for p in curve]
        ys = [random[key]] + [p[key] for p in curve]
        ax.plot(xs, ys, marker="o", color=colour, label=f"ReSA, {name}")
        ax.axhline(random[key], linestyle="--", color=colour,
                   label=f"random encoder, {name} ({random[key]:.1f})")
    ax.set_xlabel("training minutes (evaluations excluded)")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
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
    """The two tables as text lines."""
    random, final = results["random"], results["curve"][-1]
    lines = [f"{'encoder':<28}{'minutes':>8}{'20-NN':>8}{'5-NN':>8}{'linear':>8}"]
    for name, minutes, s in (("random init", 0.0, random),
                             (f"ReSA, {final['epoch']:g} epochs", final["minutes"], final)):
        lines.append(f"{name:<28}{minutes:>8.1f}{s[KNN]:>8.2f}{s['knn5_euclid_top1']:>8.2f}"
                     f"{s[LINEAR]:>8.2f}")
    lines += ["", f"{'clustering':<28}{'silhouette':>11}{'ARI':>8}{'NMI':>8}{'20-NN':>8}"]
    for encoder, by_feature in results["clusters"].items():
        for feature, s in by_feature.items():
            label = f"{encoder}, {'H' if feature == 'encoding' else 'Z'} ({feature})"
            lines.append(f"{label:<28}{s['silhouette_mean']:>11.4f}{s['ari']:>8.4f}"
                         f"{s['nmi']:>8.4f}{s['knn_top1']:>8.2f}")
    return lines


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/fashion_mnist", help="folder for every output")
    recipe = p.add_argument_group("recipe (main.py flags of the same names)")
    recipe.add_argument("--size_dataset", type=int, default=20000,
                        help="pretrain on the first N training images (the monitor always "
                        "measures on all 60,000 and the 10,000 test images)")
    recipe.add_argument("--epochs", type=int, default=6, help="pretraining epochs")
    recipe.add_argument("--batch_size", type=int, default=64, help="pretraining batch")
    recipe.add_argument("--lr", type=float, default=0.5,
                        help="base learning rate, scaled by batch / 256")
    recipe.add_argument("--warmup_epochs", type=int, default=1, help="linear lr warm-up")
    recipe.add_argument("--momentum", type=float, default=0.99,
                        help="base EMA coefficient (rises to 1 on a cosine)")
    recipe.add_argument("--temperature", type=float, default=0.4, help="ReSA's softmax tau")
    recipe.add_argument("--crops_min_scale", type=float, default=0.5,
                        help="RandomResizedCrop lower scale of both views")
    recipe.add_argument("--solarization_prob", type=float, default=0.2,
                        help="solarization probability of the strong view")
    recipe.add_argument("--crops_size", type=int, default=32, help="resolution (px)")
    recipe.add_argument("--stem", default="imagenet", choices=("imagenet", "cifar"),
                        help="ResNet-18 stem (cifar: about 6x the cost)")
    recipe.add_argument("--pred", dest="pred", action="store_true", default=True,
                        help="predictor on the online branch")
    recipe.add_argument("--no_pred", dest="pred", action="store_false",
                        help="no predictor")
    recipe.add_argument("--seed", type=int, default=0,
                        help="seed of the initialisation (shared by both encoders) and data")
    run = p.add_argument_group("evaluation and running")
    run.add_argument("--eval_every", type=int, default=2,
                     help="monitor (one curve point, about 3 CPU minutes) after epoch 1, every "
                     "N epochs and after the last")
    run.add_argument("--cluster_samples", type=int, default=10000,
                     help="test images on which eval_clusters.py measures H and Z")
    run.add_argument("--bank_samples", type=int, default=60000,
                     help="training images of eval_clusters.py's k-NN bank")
    run.add_argument("--tsne_samples", type=int, default=2000,
                     help="points of eval_clusters.py's t-SNE pictures; 0 = none")
    run.add_argument("--workers", type=int, default=1, help="data-loading workers")
    return p.parse_args(argv)


def main(argv=None):
    opts = parse(argv)
    start, load = time.perf_counter(), os.getloadavg()
    out = Path(opts.out)
    common, pretrain = recipe_flags(opts)
    main_argv = [*common, *pretrain, "--dump_path", str(out / "pretrain")]

    random = random_baseline(main_argv, out / "random")
    checkpoint = out / "pretrain" / CHECKPOINT
    if checkpoint.is_file() and load_file(checkpoint)["epoch"] >= opts.epochs:
        print(f"\npretraining: reusing the finished run in {checkpoint.parent}")
    else:  # a new run, or the continuation of an interrupted one
        run_script("main.py", main_argv)
    images = 60000 if opts.size_dataset < 0 else min(opts.size_dataset, 60000)
    steps_per_epoch = images // opts.batch_size  # main.py drops the last partial batch
    curve = read_curve(out / "pretrain" / "tb", steps_per_epoch)
    if not curve:
        raise SystemExit("no monitor point in the TensorBoard events: was --eval_every 0?")
    results = {
        "recipe": {"command": "python main.py " + shlex.join(main_argv), **vars(opts)},
        "random": random, "curve": curve, "final": curve[-1],
        "clusters": {"random init": clustering(common, out / "random" / "init.pth.tar",
                                               out / "clusters_random", opts),
                     "ReSA": clustering(common, checkpoint, out / "clusters_resa", opts)},
        "load_average": {"start": list(load), "end": list(os.getloadavg())},
        "wall_minutes": (time.perf_counter() - start) / 60,
        "torch_threads": torch.get_num_threads()}
    title = (f"ReSA, ResNet-18 ({opts.stem} stem, {opts.crops_size} px), first "
             f"{opts.size_dataset} images, batch {opts.batch_size}, momentum {opts.momentum}, "
             f"crops ({opts.crops_min_scale}, 1)")
    draw_curve(out / "curve.png", curve, random, title)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nFashion-MNIST test set, monitor protocol ({results['wall_minutes']:.1f} min in "
          f"all; load average at start {load[0]:.2f}):")
    print("\n".join(tables(results)))
    print(f"\ncurve: {out / 'curve.png'}; results: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
