"""SwAV: Swapping Assignments between Views (Caron et al., 2020).

Each view's embedding is scored against learnable prototypes; the codes of one view,
found by Sinkhorn-Knopp, are predicted from the scores of every other view. ReSA is
defined against it: ReSA assigns samples to the encoder's own features instead of to
prototypes, with the same Sinkhorn-Knopp (`method.base.sinkhorn_knopp`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from method.base import NON_NEGATIVE, BaseMethod, Hyper, sinkhorn_knopp


def swav_loss(scores, temperature, eps=0.05, n_iterations=3):
    """The swapped prediction, as a pure function.

    scores: V local prototype scores z_v·Cᵀ (B×K each, with gradients).
    The codes Q_a = SK(scores_a) of views a ∈ {0, 1} (SwAV's crops_for_assign) are
    computed without gradient, in float32. Returns the mean over (a, v), v != a, of
    −mean_i Σ_k Q_a,ik log softmax_k(scores_v,i / temperature): the reference's
    average over the other views, then over the two assigned views.
    """
    with torch.no_grad():
        with torch.autocast(scores[0].device.type, enabled=False):
            codes = [sinkhorn_knopp(s.float(), eps, n_iterations) for s in scores[:2]]
    losses = []
    for a, q_a in enumerate(codes):
        for v, s_v in enumerate(scores):
            if v != a:
                log_prob = F.log_softmax(s_v / temperature, dim=1)
                losses.append(-(q_a * log_prob).sum(dim=1).mean())
    return sum(losses) / len(losses)


class SwAV(BaseMethod):
    """Encoder -> projector -> L2-normalise -> prototypes; no momentum network.

    Defaults are the reference's: a 2-layer head (RECIPE: Linear 2048 -> BN -> ReLU ->
    Linear 128, no output BN), 3,000 prototypes, temperature 0.1, ε 0.05, 3 iterations.
    There is no queue (the reference's default `queue_length 0`). Multi-crop comes
    through the views list: codes from views 0 and 1, predicted from all V views.

    The prototypes are L2-normalised before every step. For the first
    `freeze_prototypes_epochs` (the reference's `freeze_prototypes_niters`: its first
    epoch) their gradient is zero: they stay in the graph, since DDP expects a gradient
    for every parameter, where the reference drops the gradient after DDP's reduction.
    The optimizer's weight decay then only shrinks them along themselves, which the
    next normalisation undoes.
    """

    HYPER = (Hyper("temperature", 0.1, "softmax temperature of the swapped prediction"),
             Hyper("nmb_prototypes", 3000, "number of prototypes", type=int),
             Hyper("epsilon", 0.05, "entropy regularisation of SwAV's Sinkhorn-Knopp"),
             Hyper("sinkhorn_iterations", 3, "Sinkhorn-Knopp iterations of SwAV's codes",
                   type=int),
             Hyper("freeze_prototypes_epochs", 1, "epochs at the start during which the "
                   "prototypes do not learn", type=int, valid=NON_NEGATIVE))
    RECIPE = {"mlp_layers": 2, "mlp_dim": 2048, "emb": 128, "pred": False}

    def __init__(self, encoder, feature_dim, heads, **hyper):
        """`hyper`: values of HYPER's names; the others keep HYPER's defaults."""
        super().__init__(encoder, feature_dim, heads, final_bn=False)
        hyper = self.hyper_values(hyper)
        self.prototypes = nn.Linear(heads.emb, hyper["nmb_prototypes"], bias=False)
        self.temperature, self.eps = hyper["temperature"], hyper["epsilon"]
        self.sinkhorn_iterations = hyper["sinkhorn_iterations"]
        self.freeze_epochs, self.freeze_iterations = hyper["freeze_prototypes_epochs"], 0
        self.freeze_prototypes = False

    def prepare(self, epochs, iters_per_epoch):
        self.freeze_iterations = self.freeze_epochs * iters_per_epoch

    def before_step(self, iteration):
        self.freeze_prototypes = iteration < self.freeze_iterations
        return {}

    def forward(self, views):
        """One training step's loss for a list of V view batches."""
        views = self.to_device(views)
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        _, z = self.branch(views, self.encoder, self.projector, self.predictor)
        weight = self.prototypes.weight
        if self.freeze_prototypes:
            weight = weight.detach() + 0 * weight  # same values, zero gradient
        scores = [F.linear(z_v, weight) for z_v in z]
        return swav_loss(scores, self.temperature, self.eps, self.sinkhorn_iterations)
