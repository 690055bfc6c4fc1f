"""The settings that library functions take: small frozen dataclasses that args.py
builds once from the flags, so that a function's signature says what it depends on
and a test builds what it needs in one line.

Field names are the flags' names, which lets a resumed run compare its settings with
the flags recorded in its checkpoint field by field. What a change means for a resumed
run is declared here, beside the field: each class has a `RESUME` rule for its fields
("refuse": it would be another run; "free": it changes nothing the run computes) and a
field may carry its own, `warn(reason)`, for a change that is allowed but not bit-exact.
"""
from dataclasses import dataclass, field, fields

from src.errors import UsageError

PRECISIONS = ("fp16", "bf16", "fp32")  # Run.precision: see src/train/optim.AUTOCAST_DTYPES


def warn(reason, **kwargs):
    """A field whose change on resume is allowed with a warning that says `reason`."""
    return field(metadata={"resume": "warn", "reason": reason}, **kwargs)


def free(**kwargs):
    """A field that a resumed run may change freely (inside a refused class)."""
    return field(metadata={"resume": "free"}, **kwargs)


def resume_rule(config, name):
    """("refuse" | "warn" | "free", reason) for field `name` of `config`."""
    for f in fields(config):
        if f.name == name:
            return f.metadata.get("resume", type(config).RESUME), f.metadata.get("reason")
    raise KeyError(name)


@dataclass(frozen=True)
class ViewSpec:
    """One pretraining view: output size, crop scale range, weak (False) or strong,
    and a strong view's blur and solarize probabilities (0 for a weak one)."""
    size: int
    scale: tuple
    strong: bool
    blur_prob: float
    solarize_prob: float


@dataclass(frozen=True)
class Views:
    """The pretraining views (SPEC §1): a weak view (unless `weak_first` is False: the
    first view is then strong too), then crops_nmb[i] strong views of group i."""
    RESUME = "refuse"
    crops_nmb: tuple = (1,)
    crops_size: tuple = (224,)
    crops_min_scale: tuple = (0.2,)
    crops_max_scale: tuple = (1.0,)
    solarization_prob: tuple = (0.2,)
    blur_prob: float = 0.5
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    weak_first: bool = True

    def __post_init__(self):
        lists = {name: len(getattr(self, name)) for name in
                 ("crops_nmb", "crops_size", "crops_min_scale", "crops_max_scale",
                  "solarization_prob")}
        if len(set(lists.values())) != 1:
            raise UsageError("the crop lists must have equal lengths, got "
                             + ", ".join(f"--{k} {v}" for k, v in lists.items()))
        if any(n < 0 for n in self.crops_nmb) or any(s <= 0 for s in self.crops_size):
            raise UsageError("--crops_nmb must be >= 0 and --crops_size > 0")
        if sum(self.crops_nmb) < 1:
            raise UsageError("--crops_nmb must give at least one strong view (ReSA needs "
                             "2 views)")
        for lo, hi in zip(self.crops_min_scale, self.crops_max_scale):
            if not 0 < lo <= hi <= 1:
                raise UsageError(f"crop scales need 0 < min <= max <= 1, got ({lo}, {hi})")
        if any(not 0 <= p <= 1 for p in self.solarization_prob):
            raise UsageError("--solarization_prob values must lie in [0, 1]")

    def specs(self):
        """The ViewSpec of every view, in the order the views are made."""
        scales = [(float(lo), float(hi))
                  for lo, hi in zip(self.crops_min_scale, self.crops_max_scale)]
        first = ViewSpec(int(self.crops_size[0]), scales[0], not self.weak_first,
                         0.0 if self.weak_first else float(self.blur_prob),
                         0.0 if self.weak_first else float(self.solarization_prob[0]))
        strong = [ViewSpec(int(size), scale, True, float(self.blur_prob), float(p))
                  for count, size, scale, p in zip(self.crops_nmb, self.crops_size, scales,
                                                   self.solarization_prob)
                  for _ in range(count)]
        return [first, *strong]


@dataclass(frozen=True)
class Data:
    """Which images, where, and how they are loaded."""
    RESUME = "refuse"
    dataset: str = "imagenet"
    data_path: str = free(default=None)
    size_dataset: int = -1
    data_backend: str = warn("the augmentations go on with another random stream",
                             default="pil")
    workers: int = free(default=8)
    batch_size: int = free(default=256)  # resume checks the total batch (resume.py)
    mean: tuple = None  # the images' normalisation (--mean/--std); None: the dataset's
    std: tuple = None


@dataclass(frozen=True)
class Encoder:
    """The network whose features are learned and evaluated (SPEC §2). A ResNet reads
    `stem` and `zero_init_residual`; a timm ViT `img_size` (its position embedding's
    grid: --crops_size[0]) and `patch_size` (None: the model's)."""
    RESUME = "refuse"
    arch: str = "resnet50"
    stem: str = "imagenet"
    zero_init_residual: bool = True
    img_size: int = None
    patch_size: int = None


@dataclass(frozen=True)
class Heads:
    """The projector and predictor a method puts on the encoder (SPEC §2)."""
    RESUME = "refuse"
    mlp_layers: int = 3
    mlp_dim: int = 2048
    emb: int = 512
    pred: bool = True


@dataclass(frozen=True)
class Method:
    """The self-supervised method (a name of method.METHODS) and its hyper-parameters."""
    RESUME = "refuse"
    method: str = "resa"
    hyper: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Optim:
    """Optimizer and schedules of pretraining (SPEC §4); `lr` is the base lr, scaled by
    the total batch / 256 where it is used."""
    RESUME = "refuse"
    optimizer: str = "sgd"
    lr: float = 0.5
    final_lr: float = None
    wd: float = 1e-5
    warmup_epochs: int = 2
    weight_decay_end: float = 1e-5  # the weight decay's cosine goes from wd to this
    wd_norms_biases: bool = True  # False: no weight decay on biases and 1-D tensors
    clip_grad: float = 0.0  # the gradients' total norm is clipped to this; 0 = off
    epochs: int = warn("the learning-rate and EMA schedules were recomputed for the new "
                       "length", default=100)


@dataclass(frozen=True)
class Loop:
    """The training loop's cadence: epochs, checkpoints inside an epoch, log lines."""
    RESUME = "free"
    epochs: int = 100
    checkpoint_minutes: float = 30
    checkpoint_iters: int = 0
    log_every: int = 50


@dataclass(frozen=True)
class Run:
    """How and where a script runs: its dump folder, seed, arithmetic and speed
    options, process group, logging. `flags` is every flag's value, as recorded in
    the checkpoints and the log."""
    RESUME = "free"
    script: str = "main"
    dump_path: str = "."
    seed: int = field(default=None, metadata={"resume": "adopt"})
    precision: str = warn("the continuation is not bit-exact", default="fp32")
    channels_last: bool = False
    fused: bool = False
    compile: str = None
    dist_backend: str = None
    dist_url: str = "env://"
    no_set_device_rank: bool = False
    wandb_project: str = ""
    env_name: str = "resa_cifar"
    flags: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Monitor:
    """main.py's online monitor (SPEC §7): when, and the k-NN settings."""
    RESUME = "free"
    eval_every: int = 5
    eval_at_start: bool = False
    nb_knn: tuple = (5, 10, 15, 20, 25)
    knn_temperature: float = 0.07
    num_classes: int = 1000

    def due(self, epoch, epochs):
        """Whether the monitor runs after epoch `epoch` of `epochs`: after the first,
        every --eval_every and after the last."""
        every = self.eval_every
        return every > 0 and (epoch == 1 or epoch % every == 0 or epoch == epochs)


@dataclass(frozen=True)
class Probe:
    """eval_linear.py's head, schedule and images (SPEC §5)."""
    RESUME = "refuse"
    pretrained: str = ""
    crops_size: tuple = (224,)
    num_classes: int = 1000
    weights: str = "freeze"
    train_percent: int = 100
    train_files: str = None
    lr_encoder: float = 2e-4
    lr_classifier: float = 40.0
    scheduler: str = "step"
    epochs: int = warn("the learning-rate schedule was recomputed for the new length",
                       default=100)


@dataclass(frozen=True)
class Knn:
    """eval_knn.py's weighted k-NN (SPEC §6)."""
    RESUME = "free"
    pretrained: str = ""
    crops_size: tuple = (224,)
    num_classes: int = 1000
    nb_knn: tuple = (5, 10, 15, 20, 25)
    knn_temperature: float = 0.07
    use_cuda: bool = True


@dataclass(frozen=True)
class Pretraining:
    """The configs of main.py."""
    run: Run
    data: Data
    views: Views
    encoder: Encoder
    heads: Heads
    method: Method
    optim: Optim
    loop: Loop
    monitor: Monitor


@dataclass(frozen=True)
class Probing:
    """The configs of eval_linear.py."""
    run: Run
    data: Data
    encoder: Encoder
    probe: Probe
    loop: Loop


@dataclass(frozen=True)
class KnnEval:
    """The configs of eval_knn.py."""
    run: Run
    data: Data
    encoder: Encoder
    knn: Knn
