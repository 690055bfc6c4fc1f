"""BYOL: Bootstrap Your Own Latent (Grill et al., 2020).

The online network, through a predictor, regresses the target network's projection of
another view of the same image; the target is an EMA of the online network.
"""
import torch

from method.base import UNIT, Hyper, MomentumMethod, require_predictor


def byol_loss(p_online, z_target):
    """BYOL's normalised MSE, ‖p − z'‖² = 2 − 2·p·z', as a pure function.

    p_online: V local online predictions (B×D each, L2-normalised, with gradients).
    z_target: 2 local target projections of views 0 and 1 (B×D, normalised).
    Returns the mean over (q, v), q != v, of mean_i (2 − 2 p_q,i · z'_v,i): the pairs
    that ReSA's loss averages, so that multi-crop views are used the same way. For
    V = 2 it is half the reference's sum of its two symmetric terms.
    """
    losses = []
    for q, p_q in enumerate(p_online):
        for v, z_v in enumerate(z_target):
            if q != v:
                losses.append((2 - 2 * (p_q * z_v).sum(dim=1)).mean())
    return sum(losses) / len(losses)


class BYOL(MomentumMethod):
    """Online encoder -> projector -> predictor; EMA target encoder -> projector.

    The head defaults (RECIPE) are the paper's: 2-layer MLPs (Linear -> BN -> ReLU ->
    Linear) of width 4096 and output 256, the projector without an output batch norm.
    The target branch is not gathered: each sample's loss involves only its own views,
    so the mean over the local batch, averaged over processes by DDP, is already the
    full-batch loss and gradient.

    Evaluations use the online encoder and projector, as BYOL's authors evaluate
    (their linear evaluation loads `online_params`), not the target as ReSA does.
    """

    HYPER = (Hyper("momentum", 0.996, "base EMA coefficient of the target network; "
                   "rises to 1 on a per-iteration half-cosine", valid=UNIT),)
    RECIPE = {"mlp_layers": 2, "mlp_dim": 4096, "emb": 256, "pred": True}

    def __init__(self, encoder, feature_dim, heads, *, momentum=0.996):
        require_predictor(heads, "byol")
        super().__init__(encoder, feature_dim, heads, momentum, final_bn=False)

    def evaluated_encoder(self):
        return self.encoder

    def evaluated_projector(self):
        return self.projector

    def forward(self, views):
        """One training step's loss for a list of V view batches."""
        views = self.to_device(views)
        _, p = self.branch(views, self.encoder, self.projector, self.predictor)
        with torch.no_grad():
            # EMA first, with the coefficient set for this step (as ReSA: the target is
            # then the average up to the latest online weights, as in BYOL's update)
            self.update_momentum(self.momentum)
            _, z_target = self.branch(views[:2], self.momentum_encoder, self.momentum_projector)
        return byol_loss(p, z_target)
