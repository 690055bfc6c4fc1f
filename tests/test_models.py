"""Encoders in torchvision's layout, widened variants and the CIFAR stem (SPEC §2)."""
import pytest
import torch
import torchvision

from src.models import build_encoder, build_predictor, build_projector


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_encoder_matches_torchvision_layout(arch, dim):
    encoder, feature_dim = build_encoder(arch)
    assert feature_dim == dim
    reference = getattr(torchvision.models, arch)()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(encoder.state_dict())  # strict: same names and shapes
    x = torch.randn(2, 3, 64, 64)
    encoder.eval(), reference.eval()
    assert torch.equal(encoder(x), reference(x))


@pytest.mark.parametrize("arch,dim,width", [("resnet50x2", 4096, 128), ("resnet50x4", 8192, 256)])
def test_widened_resnets_scale_every_channel(arch, dim, width):
    encoder, feature_dim = build_encoder(arch, zero_init_residual=True)
    assert feature_dim == dim
    assert encoder.conv1.out_channels == width
    assert encoder.layer4[-1].conv3.out_channels == dim
    assert encoder.layer4[-1].bn3.weight.abs().sum() == 0
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_resnet200_depth():
    encoder, dim = build_encoder("resnet200")
    assert dim == 2048 and [len(encoder.layer1), len(encoder.layer2), len(encoder.layer3),
                            len(encoder.layer4)] == [3, 24, 36, 3]


def test_cifar_stem_keeps_resolution():
    encoder, _ = build_encoder("resnet18", small_images=True)
    assert encoder.conv1.kernel_size == (3, 3) and encoder.conv1.stride == (1, 1)
    assert isinstance(encoder.maxpool, torch.nn.Identity)
    stem = torch.nn.Sequential(encoder.conv1, encoder.bn1, encoder.relu, encoder.maxpool)
    assert stem(torch.randn(1, 3, 32, 32)).shape[-1] == 32


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
    from args import get_args
    from method import get_method
    for flags, kernel in ((["--dataset", "fashion_mnist"], (3, 3)),
                          (["--dataset", "fashion_mnist", "--stem", "imagenet"], (7, 7)),
                          (["--dataset", "demo"], (7, 7)),
                          (["--dataset", "demo", "--stem", "cifar"], (3, 3))):
        model = get_method(get_args([*flags, "--mlp_dim", "16", "--emb", "8"]))
        assert model.encoder.conv1.kernel_size == kernel, flags
        assert model.momentum_encoder.conv1.kernel_size == kernel
