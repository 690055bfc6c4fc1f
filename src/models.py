"""Encoders (torchvision ResNets without `fc`), projector and predictor (SPEC §2).

Parameter names are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ...), so encoder
weights move between this project, the authors' releases and torchvision unchanged.
"""
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

# name -> (block, layers per stage, width multiplier of every channel)
RESNETS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], 1),
    "resnet34": (BasicBlock, [3, 4, 6, 3], 1),
    "resnet50": (Bottleneck, [3, 4, 6, 3], 1),
    "resnet101": (Bottleneck, [3, 4, 23, 3], 1),
    "resnet200": (Bottleneck, [3, 24, 36, 3], 1),
    "resnet50x2": (Bottleneck, [3, 4, 6, 3], 2),
    "resnet50x4": (Bottleneck, [3, 4, 6, 3], 4),
    "resnet50x5": (Bottleneck, [3, 4, 6, 3], 5),
    "resnet200x2": (Bottleneck, [3, 24, 36, 3], 2),
}
ARCHS = tuple(RESNETS)


class WideResNet(ResNet):
    """torchvision's ResNet with every channel count multiplied by `widen`.

    This is the SimCLR/SwAV widening (feature size 2048·widen), not torchvision's
    wide_resnet50_2, which widens only the bottleneck's inner convolution.
    """

    def __init__(self, block, layers, widen, zero_init_residual=False):
        super().__init__(block, layers)
        width = 64 * widen
        self.inplanes = width  # _make_layer reads and advances this
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.fc = nn.Linear(width * 8 * block.expansion, self.fc.out_features)
        _init_resnet(self, zero_init_residual)


def _init_resnet(model, zero_init_residual):
    """torchvision's ResNet initialisation, re-applied after layers are rebuilt."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def build_encoder(config):
    """Return (encoder, feature_dim) of config.Encoder `config`: a ResNet whose forward
    gives the pooled features.

    The cifar stem is resa_cifar's (SPEC §2): no max-pool and a 3x3 stride-1 conv that
    zero-pads by 2. The authors pad the input by one pixel (a ConstantPad2d without
    parameters) before their padding-1 conv; padding the conv by 2 is the same
    arithmetic with torchvision's state-dict keys, so a 32x32 image gives 34x34 maps.
    """
    block, layers, widen = RESNETS[config.arch]
    zero_init = config.zero_init_residual
    if widen == 1:
        model = ResNet(block, layers, zero_init_residual=zero_init)
    else:
        model = WideResNet(block, layers, widen, zero_init_residual=zero_init)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if config.stem == "cifar":
        width = model.conv1.out_channels
        model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=2, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model, feature_dim


def speed_up(model, channels_last=False, compile_backend=None):
    """channels_last memory format for `model` and, with `compile_backend`, each of its
    children compiled in place (so state-dict keys stay the authors')."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_backend:
        for child in model.children():
            child.compile(backend=compile_backend)
    return model


def input_format(channels_last):
    """The memory format that images must have for a model prepared by `speed_up`."""
    return torch.channels_last if channels_last else torch.contiguous_format


def build_projector(in_dim, mlp_layers, mlp_dim, emb):
    """(L-1) x [Linear -> BN -> ReLU], then Linear -> BN(affine=False)."""
    layers = []
    for _ in range(mlp_layers - 1):
        layers += [nn.Linear(in_dim, mlp_dim), nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True)]
        in_dim = mlp_dim
    layers += [nn.Linear(in_dim, emb), nn.BatchNorm1d(emb, affine=False)]
    return nn.Sequential(*layers)


def build_predictor(emb, mlp_dim):
    """Linear -> BN -> ReLU -> Linear, on the online branch only."""
    return nn.Sequential(nn.Linear(emb, mlp_dim), nn.BatchNorm1d(mlp_dim),
                         nn.ReLU(inplace=True), nn.Linear(mlp_dim, emb))
