"""The parts the methods here share: networks, the two branches, the EMA update and
Sinkhorn-Knopp (SPEC §2-3)."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.distributed import all_reduce_sum, get_world_size
from src.models import build_predictor, build_projector


@torch.no_grad()
def sinkhorn_knopp(scores, eps=0.05, n_iterations=3):
    """Self-assignment of B local samples over N = B·W gathered ones (SPEC §3.3c).

    `scores` is the local B×N similarity block; sums over the B axis are all-reduced
    so that W processes compute exactly what one process does on all N rows. Runs in
    float32 (callers pass float32 scores computed outside autocast). Returns A (B×N) whose rows sum to 1.
    Given B×K scores against K prototypes it is SwAV's `distributed_sinkhorn`: each
    prototype gets N/K of the mass, each sample 1.
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
    """Online encoder -> projector (-> predictor) and, in subclasses, momentum copies.

    The method is handed its encoder (any module mapping images to `feature_dim`
    features); the caller decides its stem and initialisation. Children are registered
    as encoder, projector, predictor so that `state_dict()` matches the authors'
    released checkpoints key for key (without `module.`).
    """

    def __init__(self, encoder, feature_dim, *, mlp_layers=3, mlp_dim=2048, emb=512,
                 predictor=True, momentum=0.996, final_bn=True):
        super().__init__()
        self.encoder, self.feature_dim = encoder, feature_dim
        projector = build_projector(feature_dim, mlp_layers, mlp_dim, emb)
        self.projector = projector if final_bn else projector[:-1]  # BYOL, SwAV: no output BN
        self.predictor = build_predictor(emb, mlp_dim) if predictor else None
        self.momentum = momentum

    def make_momentum_copies(self):
        """Momentum encoder/projector: frozen copies that only the EMA updates."""
        self.momentum_encoder = copy.deepcopy(self.encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self.momentum_parameters():
            p.requires_grad = False

    def evaluated_encoder(self):
        """The encoder that the evaluations, the monitor and `encoder.pth` use: the
        momentum encoder where the method has one (ReSA, as its authors evaluate),
        else the online one."""
        return self.momentum_encoder if hasattr(self, "momentum_encoder") else self.encoder

    def evaluated_projector(self):
        """The projector whose embedding Z the analyses use, beside `evaluated_encoder`."""
        return self.momentum_projector if hasattr(self, "momentum_projector") else self.projector

    def momentum_parameters(self):
        return [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]

    def online_parameters_to_average(self):
        return [*self.encoder.parameters(), *self.projector.parameters()]

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

    @torch.no_grad()
    def update_momentum(self, m):
        """theta_m <- m*theta_m + (1-m)*theta for parameters (not buffers)."""
        momentum_params = self.momentum_parameters()
        torch._foreach_mul_(momentum_params, m)
        torch._foreach_add_(momentum_params, self.online_parameters_to_average(), alpha=1 - m)

    def forward(self, views):
        raise NotImplementedError
