"""BYOL, SwAV and SimCLR: each loss against hand-written formulas and its known
properties, each method on a tiny resnet18, and two gloo processes against one."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from helpers_eval import resnet
from method.base import sinkhorn_knopp
from method.byol import BYOL, byol_loss
from method.resa import ReSA
from method.simclr import SimCLR, nt_xent_loss
from method.swav import SwAV, swav_loss
from src.checkpoint import encoder_form
from src.config import Heads
from src.distributed import gather_with_grad, get_rank
from test_distributed import on_two_gloo_ranks


def paper_heads(method, **sizes):
    """The heads of `method`'s paper (its RECIPE; ReSA's: config.Heads' defaults), with
    the widths `sizes` (mlp_dim, emb) if given."""
    return Heads(**{**method.RECIPE, **sizes})


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


# ---------------------------------------------------------------- BYOL

def test_byol_loss_matches_hand_formula():
    p, z = [unit(3, 4, seed=s) for s in range(3)], [unit(3, 4, seed=s) for s in (10, 11)]
    # pairs (q, v), q != v: (0,1) (1,0) (2,0) (2,1); each the mean over rows of 2 - 2 cos
    terms = [sum(2 - 2 * dot(a, b) for a, b in zip(p[q].tolist(), z[v].tolist())) / 3
             for q, v in ((0, 1), (1, 0), (2, 0), (2, 1))]
    assert byol_loss(p, z).item() == pytest.approx(sum(terms) / 4, rel=1e-6)


def test_byol_loss_is_0_for_equal_and_4_for_opposite_vectors():
    x = unit(5, 8, seed=0)
    assert byol_loss([x, x], [x, x]).item() == pytest.approx(0, abs=1e-6)
    assert byol_loss([x, x], [-x, -x]).item() == pytest.approx(4, rel=1e-6)
    assert byol_loss([x, -x], [-x, x]).item() == pytest.approx(0, abs=1e-6)  # swapped pairs


def test_byol_identical_views_through_identity_networks_give_zero():
    encoder = nn.Linear(6, 6)
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(6))
        encoder.bias.zero_()
    model = BYOL(encoder, 6, paper_heads(BYOL, mlp_dim=8, emb=6))
    model.projector = model.predictor = model.momentum_projector = nn.Identity()
    x = torch.randn(4, 6)
    assert model([x, x, x]).item() == pytest.approx(0, abs=1e-6)
    assert model([x, -x]).item() == pytest.approx(4, rel=1e-6)


# ---------------------------------------------------------------- SwAV

def swav_sinkhorn(scores, eps=0.05, iterations=3):
    """SwAV's distributed_sinkhorn on one process, in its K×B notation, float64."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(scores[i][c] / eps) for i in range(b)] for c in range(k)]  # K×B
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        q = [[x / sum(row) / k for x in row] for row in q]  # each prototype: mass 1/K
        samples = [sum(q[c][i] for c in range(k)) for i in range(b)]
        q = [[q[c][i] / samples[i] / b for i in range(b)] for c in range(k)]  # each sample 1/B
    return [[q[c][i] * b for c in range(k)] for i in range(b)]  # B×K codes, rows sum to 1


@pytest.mark.parametrize("b, k", [(4, 6), (6, 3)])
def test_sinkhorn_knopp_on_prototype_scores_is_swavs(b, k):
    """The function ReSA uses, given B×K prototype scores, normalises as SwAV does."""
    scores = unit(b, 5, seed=1) @ unit(k, 5, seed=2).t()
    expected = torch.tensor(swav_sinkhorn(scores.tolist()), dtype=torch.float32)
    assert torch.allclose(sinkhorn_knopp(scores), expected, rtol=1e-4, atol=1e-7)


def test_swav_codes_have_the_equipartition_marginals():
    scores = unit(12, 5, seed=3) @ unit(4, 5, seed=4).t()  # N = 12 samples, K = 4
    codes = sinkhorn_knopp(scores)
    assert torch.allclose(codes.sum(dim=1), torch.ones(12), atol=1e-5)  # exact each iteration
    converged = sinkhorn_knopp(scores, n_iterations=500)
    assert torch.allclose(converged.sum(dim=1), torch.ones(12), atol=1e-5)
    assert torch.allclose(converged.sum(dim=0), torch.full((4,), 12 / 4), atol=1e-3)


def swav_hand_loss(scores, tau):
    codes = [swav_sinkhorn(s) for s in scores[:2]]
    terms = []
    for a, q_a in enumerate(codes):
        for v, s_v in enumerate(scores):
            if v == a:
                continue
            rows = []
            for q_row, s_row in zip(q_a, s_v):
                log_norm = math.log(sum(math.exp(x / tau) for x in s_row))
                rows.append(-sum(q * (x / tau - log_norm) for q, x in zip(q_row, s_row)))
            terms.append(sum(rows) / len(rows))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("views", [2, 3])
def test_swav_loss_matches_hand_formula(views):
    prototypes = unit(6, 4, seed=5)
    scores = [unit(4, 4, seed=v) @ prototypes.t() for v in range(views)]
    expected = swav_hand_loss([s.tolist() for s in scores], 0.1)
    assert swav_loss(scores, 0.1).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- SimCLR

def test_nt_xent_matches_hand_formula():
    z0, z1 = unit(3, 2, seed=6), unit(3, 2, seed=7)
    views, tau = [z0.tolist(), z1.tolist()], 0.2
    terms = []
    for q, v in ((0, 1), (1, 0)):
        for i, anchor in enumerate(views[q]):
            positive = math.exp(dot(anchor, views[v][i]) / tau)
            others = sum(math.exp(dot(anchor, views[q][j]) / tau) for j in range(3) if j != i)
            total = sum(math.exp(dot(anchor, x) / tau) for x in views[v]) + others
            terms.append(-math.log(positive / total))
    loss = nt_xent_loss([z0, z1], [z0, z1], tau, rank=0)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_nt_xent_is_the_cross_entropy_of_the_masked_similarity_matrix():
    """The usual 2N×2N form: row i's label is its other view, the diagonal masked."""
    z0, z1 = unit(5, 4, seed=8), unit(5, 4, seed=9)
    z = torch.cat([z0, z1])
    logits = (z @ z.t() / 0.2).fill_diagonal_(float("-inf"))
    labels = torch.cat([torch.arange(5, 10), torch.arange(5)])
    expected = F.cross_entropy(logits, labels)
    assert nt_xent_loss([z0, z1], [z0, z1], 0.2, rank=0).item() == pytest.approx(
        expected.item(), rel=1e-6)


def test_gather_with_grad_is_the_identity_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x


# ---------------------------------------------------------------- the methods on a resnet18

def tiny(method, **kwargs):
    torch.manual_seed(0)
    encoder, feature_dim = resnet("resnet18")  # ImageNet stem: fast at 32 px
    extra = {"nmb_prototypes": 8} if method is SwAV else {}
    return method(encoder, feature_dim, paper_heads(method, mlp_dim=64, emb=32), **extra,
                  **kwargs)


def tiny_views():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g),
            torch.randn(4, 3, 16, 16, generator=g)]  # weak, strong, one small crop


def gradients(model, views):
    loss = model(views)
    loss.backward()
    assert torch.isfinite(loss)
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("method, trained", [
    (BYOL, ("encoder.", "projector.", "predictor.")),
    (SwAV, ("encoder.", "projector.", "prototypes.")),
    (SimCLR, ("encoder.", "projector.")),
])
def test_each_method_trains_only_its_online_networks(method, trained):
    model = tiny(method)
    grads = gradients(model, tiny_views())
    for name, grad in grads.items():
        if name.startswith(trained):
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        else:
            assert name.startswith("momentum_") and grad is None, name


def test_byol_averages_the_target_first_with_the_current_coefficient():
    model = tiny(BYOL)
    with torch.no_grad():
        for p in model.momentum_parameters():
            p.add_(1.0)
    target = [p.clone() for p in model.momentum_parameters()]
    online = [p.clone() for p in model.online_parameters_to_average()]
    model.momentum = 0.25
    model(tiny_views()[:2])
    for t, o, now in zip(target, online, model.momentum_parameters()):
        assert torch.allclose(now, 0.25 * t + 0.75 * o, atol=1e-6)


def test_swav_normalises_and_freezes_its_prototypes():
    model = tiny(SwAV)
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)
    model.freeze_prototypes = True
    grads = gradients(model, tiny_views())
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(8), atol=1e-6)
    assert torch.equal(grads["prototypes.weight"], torch.zeros(8, 32))
    assert grads["encoder.conv1.weight"].abs().sum() > 0
    before = model.prototypes.weight.clone()
    torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1).step()
    model.zero_grad()
    model.freeze_prototypes = False
    grads = gradients(model, tiny_views())  # renormalised: the frozen directions are back
    assert torch.allclose(model.prototypes.weight, before, atol=1e-6)
    assert grads["prototypes.weight"].abs().sum() > 0


def test_state_dict_layout_and_paper_heads():
    encoder, feature_dim = resnet("resnet18")
    shapes = {}
    for method in (BYOL, SwAV, SimCLR):
        model = method(encoder, feature_dim, paper_heads(method))
        shapes[method] = ([name for name, _ in model.named_children()],
                          {k: tuple(v.shape) for k, v in model.state_dict().items()
                           if not k.startswith(("encoder.", "momentum_encoder."))})
        assert encoder_form(model.state_dict())[0].keys() == encoder.state_dict().keys()
    children, byol = shapes[BYOL]
    assert children == ["encoder", "projector", "predictor", "momentum_encoder",
                        "momentum_projector"]
    assert byol["projector.0.weight"] == (4096, 512) and byol["projector.3.weight"] == (256, 4096)
    assert byol["predictor.0.weight"] == (4096, 256) and byol["predictor.3.weight"] == (256, 4096)
    assert "projector.4.running_mean" not in byol  # no output batch norm
    children, swav = shapes[SwAV]
    assert children == ["encoder", "projector", "prototypes"]
    assert swav["projector.3.weight"] == (128, 2048) and "projector.4.running_mean" not in swav
    assert swav["prototypes.weight"] == (3000, 128)
    children, simclr = shapes[SimCLR]
    assert children == ["encoder", "projector"]
    assert simclr["projector.3.weight"] == (128, 2048)
    assert simclr["projector.4.running_mean"] == (128,)  # the authors' output batch norm


def test_evaluated_networks():
    """ReSA: its momentum networks, as its authors; BYOL: the online ones, as BYOL's
    authors; SwAV and SimCLR have only the online ones."""
    models = {m: tiny(m) for m in (ReSA, BYOL, SwAV, SimCLR)}
    resa = models.pop(ReSA)
    assert resa.evaluated_encoder() is resa.momentum_encoder
    assert resa.evaluated_projector() is resa.momentum_projector
    for model in models.values():
        assert model.evaluated_encoder() is model.encoder
        assert model.evaluated_projector() is model.projector


# ---------------------------------------------------------------- two gloo processes

B, V, D, K = 4, 3, 8, 6  # per-process batch, views, embedding, prototypes


def make_inputs():
    """Full-batch (N = 2B) inputs of each loss; the ones of index 0 get gradients."""
    prototypes = unit(K, D, seed=20)
    return {
        "byol": ([unit(2 * B, D, seed=21 + v) for v in range(V)],
                 [unit(2 * B, D, seed=31 + v) for v in range(2)]),
        "swav": ([unit(2 * B, D, seed=41 + v) @ prototypes.t() for v in range(V)],),
        "simclr": ([unit(2 * B, D, seed=51 + v) for v in range(V)],),
    }


def losses_and_grads(inputs, rows=slice(None)):
    """Each loss on rows `rows` of its inputs, with the gradients of its first input."""
    results = {}
    for name, (first, *rest) in inputs.items():
        first = [t[rows].clone().requires_grad_() for t in first]
        rest = [[t[rows] for t in arg] for arg in rest]
        if name == "byol":
            loss = byol_loss(first, *rest)
        elif name == "swav":
            loss = swav_loss(first, 0.1)
        else:
            loss = nt_xent_loss(first, [gather_with_grad(z) for z in first], 0.2, get_rank())
        loss.backward()
        results[name] = (loss.item(), [t.grad.tolist() for t in first])
    return results


def ddp_steps(rank):
    """Two DDP steps of SwAV with frozen prototypes and one of SimCLR: DDP (without
    find_unused_parameters) accepts both graphs. Returns the prototypes' gradient."""
    torch.manual_seed(rank)
    swav = DistributedDataParallel(SwAV(nn.Flatten(), 12, paper_heads(SwAV, mlp_dim=16, emb=8),
                                        nmb_prototypes=K))
    swav.module.freeze_prototypes = True
    for _ in range(2):
        swav([torch.randn(B, 3, 2, 2) for _ in range(2)]).backward()
    simclr = DistributedDataParallel(SimCLR(nn.Flatten(), 12,
                                            paper_heads(SimCLR, mlp_dim=16, emb=8)))
    simclr([torch.randn(B, 3, 2, 2) for _ in range(2)]).backward()
    return swav.module.prototypes.weight.grad.abs().sum().item()


def worker(rank, port, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2,
                            rank=rank)
    try:
        inputs = make_inputs()
        local = slice(rank * B, (rank + 1) * B)
        codes = sinkhorn_knopp(inputs["swav"][0][0][local])
        x = torch.arange(3.0, requires_grad=True)
        (gather_with_grad(x * (rank + 1)) * torch.arange(6.0)).sum().backward()
        # plain lists: tensors would travel as shared memory that dies with this process
        queue.put((rank, losses_and_grads(inputs, local), codes.tolist(), x.grad.tolist(),
                   ddp_steps(rank)))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process_for_every_loss():
    results = on_two_gloo_ranks(worker)

    inputs = make_inputs()
    for name, (full_loss, full_grads) in losses_and_grads(inputs).items():
        halves = [results[r][0][name] for r in range(2)]
        # the full-batch loss is the mean of the per-process losses (as DDP averages)
        assert (halves[0][0] + halves[1][0]) / 2 == pytest.approx(full_loss, rel=1e-6), name
        # per-process gradients, averaged by DDP (divided by W = 2), are the full-batch rows
        for v, full in enumerate(full_grads):
            stitched = torch.tensor(halves[0][1][v] + halves[1][1][v]) / 2
            assert torch.allclose(stitched, torch.tensor(full), atol=1e-6), (name, v)
    # the distributed Sinkhorn of the halves gives the codes of the full batch
    codes = sinkhorn_knopp(inputs["swav"][0][0])
    assert torch.allclose(torch.tensor(results[0][1] + results[1][1]), codes, atol=1e-6)
    # gather_with_grad's backward: the sum over processes of the gathered rows' gradients
    assert results[0][2] == [0.0, 2.0, 4.0] and results[1][2] == [12.0, 16.0, 20.0]
    assert results[0][3] == 0 == results[1][3]  # frozen prototypes under DDP
