"""The command line of every script: parse the flags (the table in flags.py, and each
method's hyper-parameters, declared in method/*.py), resolve the defaults that depend
on the dataset, the method, the script and the device once, check them, and build the
configs (src/config.py) that the library takes. Nothing below the scripts reads the
argparse namespace.

Every script accepts every flag (the authors' commands pass some flags to scripts that
ignore them), but each script's `--help` lists first the flags it reads.
"""
import argparse
import math
import sys

import torch

from flags import FLAGS, MAIN, SCRIPTS
from method import METHODS
from src import config
from src.data.datasets import dataset_spec
from src.errors import UsageError
from src.models import RESNETS, check_arch

DEFAULTS = {"arch": "resnet50", "epochs": 100, "lr": 0.5, "wd": 1e-5, "pred": True,
            "mlp_layers": 3, "mlp_dim": 2048, "emb": 512, "optimizer": "sgd",
            "wd_norms_biases": True, "clip_grad": 0.0}  # unless a recipe says otherwise
# The recipe of every --arch that is not a ResNet here (a timm backbone): the ViT
# literature's (DINO, iBOT): AdamW, a smaller lr, weight decay on a cosine from 0.04 to
# 0.4 and none on norms and biases, gradients clipped to norm 3.
TIMM_RECIPE = {"optimizer": "adamw", "lr": 5e-4, "wd": 0.04, "weight_decay_end": 0.4,
               "wd_norms_biases": False, "clip_grad": 3.0}
KEEP = (bool, int, float, str, type(None))  # what a checkpoint records of the flags


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where the help text does not already explain it."""

    def _get_help_string(self, action):
        if action.default is None or "default:" in action.help or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """Bad flags end with one clear line and exit code 2 (not the usage block)."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def method_flags():
    """FLAGS-shaped entries of --method and of every method's hyper-parameters, one
    group per method (a flag that several methods read is declared in the group of the
    first, its default resolved for the --method chosen), and the groups' descriptions."""
    entries = [("method", MAIN, ("--method",), dict(
        type=str, default="resa", choices=tuple(METHODS),
        help="the self-supervised method: " + ", ".join(METHODS)))]
    readers, descriptions = {}, {}
    for name, cls in METHODS.items():
        for hyper in cls.HYPER:
            readers.setdefault(hyper.name, []).append((name, hyper))
    for name, cls in METHODS.items():
        title = f"{cls.__name__} (--method {name})"
        shared = [h for h in cls.HYPER if readers[h.name][0][0] != name]
        if shared:
            descriptions[title] = "also reads " + ", ".join(
                f"--{h.name} (default here {h.default})" for h in shared)
            entries.append((title, MAIN, (), {}))  # the group, even with no flag of its own
        for hyper in cls.HYPER:
            others = readers[hyper.name]
            if others[0][0] != name:
                continue
            text = hyper.help if len(others) == 1 else (
                f"{hyper.help}; also read by {', '.join(n for n, _ in others[1:])} (default: "
                + ", ".join(f"{n} {h.default}" for n, h in others) + ")")
            entries.append((title, MAIN, (f"--{hyper.name}",), dict(
                type=hyper.type, default=None if len(others) > 1 else hyper.default,
                help=text)))
    return entries, descriptions


def all_flags():
    """(every flag entry in --help's order: the table, the method's groups after the
    data's; the groups' descriptions)."""
    methods, descriptions = method_flags()
    at = next(i for i, entry in enumerate(FLAGS) if entry[0] == "architecture")
    return [*FLAGS[:at], *methods, *FLAGS[at:]], descriptions


def build_parser(script="main", own_flags=()):
    """The parser of `script` (a key of flags.SCRIPTS): its `own_flags` (entries shaped
    like FLAGS', read by that script alone) and its shared flags first, grouped; then
    every other flag, accepted but not read by it."""
    table, descriptions = all_flags()
    p = OneLineParser(description=SCRIPTS[script], formatter_class=HelpFormatter)
    groups = {}
    for title, readers, names, kwargs in [*own_flags, *table]:
        if script in readers:
            if title not in groups:
                groups[title] = p.add_argument_group(title, descriptions.get(title))
            if names:
                groups[title].add_argument(*names, **kwargs)
    others = p.add_argument_group(
        f"accepted for compatibility, not read by {script}.py",
        "flags of the other scripts (one parser serves them all) and flags that do nothing")
    for title, readers, names, kwargs in table:
        if script not in readers and names:
            others.add_argument(*names, **kwargs)
    return p


def resolve_defaults(args, script):
    """Fill the defaults left unset (None) from the recipes, in this order: the
    flag given, the --method's recipe (its RECIPE), the --arch's (TIMM_RECIPE for a
    timm backbone, none for a ResNet), the dataset's recipe (src/data/datasets.py),
    DEFAULTS; then those of the script and the device."""
    spec, method = dataset_spec(args.dataset), METHODS[args.method]
    recipes = [method.RECIPE, spec.recipe, DEFAULTS]

    def recipe(name):
        return next((r[name] for r in recipes if name in r), None)

    if args.arch is None:  # first: the arch's recipe depends on it
        args.arch = recipe("arch")
    recipes.insert(1, {} if args.arch in RESNETS else TIMM_RECIPE)
    for name in (*DEFAULTS, *recipes[1]):
        if getattr(args, name) is None:
            setattr(args, name, recipe(name))
    if args.weight_decay_end is None:
        args.weight_decay_end = args.wd
    for hyper in method.HYPER:
        if getattr(args, hyper.name) is None:
            setattr(args, hyper.name, hyper.default)
    cuda = torch.cuda.is_available()
    pretraining = script == "main"
    if args.precision is None:
        args.precision = (spec.recipe.get("precision") if pretraining else None) or (
            "fp16" if pretraining and cuda else "fp32")
    if args.wandb_project is None:
        args.wandb_project = spec.recipe.get("wandb_project", "") if pretraining else ""
    for name in ("channels_last", "fused"):
        if getattr(args, name) is None:
            setattr(args, name, cuda)
    for name, value in (("stem", spec.stem), ("crops_size", [spec.crop_size]),
                        ("num_classes", spec.num_classes), ("data_path", spec.default_path),
                        ("mean", list(spec.mean)), ("std", list(spec.std))):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_args(parser, args):
    """Reject inconsistent flags at start-up instead of crashing later (the crop lists
    are checked by config.Views)."""
    for name, value in vars(args).items():  # NaN passes every comparison below
        if any(isinstance(v, float) and not math.isfinite(v)
               for v in (value if isinstance(value, list) else [value])):
            parser.error(f"--{name} must be a finite number, got {value}")
    for name in ("epochs", "batch_size", "mlp_layers", "mlp_dim", "emb", "log_every"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if min(args.workers, args.warmup_epochs, args.eval_every, args.checkpoint_minutes,
           args.checkpoint_iters) < 0:
        parser.error("--workers, --warmup_epochs, --eval_every, --checkpoint_minutes and "
                     "--checkpoint_iters must be >= 0")
    for hyper in METHODS[args.method].HYPER:
        words, valid = hyper.valid
        if not valid(getattr(args, hyper.name)):
            parser.error(f"--{hyper.name} must be {words}, got {getattr(args, hyper.name)}")
    if min(args.std) <= 0:
        parser.error(f"--std values must be positive, got {args.std}")
    if args.knn_temperature <= 0:
        parser.error("temperatures must be positive")
    if args.lr <= 0 or (args.final_lr is not None and args.final_lr < 0):
        parser.error("--lr must be positive and --final_lr non-negative")
    if args.train_files and args.train_percent == 100:
        parser.error("--train_files needs --train_percent 1 or 10")
    if any(k <= 0 for k in args.nb_knn):
        parser.error("--nb_knn values must be positive")
    if args.num_classes <= 0:
        parser.error("--num_classes must be positive")
    if args.precision == "fp16" and not torch.cuda.is_available():
        parser.error("--precision fp16 needs a CUDA GPU (loss scaling); use bf16 or fp32 on CPU")
    if args.clip_grad < 0 or args.weight_decay_end < 0 or (args.patch_size or 1) <= 0:
        parser.error("--clip_grad and --weight_decay_end must be >= 0, --patch_size positive")
    try:  # before anything is written: a name timm lacks or that needs weights
        check_arch(args.arch, args.crops_size, args.patch_size)
    except UsageError as err:
        parser.error(str(err))


def get_args(argv=None, script="main", own_flags=()):
    """The flags of `script` in `argv` (default: sys.argv[1:]), defaults resolved and
    checked: an argparse namespace, for the config builders below."""
    parser = build_parser(script, own_flags)
    args = parser.parse_args(argv)
    resolve_defaults(args, script)
    check_args(parser, args)
    args.script = script
    return args


def recorded_flags(args):
    """The flags as plain values (what checkpoints and logs record)."""
    return {key: list(value) if isinstance(value, (list, tuple)) else value
            for key, value in vars(args).items()
            if isinstance(value, KEEP) or (isinstance(value, (list, tuple))
                                           and all(isinstance(v, KEEP) for v in value))}


def pick(cls, args, **values):
    """A `cls` config with the fields of the same name taken from `args`."""
    names = [f for f in cls.__dataclass_fields__ if f not in values and hasattr(args, f)]
    return cls(**{name: _frozen(getattr(args, name)) for name in names}, **values)


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def run_config(args):
    return pick(config.Run, args, flags=recorded_flags(args))


def encoder_config(args):
    """The encoder: pretraining (and the clustering analysis's random baseline) start
    from zero-init residual BNs (SPEC §2), except resnet18 on the small datasets, as
    resa_cifar; the evaluations load weights into torchvision's default initialisation."""
    zero_init = args.script in ("main", "clusters") and not (
        args.arch == "resnet18" and dataset_spec(args.dataset).plain_init_resnet18)
    img_size = None if args.arch in RESNETS else args.crops_size[0]
    return config.Encoder(args.arch, args.stem, zero_init, img_size, args.patch_size)


def pretraining(args):
    """The configs of main.py."""
    spec, method = dataset_spec(args.dataset), METHODS[args.method]
    views = pick(config.Views, args, blur_prob=spec.blur_prob, weak_first=method.WEAK_FIRST)
    hyper = {h.name: getattr(args, h.name) for h in method.HYPER}
    return config.Pretraining(
        run=run_config(args), data=pick(config.Data, args), views=views,
        encoder=encoder_config(args), heads=pick(config.Heads, args),
        method=config.Method(args.method, hyper), optim=pick(config.Optim, args),
        loop=pick(config.Loop, args), monitor=pick(config.Monitor, args))


def probe(args):
    """The configs of eval_linear.py."""
    return config.Probing(run=run_config(args), data=pick(config.Data, args),
                          encoder=encoder_config(args), probe=pick(config.Probe, args),
                          loop=pick(config.Loop, args))


def knn(args):
    """The configs of eval_knn.py."""
    return config.KnnEval(run=run_config(args), data=pick(config.Data, args),
                          encoder=encoder_config(args), knn=pick(config.Knn, args))
