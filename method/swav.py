"""SwAV: Swapping Assignments between Views (Caron et al., 2020).

Each view's embedding is scored against learnable prototypes; the codes of one view,
found by Sinkhorn-Knopp, are predicted from the scores of every other view. ReSA is
defined against it: ReSA assigns samples to the encoder's own features instead of to
prototypes, with the same Sinkhorn-Knopp (`method.base.sinkhorn_knopp`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from method.base import BaseMethod, sinkhorn_knopp


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

    Defaults are the reference's: a 2-layer head (Linear 2048 -> BN -> ReLU -> Linear
    128, no output BN), 3,000 prototypes, temperature 0.1, ε 0.05, 3 iterations. There
    is no queue (the reference's default `queue_length 0`). Multi-crop comes through
    the views list: codes from views 0 and 1, predicted from all V views.

    The prototypes are L2-normalised before every step. While `freeze_prototypes` is
    True (the caller sets it for the first iterations, the reference's
    `freeze_prototypes_niters`), their gradient is zero: they stay in the graph, since
    DDP expects a gradient for every parameter, where the reference drops the gradient
    after DDP's reduction. The optimizer's weight decay then only shrinks them along
    themselves, which the next normalisation undoes.
    """

    def __init__(self, encoder, feature_dim, *, temperature=0.1, prototypes=3000, eps=0.05,
                 sinkhorn_iterations=3, mlp_layers=2, mlp_dim=2048, emb=128, final_bn=False,
                 predictor=False, **network):
        super().__init__(encoder, feature_dim, mlp_layers=mlp_layers, mlp_dim=mlp_dim,
                         emb=emb, final_bn=final_bn, predictor=predictor, **network)
        self.prototypes = nn.Linear(emb, prototypes, bias=False)
        self.temperature, self.eps, self.sinkhorn_iterations = temperature, eps, sinkhorn_iterations
        self.freeze_prototypes = False

    def forward(self, views):
        """One training step's loss for a list of V view batches (weak view first)."""
        device = next(self.parameters()).device
        views = [x.to(device, non_blocking=True) for x in views]
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        _, z = self.branch(views, self.encoder, self.projector, self.predictor)
        weight = self.prototypes.weight
        if self.freeze_prototypes:
            weight = weight.detach() + 0 * weight  # same values, zero gradient
        scores = [F.linear(z_v, weight) for z_v in z]
        return swav_loss(scores, self.temperature, self.eps, self.sinkhorn_iterations)
