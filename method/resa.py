"""ReSA: Representation Self-Assignment (SPEC §3).

The online network is trained to reproduce, through its embedding similarities, the
clusters that Sinkhorn-Knopp finds among the encoder's own features.
"""
import torch
import torch.nn.functional as F

from method.base import UNIT, Hyper, MomentumMethod, sinkhorn_knopp
from src.distributed import gather


def resa_loss(z_online, z_momentum, h, h_momentum, temperature, eps=0.05, n_iterations=3):
    """The ReSA objective, SPEC §3 steps 3c-4, as a pure function.

    z_online:   V local embeddings (B×D each, L2-normalised, with gradients).
    z_momentum: 2 gathered momentum embeddings (N×D, normalised) of views 0 and 1.
    h:          local online features of the weak view (B×F, normalised, detached).
    h_momentum: gathered momentum features of the weak view (N×F, normalised).
    Returns the mean over (q, v), q != v, of the cross-entropy between the self-
    assignment A = SK(h·h_momentumᵀ) and softmax(z_q·z'_vᵀ / temperature).
    """
    with torch.no_grad():
        with torch.autocast(h.device.type, enabled=False):
            assign = sinkhorn_knopp(h.float() @ h_momentum.float().t(), eps, n_iterations)
    losses = []
    for q, z_q in enumerate(z_online):
        for v, z_v in enumerate(z_momentum):
            if q == v:
                continue
            log_prob = F.log_softmax(z_q @ z_v.t() / temperature, dim=1)
            losses.append(-(assign * log_prob).sum(dim=1).mean())
    return sum(losses) / len(losses)


class ReSA(MomentumMethod):
    """ReSA (SPEC §2-3): online encoder -> projector -> predictor, momentum encoder and
    projector, the self-assignment on the weak view's encodings as the target."""

    HYPER = (Hyper("temperature", 0.4, "softmax temperature tau of the ReSA loss"),
             Hyper("momentum", 0.996, "base EMA coefficient of the momentum encoder/"
                   "projector; rises to 1 on a per-iteration half-cosine", valid=UNIT))
    WEAK_FIRST = True

    def __init__(self, encoder, feature_dim, heads, *, temperature=0.4, momentum=0.996):
        super().__init__(encoder, feature_dim, heads, momentum)
        self.temperature = temperature

    def forward(self, views):
        """One training step's loss for a list of V view batches (weak view first)."""
        views = self.to_device(views)
        # 1-2. online branch on every view; h = normalized weak-view feature, detached
        h, z = self.branch(views, self.encoder, self.projector, self.predictor)
        with torch.no_grad():
            # 3a. EMA first, with the coefficient set for this step
            self.update_momentum(self.momentum)
            # 3b. momentum branch on views 0 and 1, gathered to N rows in rank order
            h_m, z_m = self.branch(views[:2], self.momentum_encoder, self.momentum_projector)
            h_m, z_m = gather(h_m), [gather(e) for e in z_m]
        # 3c-4. self-assignment and cross-entropy
        return resa_loss(z, z_m, h, h_m, self.temperature)
