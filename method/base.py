"""What the methods here share: the networks around a given encoder, the two
branches, the EMA update, Sinkhorn-Knopp (SPEC §2-3), and what a method tells the
scripts (its hyper-parameters, the network to evaluate, its per-step schedules).

A new method is one file with a BaseMethod subclass (its loss a pure function beside
it) and one line in method/__init__.py's METHODS.
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.distributed import all_reduce_sum, get_world_size
from src.errors import UsageError
from src.models import build_predictor, build_projector
from src.schedules import cosine_schedule

POSITIVE = ("positive", lambda value: value > 0)
UNIT = ("in [0, 1]", lambda value: 0 <= value <= 1)
NON_NEGATIVE = (">= 0", lambda value: value >= 0)


@dataclass(frozen=True)
class Hyper:
    """A hyper-parameter of a method: the flag --`name` (args.py makes it), its
    default, its help and the rule a valid value follows ((words, predicate))."""
    name: str
    default: object
    help: str
    type: type = float
    valid: tuple = POSITIVE


@torch.no_grad()
def sinkhorn_knopp(scores, eps=0.05, n_iterations=3):
    """Self-assignment of B local samples over N = B·W gathered ones (SPEC §3.3c).

    `scores` is the local B×N similarity block; sums over the B axis are all-reduced
    so that W processes compute exactly what one process does on all N rows. Runs in
    float32 (callers pass float32 scores computed outside autocast). Returns A (B×N)
    whose rows sum to 1. Given B×K scores against K prototypes it is SwAV's
    `distributed_sinkhorn`: each prototype gets N/K of the mass, each sample 1.
    """
    q = torch.exp(scores.float() / eps).t()  # N×B
    n_rows = q.shape[0]
    n_samples = q.shape[1] * get_world_size()
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= n_rows
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


class BaseMethod(nn.Module):
    """Online encoder -> projector (-> predictor), built from config.Heads `heads`.

    The method is handed its encoder (any module mapping images to `feature_dim`
    features); the caller decides its stem and initialisation. Children are registered
    as encoder, projector, predictor so that `state_dict()` matches the authors'
    released checkpoints key for key (without `module.`). Class attributes, read by
    args.py: HYPER (the method's flags), RECIPE (defaults of shared flags that differ
    from ReSA's), WEAK_FIRST (the first view is the weak view, as ReSA assigns on it).
    """

    HYPER = ()
    RECIPE = {}
    WEAK_FIRST = False

    def __init__(self, encoder, feature_dim, heads, final_bn=True):
        super().__init__()
        self.encoder, self.feature_dim = encoder, feature_dim
        projector = build_projector(feature_dim, heads.mlp_layers, heads.mlp_dim, heads.emb)
        self.projector = projector if final_bn else projector[:-1]  # BYOL, SwAV: no output BN
        self.predictor = build_predictor(heads.emb, heads.mlp_dim) if heads.pred else None

    @classmethod
    def hyper_values(cls, given):
        """HYPER's defaults, overridden by the dict `given` (a name HYPER lacks is a
        TypeError, as a wrong keyword argument would be)."""
        values = {h.name: h.default for h in cls.HYPER}
        unknown = set(given) - set(values)
        if unknown:
            raise TypeError(f"{cls.__name__} has no hyper-parameter {sorted(unknown)}")
        return values | given

    def evaluated_encoder(self):
        """The encoder that the evaluations, the monitor and `encoder.pth` use."""
        return self.encoder

    def evaluated_projector(self):
        """The projector whose embedding Z the analyses use, beside `evaluated_encoder`."""
        return self.projector

    def evaluated_prefix(self):
        """The state-dict prefix of `evaluated_encoder` (e.g. 'momentum_encoder.'), kept
        in checkpoints so that the evaluations load that encoder."""
        return next(name for name, child in self.named_children()
                    if child is self.evaluated_encoder()) + "."

    def prepare(self, epochs, iters_per_epoch):
        """Build the per-iteration schedules of a run of `epochs` x `iters_per_epoch`."""

    def before_step(self, iteration):
        """Set this step's scheduled values; returns the scalars to log."""
        return {}

    def branch(self, views, encoder, projector, predictor=None):
        """Encode each view separately (batch-norm statistics stay per view).

        Returns (normalized feature of view 0, detached; list of normalized embeddings).
        The predictor is applied only when gradients are enabled.
        """
        feats = [encoder(x) for x in views]
        embs = [projector(f) for f in feats]
        if predictor is not None and torch.is_grad_enabled():
            embs = [predictor(e) for e in embs]
        return F.normalize(feats[0]).detach(), [F.normalize(e) for e in embs]

    def to_device(self, views):
        device = next(self.parameters()).device
        return [x.to(device, non_blocking=True) for x in views]

    def forward(self, views):
        raise NotImplementedError


class MomentumMethod(BaseMethod):
    """A method with momentum copies of its encoder and projector, which only the EMA
    updates: θ_m <- m·θ_m + (1-m)·θ, m on a per-iteration half-cosine from `momentum`
    up to 1 (SPEC §4). The momentum networks are the ones evaluated."""

    def __init__(self, encoder, feature_dim, heads, momentum=0.996, final_bn=True):
        super().__init__(encoder, feature_dim, heads, final_bn)
        self.momentum_encoder = copy.deepcopy(self.encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self.momentum_parameters():
            p.requires_grad = False
        self.base_momentum = self.momentum = momentum
        self.momentums = None

    def evaluated_encoder(self):
        return self.momentum_encoder

    def evaluated_projector(self):
        return self.momentum_projector

    def prepare(self, epochs, iters_per_epoch):
        self.momentums = cosine_schedule(self.base_momentum, 1.0, epochs, iters_per_epoch)

    def before_step(self, iteration):
        self.momentum = float(self.momentums[iteration])
        return {"ema_momentum": self.momentum}

    def momentum_parameters(self):
        return [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]

    def online_parameters_to_average(self):
        return [*self.encoder.parameters(), *self.projector.parameters()]

    @torch.no_grad()
    def update_momentum(self, m):
        """theta_m <- m*theta_m + (1-m)*theta for parameters (not buffers)."""
        momentum_params = self.momentum_parameters()
        torch._foreach_mul_(momentum_params, m)
        torch._foreach_add_(momentum_params, self.online_parameters_to_average(), alpha=1 - m)


def require_predictor(heads, method):
    """A UsageError when `method` needs a predictor and --no_pred took it away."""
    if not heads.pred:
        raise UsageError(f"--method {method} needs its predictor: drop --no_pred")
