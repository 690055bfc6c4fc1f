"""Encoders in torchvision's layout, widened variants and the CIFAR stem (SPEC §2)."""
import pytest
import torch
import torchvision

from helpers_eval import resnet
from src.config import Encoder
from src.models import build_encoder, build_predictor, build_projector


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_encoder_matches_torchvision_layout(arch, dim):
    encoder, feature_dim = resnet(arch)
    assert feature_dim == dim
    reference = getattr(torchvision.models, arch)()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(encoder.state_dict())  # strict: same names and shapes
    x = torch.randn(2, 3, 64, 64)
    encoder.eval(), reference.eval()
    assert torch.equal(encoder(x), reference(x))


@pytest.mark.parametrize("arch,dim,width", [("resnet50x2", 4096, 128), ("resnet50x4", 8192, 256)])
def test_widened_resnets_scale_every_channel(arch, dim, width):
    encoder, feature_dim = build_encoder(Encoder(arch, zero_init_residual=True))
    assert feature_dim == dim
    assert encoder.conv1.out_channels == width
    assert encoder.layer4[-1].conv3.out_channels == dim
    assert encoder.layer4[-1].bn3.weight.abs().sum() == 0
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_resnet200_depth():
    encoder, dim = resnet("resnet200")
    assert dim == 2048 and [len(encoder.layer1), len(encoder.layer2), len(encoder.layer3),
                            len(encoder.layer4)] == [3, 24, 36, 3]


def test_cifar_stem_has_no_stride_and_no_max_pool():
    encoder, _ = resnet("resnet18", stem="cifar")
    assert encoder.conv1.kernel_size == (3, 3) and encoder.conv1.stride == (1, 1)
    assert isinstance(encoder.maxpool, torch.nn.Identity)
    stem = torch.nn.Sequential(encoder.conv1, encoder.bn1, encoder.relu, encoder.maxpool)
    assert stem(torch.randn(1, 3, 32, 32)).shape[-1] == 34  # resa_cifar's input pad


def test_projector_and_predictor_shapes():
    projector = build_projector(512, mlp_layers=3, mlp_dim=64, emb=16)
    kinds = [type(m).__name__ for m in projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU",
                     "Linear", "BatchNorm1d"]
    assert not projector[7].affine
    assert build_projector(512, 1, 64, 16)[0].in_features == 512
    predictor = build_predictor(16, 64)
    assert [type(m).__name__ for m in predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert predictor(torch.randn(4, 16)).shape == (4, 16)


def test_stem_follows_the_dataset_unless_asked():
    from args import get_args, pretraining
    from method import build_model
    for flags, kernel in ((["--dataset", "fashion_mnist"], (3, 3)),
                          (["--dataset", "fashion_mnist", "--stem", "imagenet"], (7, 7)),
                          (["--dataset", "demo"], (7, 7)),
                          (["--dataset", "demo", "--stem", "cifar"], (3, 3))):
        config = pretraining(get_args([*flags, "--mlp_dim", "16", "--emb", "8"]))
        model = build_model(config.method, config.heads, config.encoder)
        assert model.encoder.conv1.kernel_size == kernel, flags
        assert model.momentum_encoder.conv1.kernel_size == kernel


def test_cifar_stem_pads_a_32px_image_to_34x34_maps_by_hand():
    """resa_cifar zero-pads its input by one pixel and runs its 3x3 stride-1 conv with
    padding 1, so conv1 sees the image padded by 2 and gives 34x34 maps. With every
    conv1 weight 1 and an input of ones, an output pixel is 3 (channels) x the number
    of real pixels under its 3x3 window: 3 at a corner (1 pixel), 12 one step in
    (2x2), 9 and 18 on the edges (1x3, 2x3), 27 inside."""
    encoder, dim = resnet("resnet18", stem="cifar")
    seen = {}
    for name in ("conv1", "layer1", "layer2", "layer4"):
        getattr(encoder, name).register_forward_hook(
            lambda module, inputs, output, name=name: seen.setdefault(name, output))
    with torch.no_grad():
        encoder.conv1.weight.fill_(1.0)
        features = encoder.eval()(torch.ones(1, 3, 32, 32))
    assert features.shape == (1, dim)
    conv1 = seen["conv1"][0]
    assert conv1.shape == (64, 34, 34)
    for (row, col), value in {(0, 0): 3, (33, 33): 3, (0, 33): 3, (1, 1): 12, (32, 32): 12,
                              (0, 17): 9, (17, 33): 9, (1, 17): 18, (17, 32): 18,
                              (2, 2): 27, (17, 17): 27, (31, 2): 27}.items():
        assert torch.all(conv1[:, row, col] == value), (row, col)
    real = torch.tensor([1, 2] + [3] * 30 + [2, 1], dtype=torch.float32)  # rows under a window
    assert torch.equal(conv1[0], 3 * real[:, None] * real[None, :])
    assert seen["layer1"].shape[-2:] == (34, 34)
    assert seen["layer2"].shape[-2:] == (17, 17) and seen["layer4"].shape[-2:] == (5, 5)


def test_cifar_stem_is_resa_cifars_pad_then_conv_and_adds_no_key():
    """A 3x3 conv with padding 2 is exactly ConstantPad2d(1, 0) followed by the same conv
    with padding 1 (zero padding composes); the pad has no parameter, so the state dict
    is torchvision's and a torchvision ResNet with the swapped stem loads it (README)."""
    torch.manual_seed(0)
    encoder, _ = resnet("resnet18", stem="cifar")
    encoder = encoder.double().eval()
    authors_stem = torch.nn.Sequential(torch.nn.ConstantPad2d(1, 0.0),
                                       torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)).double()
    authors_stem[1].weight.data.copy_(encoder.conv1.weight)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(encoder.conv1(x), authors_stem(x), rtol=0, atol=1e-12)

    reference = torchvision.models.resnet18()
    assert set(encoder.state_dict()) == {k for k in reference.state_dict()
                                         if not k.startswith("fc.")}
    reference.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    reference.maxpool = torch.nn.Identity()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(encoder.state_dict())  # strict
    reference = reference.double().eval()
    with torch.no_grad():
        assert torch.equal(reference(x), encoder(x))
