"""The one command-line parser shared by main.py, eval_linear.py and eval_knn.py.

Flag names and defaults follow the authors' repository (winci-ai/resa) so that their
commands run unchanged; defaults that depend on the dataset or the architecture are
resolved after parsing (see `resolve_defaults`).
"""
import argparse
import sys

from src.data import DATASETS, dataset_info
from src.models import ARCHS

CIFAR_RECIPE = ("cifar10", "cifar100")  # SPEC §7: the authors' CIFAR repository


def str2bool(value):
    """Parse 'True'/'False' as the authors' `--use_cuda False` intends."""
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where the help text does not already explain it."""

    def _get_help_string(self, action):
        if (action.default is None or "default:" in action.help or action.nargs == 0):
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """Bad flags end with one clear line and exit code 2 (not the usage block)."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser():
    p = OneLineParser(
        description="ReSA (Representation Self-Assignment): self-supervised pretraining "
        "and evaluation. One parser serves main.py, eval_knn.py and eval_linear.py; "
        "each script reads the groups that concern it.",
        formatter_class=HelpFormatter,
    )

    g = p.add_argument_group("run")
    g.add_argument("--dump_path", type=str, default=".",
                   help="folder for checkpoints, out.log and TensorBoard events; a run "
                   "resumes automatically from the checkpoint found here")
    g.add_argument("--seed", type=int, default=None,
                   help="random seed (python, numpy, torch; offset by rank for data); "
                   "unset = nondeterministic")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default="imagenet", choices=DATASETS,
                   help="imagenet = any ImageFolder with train/ (and val/) under "
                   "--data_path; cifar10/cifar100/stl10 through torchvision; fashion_mnist "
                   "from the Debian package dataset-fashion-mnist; demo = a small synthetic "
                   "ImageFolder this project generates into --data_path")
    g.add_argument("--data_path", type=str, default=None,
                   help="dataset folder (required for imagenet; default: ./data for "
                   "torchvision datasets and fashion_mnist, ./data/demo for demo)")
    g.add_argument("--crops_nmb", type=int, nargs="+", default=[1],
                   help="number of strong views per crop group, e.g. 1 or 1 6")
    g.add_argument("--crops_size", type=int, nargs="+", default=None,
                   help="crop resolution per group; the weak view uses the first "
                   "(default: 224; 32 on CIFAR/fashion_mnist/demo, 96 on stl10)")
    g.add_argument("--crops_min_scale", type=float, nargs="+", default=[0.2],
                   help="RandomResizedCrop lower scale per group")
    g.add_argument("--crops_max_scale", type=float, nargs="+", default=[1.0],
                   help="RandomResizedCrop upper scale per group")
    g.add_argument("--solarization_prob", type=float, nargs="+", default=[0.2],
                   help="solarization probability of the strong views per group")
    g.add_argument("--size_dataset", type=int, default=-1,
                   help="keep only the first N training samples; -1 keeps all")
    g.add_argument("--workers", type=int, default=8,
                   help="data-loading worker processes per process")

    g = p.add_argument_group("ReSA")
    g.add_argument("--temperature", type=float, default=0.4,
                   help="softmax temperature tau of the ReSA loss")
    g.add_argument("--momentum", type=float, default=0.996,
                   help="base EMA coefficient of the momentum encoder/projector; rises "
                   "to 1 on a per-iteration half-cosine")

    g = p.add_argument_group("architecture")
    g.add_argument("-a", "--arch", type=str, default=None, choices=ARCHS, metavar="ARCH",
                   help="encoder: " + ", ".join(ARCHS) + " (default: resnet50; resnet18 on "
                   "CIFAR, fashion_mnist and demo)")
    g.add_argument("--mlp_layers", type=int, default=3,
                   help="number of Linear layers in the projector")
    g.add_argument("--mlp_dim", type=int, default=2048,
                   help="hidden width of the projector and predictor")
    g.add_argument("--emb", type=int, default=512, help="embedding (projector output) size")
    g.add_argument("--no_pred", dest="pred", action="store_false",
                   help="train without the predictor on the online branch")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 100; 1000 on CIFAR)")
    g.add_argument("--batch_size", type=int, default=256,
                   help="batch size per process (B); the total batch is B x world size")
    g.add_argument("--lr", type=float, default=None,
                   help="base learning rate, scaled by total batch / 256 "
                   "(default: 0.5; 0.3 on CIFAR)")
    g.add_argument("--final_lr", type=float, default=None,
                   help="learning rate at the end of the cosine, absolute "
                   "(default: 0.1 x the scaled lr)")
    g.add_argument("--wd", "--weight_decay", dest="wd", type=float, default=None,
                   help="weight decay on all parameters (default: 1e-5; 1e-4 on CIFAR)")
    g.add_argument("--optimizer", type=str, default="sgd", choices=("sgd", "adamw"),
                   help="SGD uses momentum 0.9")
    g.add_argument("--warmup_epochs", type=int, default=2,
                   help="linear learning-rate warm-up from 0, in epochs")

    g = p.add_argument_group("distributed (set by torchrun or SLURM; rarely given by hand)")
    g.add_argument("--world_size", type=int, default=1,
                   help="number of processes; read from WORLD_SIZE / SLURM_NTASKS")
    g.add_argument("--rank", type=int, default=0,
                   help="global rank; read from RANK / SLURM_PROCID")
    g.add_argument("--dist-backend", "--dist_backend", dest="dist_backend", type=str,
                   default=None, choices=("nccl", "gloo"),
                   help="process-group backend (default: nccl on CUDA, gloo on CPU)")
    g.add_argument("--dist-url", "--dist_url", dest="dist_url", type=str, default="env://",
                   help="process-group init method")
    g.add_argument("--no-set-device-rank", "--no_set_device_rank", dest="no_set_device_rank",
                   action="store_true",
                   help="use cuda:0 in every process (when CUDA_VISIBLE_DEVICES already "
                   "gives each process one GPU)")

    g = p.add_argument_group("online monitor (main.py, non-ImageNet datasets)")
    g.add_argument("--eval_every", type=int, default=5,
                   help="after the first epoch, every N epochs and after the last: 5-NN, "
                   "weighted k-NN and a linear classifier on the momentum encoder's "
                   "features; 0 disables")

    g = p.add_argument_group("evaluation (eval_linear.py, eval_knn.py)")
    g.add_argument("--pretrained", type=str, default="",
                   help="checkpoint to evaluate: our checkpoint.pth.tar, the authors' full "
                   "or encoder-only release, or an exported encoder")
    g.add_argument("--num_classes", type=int, default=None,
                   help="classifier outputs (default: the dataset's number of classes)")
    g.add_argument("--weights", type=str, default="freeze", choices=("freeze", "finetune"),
                   help="freeze = linear probe on a frozen encoder in eval mode; "
                   "finetune = train encoder and head")
    g.add_argument("--train_percent", type=int, default=100, choices=(100, 10, 1),
                   help="train on the standard ImageNet 1%% or 10%% subset")
    g.add_argument("--train_files", type=str, default=None,
                   help="subset list (one training file name a line) for --train_percent "
                   "1/10; without it the public SimCLR list is downloaded once into "
                   "~/.cache/resa")
    g.add_argument("--lr_encoder", type=float, default=2e-4,
                   help="fine-tuning encoder base lr, scaled by total batch / 256")
    g.add_argument("--lr_classifier", type=float, default=40.0,
                   help="head base lr, scaled by total batch / 256 (use 10 for a "
                   "batch-256 pretraining)")
    g.add_argument("--scheduler", type=str, default="step", choices=("step", "cos"),
                   help="step = x0.1 at epochs 60 and 80; cos = cosine to 0")
    g.add_argument("--nb_knn", type=int, nargs="+", default=[5, 10, 15, 20, 25],
                   help="k values of the weighted k-NN")
    g.add_argument("--knn_temperature", type=float, default=0.07,
                   help="temperature of the weighted k-NN votes")
    g.add_argument("--use_cuda", type=str2bool, default=True,
                   help="keep the k-NN feature bank on the GPU; False keeps it in CPU memory")
    return p


def resolve_defaults(args):
    """Fill the defaults that depend on the dataset, as the authors' two repositories do."""
    small = args.dataset in CIFAR_RECIPE
    info = dataset_info(args.dataset)
    if args.arch is None:
        args.arch = "resnet50" if args.dataset in ("imagenet", "stl10") else "resnet18"
    if args.epochs is None:
        args.epochs = 1000 if small else 100
    if args.lr is None:
        args.lr = 0.3 if small else 0.5
    if args.wd is None:
        args.wd = 1e-4 if small else 1e-5
    if args.crops_size is None:
        args.crops_size = [info.crop_size]
    if args.num_classes is None:
        args.num_classes = info.num_classes
    if args.data_path is None and args.dataset != "imagenet":
        args.data_path = "./data/demo" if args.dataset == "demo" else "./data"
    args.weight_decay = args.wd  # the authors' attribute name
    return args


def check_args(parser, args):
    """Reject inconsistent flags at start-up instead of crashing later."""
    lists = ("crops_nmb", "crops_size", "crops_min_scale", "crops_max_scale",
             "solarization_prob")
    lengths = {name: len(getattr(args, name)) for name in lists}
    if len(set(lengths.values())) != 1:
        parser.error("the crop lists must have equal lengths, got "
                     + ", ".join(f"--{k} {v}" for k, v in lengths.items()))
    if any(n < 0 for n in args.crops_nmb) or any(s <= 0 for s in args.crops_size):
        parser.error("--crops_nmb must be >= 0 and --crops_size > 0")
    if sum(args.crops_nmb) < 1:
        parser.error("--crops_nmb must give at least one strong view (ReSA needs 2 views)")
    for lo, hi in zip(args.crops_min_scale, args.crops_max_scale):
        if not 0 < lo <= hi <= 1:
            parser.error(f"crop scales need 0 < min <= max <= 1, got ({lo}, {hi})")
    if any(not 0 <= p <= 1 for p in args.solarization_prob):
        parser.error("--solarization_prob values must lie in [0, 1]")
    positive = ("epochs", "batch_size", "mlp_layers", "mlp_dim", "emb")
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.workers < 0 or args.warmup_epochs < 0 or args.eval_every < 0:
        parser.error("--workers, --warmup_epochs and --eval_every must be >= 0")
    if args.temperature <= 0 or args.knn_temperature <= 0:
        parser.error("temperatures must be positive")
    if not 0 <= args.momentum <= 1:
        parser.error(f"--momentum must lie in [0, 1], got {args.momentum}")
    if args.lr <= 0 or (args.final_lr is not None and args.final_lr < 0):
        parser.error("--lr must be positive and --final_lr non-negative")
    if args.train_files and args.train_percent == 100:
        parser.error("--train_files needs --train_percent 1 or 10")
    if any(k <= 0 for k in args.nb_knn):
        parser.error("--nb_knn values must be positive")
    if args.num_classes <= 0:
        parser.error("--num_classes must be positive")


def get_args(argv=None):
    """Parse `argv` (default: sys.argv[1:]), resolve dataset defaults and validate."""
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_defaults(args)
    check_args(parser, args)
    return args
