"""Encoders (torchvision ResNets without `fc`, or timm backbones without their
classifier), projector and predictor (SPEC §2).

A ResNet's parameter names are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ...),
so encoder weights move between this project, the authors' releases and torchvision
unchanged; a timm backbone's are timm's, so its weights load into
`timm.create_model(name, num_classes=0)`. timm is imported only for timm backbones.
"""
import difflib

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from src.errors import UsageError

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
ARCHS = tuple(RESNETS)  # every other --arch is a timm model name


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
    """Return (encoder, feature_dim) of config.Encoder `config`: a network whose forward
    gives the pooled features, a ResNet here or a timm backbone (`timm_backbone`).

    The cifar stem is resa_cifar's (SPEC §2): no max-pool and a 3x3 stride-1 conv that
    zero-pads by 2. The authors pad the input by one pixel (a ConstantPad2d without
    parameters) before their padding-1 conv; padding the conv by 2 is the same
    arithmetic with torchvision's state-dict keys, so a 32x32 image gives 34x34 maps.
    """
    if config.arch not in RESNETS:
        model = timm_backbone(config.arch, config.img_size, config.patch_size)
        return model, model.num_features
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


def import_timm(arch):
    """The timm module; without it, a name that is not a ResNet here is refused."""
    try:
        import timm
    except ImportError:
        raise UsageError(f"argument -a/--arch: invalid choice: {arch!r} (the ResNets: "
                         f"{', '.join(ARCHS)}; other backbones are timm models, and timm is "
                         f"not installed: pip install timm)") from None
    return timm


def timm_backbone(arch, img_size=224, patch_size=None):
    """timm's `arch` with no weights (nothing is downloaded) and no classifier
    (num_classes=0: the forward gives the pooled features, `num_features` of them).

    A ViT (a timm model with `dynamic_img_size`) is built for `img_size` pixels (its
    position embedding's grid) with patches of `patch_size` (None: the model's), and
    with dynamic_img_size=True, which interpolates that embedding for every other crop
    size, so that multi-crop's small views go through it too."""
    timm = import_timm(arch)
    plain = dict(pretrained=False, num_classes=0)
    with torch.device("meta"):  # no memory, no time: is it a ViT?
        vit = hasattr(timm.create_model(arch, **plain), "dynamic_img_size")
    if not vit:
        if patch_size:
            raise UsageError(f"--patch_size {patch_size}: --arch {arch} is not a ViT")
        return timm.create_model(arch, **plain)
    patch = {"patch_size": patch_size} if patch_size else {}
    return timm.create_model(arch, **plain, img_size=img_size, dynamic_img_size=True, **patch)


def check_arch(arch, crop_sizes, patch_size=None):
    """A UsageError unless `arch` is a ResNet here or a timm model that builds without
    weights and whose patches (for a ViT) tile every crop of `crop_sizes`. Checked at
    start-up (the model is built on the meta device: no memory, no time)."""
    if arch in RESNETS:
        if patch_size:
            raise UsageError(f"--patch_size {patch_size}: --arch {arch} is not a ViT")
        return
    if any(mark in arch for mark in ".:/"):
        raise UsageError(f"--arch {arch} names pretrained weights (a tag, a hub or a file); "
                         f"pretraining starts from scratch: give the bare model name, e.g. "
                         f"{arch.split(':')[-1].split('/')[-1].split('.')[0]}")
    timm = import_timm(arch)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, list(dict.fromkeys([*ARCHS, *timm.list_models()])), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"argument -a/--arch: invalid choice: {arch!r} (neither a ResNet "
                         f"here, {', '.join(ARCHS)}, nor a timm model{hint})")
    try:
        with torch.device("meta"):
            model = timm_backbone(arch, crop_sizes[0], patch_size)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise UsageError(f"timm cannot build --arch {arch} (--crops_size {crop_sizes[0]}, "
                         f"--patch_size {patch_size}): {str(err).splitlines()[0]}") from None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return
    untiled = [size for size in crop_sizes if size % patch[0] or size % patch[1]]
    if untiled:
        raise UsageError(f"--crops_size {' '.join(map(str, untiled))} not divisible by the "
                         f"patch size {patch[0]} of --arch {arch}: use crop sizes that are "
                         f"multiples of it or another --patch_size")


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
