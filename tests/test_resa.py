"""The ReSA maths (SPEC §3) against hand-written formulas, EMA ordering, layout."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from args import get_args, pretraining
from method import build_model
from method.base import sinkhorn_knopp
from method.resa import resa_loss


def dense_sinkhorn(scores, eps=0.05, iterations=3):
    """SPEC §3.3c written out element by element in float64 Python."""
    b, n = len(scores), len(scores[0])
    q = [[math.exp(scores[i][j] / eps) for i in range(b)] for j in range(n)]  # N×B
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        q = [[x / sum(row) / n for x in row] for row in q]
        cols = [sum(q[j][i] for j in range(n)) for i in range(b)]
        q = [[q[j][i] / cols[i] / b for i in range(b)] for j in range(n)]
    return [[q[j][i] * b for j in range(n)] for i in range(b)]  # B×N


def test_sinkhorn_rows_sum_to_one_and_match_dense():
    torch.manual_seed(0)
    h = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1)
    scores = h @ h.t()
    assign = sinkhorn_knopp(scores)
    assert assign.shape == (6, 6)
    assert assign.dtype == torch.float32
    assert torch.allclose(assign.sum(dim=1), torch.ones(6), atol=1e-5)
    expected = torch.tensor(dense_sinkhorn(scores.tolist()), dtype=torch.float32)
    assert torch.allclose(assign, expected, rtol=1e-4, atol=1e-6)


def test_sinkhorn_two_by_two_by_hand():
    # S = [[1, 0], [0, 1]], eps = 1: exp gives [[e, 1], [1, e]]; the matrix is already
    # doubly stochastic up to scale, so A = [[e, 1], [1, e]] / (e + 1).
    assign = sinkhorn_knopp(torch.eye(2), eps=1.0)
    e = math.e
    assert torch.allclose(assign, torch.tensor([[e, 1], [1, e]]) / (e + 1), atol=1e-6)


def hand_loss(z_online, z_momentum, assign, tau):
    """-mean_i sum_j A_ij log softmax_j(z_q·z'_v / tau), averaged over q != v, by hand."""
    terms = []
    for q, zq in enumerate(z_online):
        for v, zv in enumerate(z_momentum):
            if q == v:
                continue
            rows = []
            for i in range(len(zq)):
                logits = [sum(a * b for a, b in zip(zq[i], zv[j])) / tau for j in range(len(zv))]
                log_norm = math.log(sum(math.exp(x) for x in logits))
                rows.append(-sum(assign[i][j] * (logits[j] - log_norm) for j in range(len(zv))))
            terms.append(sum(rows) / len(rows))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("views", [2, 3])
def test_resa_loss_matches_hand_formula(views):
    torch.manual_seed(1)
    z = [F.normalize(torch.randn(4, 3), dim=1) for _ in range(views)]
    zm = [F.normalize(torch.randn(4, 3), dim=1) for _ in range(2)]
    h = F.normalize(torch.randn(4, 5), dim=1)
    hm = F.normalize(torch.randn(4, 5), dim=1)
    loss = resa_loss(z, zm, h, hm, temperature=0.4)
    assign = dense_sinkhorn((h.double() @ hm.double().t()).tolist())
    expected = hand_loss([t.tolist() for t in z], [t.tolist() for t in zm], assign, 0.4)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_term_count_with_multi_crop():
    # V = 3 averages 2(V-1) = 4 terms: (0,1) (1,0) (2,0) (2,1). Two-view calls give
    # (t01 + t10)/2 and, with view 2 twice, (t21 + t20)/2, so the mean of both must match.
    torch.manual_seed(2)
    z = [F.normalize(torch.randn(4, 3), dim=1) for _ in range(3)]
    zm = [F.normalize(torch.randn(4, 3), dim=1) for _ in range(2)]
    h = F.normalize(torch.randn(4, 5), dim=1)
    three = resa_loss(z, zm, h, h, 0.4)
    pairs = (resa_loss(z[:2], zm, h, h, 0.4) + resa_loss([z[2], z[2]], zm, h, h, 0.4)) / 2
    assert three.item() == pytest.approx(pairs.item(), rel=1e-6)


def tiny_args(*extra):
    return get_args(["--dataset", "cifar10", "--arch", "resnet18", "--mlp_dim", "32",
                     "--emb", "16", *extra])


def method_of(args):
    """main.py's method for the flags `args`."""
    config = pretraining(args)
    return build_model(config.method, config.heads, config.encoder)


def test_ema_update_happens_first_with_current_coefficient():
    torch.manual_seed(3)
    model = method_of(tiny_args())
    online = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    before = {k: v.clone() for k, v in model.momentum_encoder.state_dict().items()}
    for p in model.momentum_encoder.parameters():
        p.data.add_(1.0)  # make momentum and online weights differ
    shifted = {k: v.clone() for k, v in model.momentum_encoder.named_parameters()}
    model.momentum = 0.25
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    model(views)
    for name, p in model.momentum_encoder.named_parameters():
        expected = 0.25 * shifted[name] + 0.75 * online[name]
        assert torch.allclose(p, expected, atol=1e-6), name
    # buffers are not averaged: BN running stats follow the momentum branch's own forward
    assert not torch.equal(model.momentum_encoder.bn1.running_mean, before["bn1.running_mean"])


def test_momentum_forward_uses_updated_weights():
    """With m = 0 the EMA makes the momentum net an exact copy of the online net *before*
    its forward, so the loss equals the loss of a model whose copies were never touched."""
    torch.manual_seed(4)
    model = method_of(tiny_args("--no_pred"))
    reference = method_of(tiny_args("--no_pred"))
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in model.momentum_parameters():
            p.mul_(0).add_(3.0)  # garbage that the EMA must overwrite first
    model.momentum = reference.momentum = 0.0
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    assert model(views).item() == pytest.approx(reference(views).item(), rel=1e-5)


def test_cifar_recipe_has_the_authors_cifar_keys_and_no_predictor():
    """resa_cifar's method has no predictor: its state_dict is encoder, projector,
    momentum_encoder, momentum_projector (SPEC §7); --pred turns one on."""
    model = method_of(tiny_args())
    assert model.predictor is None
    assert [name for name, _ in model.named_children()] == [
        "encoder", "projector", "momentum_encoder", "momentum_projector"]
    assert {k.split(".")[0] for k in model.state_dict()} == {
        "encoder", "projector", "momentum_encoder", "momentum_projector"}
    assert method_of(tiny_args("--pred")).predictor is not None
    assert get_args(["--dataset", "cifar100"]).pred is False
    assert get_args(["--dataset", "demo"]).pred is True
    assert get_args(["--dataset", "imagenet", "--no_pred"]).pred is False


def test_state_dict_layout_matches_released_checkpoints():
    args = get_args(["--dataset", "imagenet", "--data_path", "unused"])  # resnet50 defaults
    model = method_of(args)
    assert [name for name, _ in model.named_children()] == [
        "encoder", "projector", "predictor", "momentum_encoder", "momentum_projector"]
    tv = {k for k in torchvision.models.resnet50().state_dict() if not k.startswith("fc.")}
    keys = model.state_dict().keys()
    for prefix in ("encoder.", "momentum_encoder."):
        assert {k[len(prefix):] for k in keys if k.startswith(prefix)} == tv
    def indices(prefix):
        return sorted({int(k.split(".")[1]) for k in keys if k.startswith(prefix)})
    assert indices("projector.") == [0, 1, 3, 4, 6, 7]
    assert indices("momentum_projector.") == [0, 1, 3, 4, 6, 7]
    assert indices("predictor.") == [0, 1, 3]
    assert "projector.7.weight" not in keys  # BN(emb, affine=False)
    assert model.state_dict()["projector.6.weight"].shape == (512, 2048)
    assert model.state_dict()["encoder.layer4.2.bn3.weight"].abs().sum() == 0  # zero-init


def test_momentum_copies_get_no_gradients():
    model = method_of(tiny_args("--pred"))
    assert all(not p.requires_grad for p in model.momentum_parameters())
    loss = model([torch.randn(4, 3, 32, 32) for _ in range(2)])
    loss.backward()
    assert all(p.grad is None for p in model.momentum_parameters())
    assert model.encoder.conv1.weight.grad is not None
    assert model.predictor[0].weight.grad is not None


class ResaCifarEncoder(torch.nn.Module):
    """resa_cifar's ResNet-18 as its get_encoder leaves it for CIFAR, written from its
    definition: the input zero-padded by one pixel (its `ConstantPad2d(1, 0.0)`), then
    a ResNet-18 whose conv1 is a 3x3 stride-1 conv with padding 1 and whose max-pool is
    gone; plain initialisation (zero_init_residual is off for resnet18)."""

    def __init__(self):
        super().__init__()
        self.pad = torch.nn.ConstantPad2d(1, 0.0)
        self.net = torchvision.models.resnet18()
        self.net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = torch.nn.Identity()
        self.net.fc = torch.nn.Identity()

    def forward(self, x):
        return self.net(self.pad(x))


def resa_cifar_projector(mlp_dim, emb):
    """resa_cifar's get_projector with 3 layers."""
    return torch.nn.Sequential(
        torch.nn.Linear(512, mlp_dim), torch.nn.BatchNorm1d(mlp_dim), torch.nn.ReLU(),
        torch.nn.Linear(mlp_dim, mlp_dim), torch.nn.BatchNorm1d(mlp_dim), torch.nn.ReLU(),
        torch.nn.Linear(mlp_dim, emb), torch.nn.BatchNorm1d(emb, affine=False))


def resa_cifar_step(nets, views, m, tau=0.4):
    """resa_cifar's ReSA.forward on one process: online branch on every view, EMA with
    coefficient m, momentum branch on views 0 and 1, Sinkhorn on h·h'ᵀ (in float64
    here), cross-entropy over q != v."""
    encoder, projector, momentum_encoder, momentum_projector = nets
    h = [encoder(x) for x in views]
    z = [F.normalize(projector(x)) for x in h]
    h0 = F.normalize(h[0]).detach()
    with torch.no_grad():
        for online, momentum in ((encoder, momentum_encoder), (projector, momentum_projector)):
            for p, p_m in zip(online.parameters(), momentum.parameters()):
                p_m.data = p_m.data * m + p.data * (1 - m)
        h_m = [momentum_encoder(x) for x in views[:2]]
        z_m = [F.normalize(momentum_projector(x)) for x in h_m]
        assign = torch.tensor(dense_sinkhorn((h0 @ F.normalize(h_m[0]).t()).tolist()),
                              dtype=torch.float64)
    terms = [-(assign * F.log_softmax(z[q] @ z_m[v].t() / tau, dim=1)).sum(1).mean()
             for q in range(len(z)) for v in range(len(z_m)) if q != v]
    return sum(terms) / len(terms)


def test_cifar10_step_equals_resa_cifars_network(one_thread):
    """main.py's CIFAR-10 model (resnet18, no predictor) against an independent
    reference of resa_cifar's network with the same weights copied by name: features,
    EMA, loss and gradients of a step, in float64. Our Sinkhorn runs in float32 (SPEC
    §3): with a float64 one the two agree exactly; as it is, to ~2e-7 in the loss."""
    args = get_args(["--dataset", "cifar10", "--mlp_dim", "64", "--emb", "32"])
    assert (args.arch, args.pred, args.stem) == ("resnet18", False, "cifar")
    torch.manual_seed(0)
    model = method_of(args).double()
    model.momentum = 0.9
    encoder, projector = ResaCifarEncoder(), resa_cifar_projector(64, 32)
    momentum_encoder, momentum_projector = ResaCifarEncoder(), resa_cifar_projector(64, 32)
    for ours, theirs in ((model.encoder, encoder.net), (model.projector, projector),
                         (model.momentum_encoder, momentum_encoder.net),
                         (model.momentum_projector, momentum_projector)):
        theirs.load_state_dict(ours.state_dict())  # strict: the same names
    with torch.no_grad():  # momentum weights unlike the online ones, so the EMA shows
        for p in model.momentum_parameters():
            p.mul_(0.5)
        for net in (momentum_encoder, momentum_projector):
            for p in net.parameters():
                p.mul_(0.5)
    nets = [net.double() for net in (encoder, projector, momentum_encoder, momentum_projector)]
    generator = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64)
             for _ in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.eval()(views[0]), encoder.eval()(views[0]),
                                   rtol=0, atol=1e-10)
    model.train(), encoder.train()
    loss, expected = model(views), resa_cifar_step(nets, views, 0.9)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(model.momentum_encoder.conv1.weight,
                               momentum_encoder.net.conv1.weight, rtol=0, atol=1e-12)
    loss.backward(), expected.backward()
    for ours, theirs in ((model.encoder.conv1, encoder.net.conv1),
                         (model.encoder.layer4[1].conv2, encoder.net.layer4[1].conv2),
                         (model.projector[0], projector[0])):
        scale = theirs.weight.grad.abs().max().item()  # float32 Sinkhorn: ~2e-6 of it
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=0,
                                   atol=1e-5 * scale)
