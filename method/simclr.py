"""SimCLR: contrastive learning with the batch as negatives (Chen et al., 2020).

Each embedding must pick the other view of its image among the 2N − 1 embeddings of
the gathered batch (NT-Xent); the negatives come from every process.
"""
import torch
import torch.nn.functional as F

from method.base import BaseMethod, Hyper
from src.distributed import gather_with_grad, get_rank


def nt_xent_loss(z_local, z_all, temperature, rank):
    """NT-Xent over the gathered batch, as a pure function.

    z_local: V local embeddings (B×D each, L2-normalised, with gradients).
    z_all:   the same V views gathered from every process (N×D each, with gradients);
             this process's rows are rank·B … rank·B + B − 1.
    For each pair (q, v), v ∈ {0, 1}, q != v, each local row of view q is classified
    among view v's N embeddings and view q's other N − 1, the positive being the same
    image in view v: cross-entropy of the logits z·zᵀ / temperature, self-similarity
    masked. Returns the mean over the local rows and the pairs. For V = 2 these are
    the reference's two directions (averaged where it sums them). Extra (multi-crop)
    views are paired with views 0 and 1, each pair a two-view NT-Xent: the pairs
    every method here averages, so that multi-crop means the same for all of them.
    """
    b = z_local[0].shape[0]
    rows = torch.arange(b, device=z_local[0].device) + rank * b  # this process's rows in z_all
    self_mask = F.one_hot(rows, z_all[0].shape[0]).bool()
    losses = []
    for q, z_q in enumerate(z_local):
        same_view = (z_q @ z_all[q].t() / temperature).masked_fill(self_mask, float("-inf"))
        for v in (0, 1):
            if v != q:
                logits = torch.cat([z_q @ z_all[v].t() / temperature, same_view], dim=1)
                losses.append(F.cross_entropy(logits, rows))
    return sum(losses) / len(losses)


class SimCLR(BaseMethod):
    """Encoder -> projector; no momentum network, no predictor.

    The head default (RECIPE) is the paper's 2-layer projector, width 2048, output 128
    (with the output batch norm of the authors' code, here without its learnable
    scale). Embeddings are gathered with their gradients (`gather_with_grad`), so W
    processes give the gradients of one process on the full batch.
    """

    HYPER = (Hyper("temperature", 0.2, "temperature of the NT-Xent loss"),)
    RECIPE = {"mlp_layers": 2, "mlp_dim": 2048, "emb": 128, "pred": False}

    def __init__(self, encoder, feature_dim, heads, *, temperature=0.2):
        super().__init__(encoder, feature_dim, heads)
        self.temperature = temperature

    def forward(self, views):
        """One training step's loss for a list of V view batches."""
        views = self.to_device(views)
        _, z = self.branch(views, self.encoder, self.projector, self.predictor)
        return nt_xent_loss(z, [gather_with_grad(z_v) for z_v in z], self.temperature,
                            get_rank())
