"""Accuracy counts shared by the evaluations.

Counts (not percentages) are returned so that processes can sum them with one
all-reduce before dividing by the total number of samples.
"""
import torch


@torch.no_grad()
def topk_correct(scores, target, ks=(1, 5)):
    """How many rows of `scores` (rows x classes) have `target` among their k highest
    entries, for each k in `ks` (k above the number of classes counts every row).

    Returns a float64 tensor of len(ks) counts on the device of `scores`.
    """
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hits = top.eq(target.view(-1, 1))
    return torch.stack([hits[:, :min(k, kmax)].any(dim=1).sum() for k in ks]).double()


def percent(count, total):
    """`count` of `total` in percent, as a float (0 for an empty set)."""
    total = float(total)
    return 100.0 * float(count) / total if total else 0.0
