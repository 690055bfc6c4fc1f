"""torch.hub entry points: ReSA-pretrained ResNet encoders (torchvision ResNets whose
`fc` is nn.Identity, so the forward gives the pooled features) and timm backbones
pretrained here (`timm_backbone`, which needs timm).

    encoder = torch.hub.load("/path/to/this/repo", "resnet50", source="local",
                             weights="full_bs1024_ep800")
    vit = torch.hub.load("/path/to/this/repo", "timm_backbone", source="local",
                         arch="vit_small_patch16_224", weights="RUN/encoder.pth")

`weights` is a local path, a file:// URL, an http(s):// URL (downloaded once into
torch.hub's cache, `torch.hub.get_dir()/checkpoints`) or the name of one of the
authors' releases (RELEASES); every checkpoint form loads (our encoder.pth or
checkpoint.pth.tar, the authors' encoder-only or full files: a full checkpoint gives
its momentum encoder), with weights_only loading, strictly. `weights=None` gives a
randomly initialised encoder.
"""
import os
from urllib.parse import unquote, urlparse

import torch

from src.checkpoint import load_file
from src.config import Encoder
from src.errors import UsageError
from src.models import build_encoder, check_arch
from src.eval.pretrained import load_encoder_state

dependencies = ["torch", "torchvision"]

RELEASE_URL = "https://github.com/winci-ai/resa/releases/download/resnet50/resa_resnet50_{}.pth"
RELEASES = {f"{kind}_{run}": RELEASE_URL.format(f"{kind}_{run}")
            for kind in ("only", "full")  # encoder-only files, full training checkpoints
            for run in ("bs256_ep100", "bs256_ep200", "bs1024_ep100", "bs1024_ep200",
                        "bs1024_ep800")}


def local_file(weights, progress=True):
    """The local path of `weights`: a release name or http(s) URL is downloaded once
    into torch.hub's cache; a file:// URL or a path is used where it is."""
    url = RELEASES.get(weights, weights)
    scheme = urlparse(url).scheme
    if scheme == "file":
        return unquote(urlparse(url).path)
    if scheme not in ("http", "https"):
        path = os.path.expanduser(weights)
        if not os.path.exists(path) and os.sep not in weights:
            raise UsageError(f"weights {weights!r}: no such file and no release of that "
                             f"name (releases: {', '.join(RELEASES)})")
        return path
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(urlparse(url).path))
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        torch.hub.download_url_to_file(url, path, progress=progress)
    return path


def pretrained_resnet(arch, weights=None, small_images=False, progress=True):
    """An `arch` ResNet (resa_cifar's stem with `small_images`) loaded strictly from
    `weights`."""
    encoder, _ = build_encoder(Encoder(arch, "cifar" if small_images else "imagenet", False))
    return load_weights(encoder, weights, progress)


def load_weights(encoder, weights, progress=True):
    """`encoder` loaded strictly from `weights` (None: left as initialised)."""
    if weights is not None:
        path = local_file(weights, progress)
        load_encoder_state(encoder, load_file(path), path)
    return encoder


def timm_backbone(arch, weights=None, img_size=224, patch_size=None, progress=True):
    """The timm model `arch` without classifier (timm.create_model(arch, num_classes=0)),
    loaded strictly from `weights` (a path or URL of a run of main.py --arch `arch`:
    its encoder.pth or checkpoint.pth.tar; None = random). A ViT takes the run's
    --crops_size[0] as `img_size` and its --patch_size (None: the model's)."""
    check_arch(arch, [img_size], patch_size)
    encoder, _ = build_encoder(Encoder(arch, img_size=img_size, patch_size=patch_size))
    return load_weights(encoder, weights, progress)


def resnet50(weights=None, small_images=False, progress=True):
    """ReSA ResNet-50 encoder (2048 features). `weights`: a path, a URL or a release
    name of RELEASES, e.g. "only_bs256_ep100" or "full_bs1024_ep800"; None = random.
    `small_images` = resa_cifar's stem (3x3 stride-1 conv zero-padding by 2, no max-pool)."""
    return pretrained_resnet("resnet50", weights, small_images, progress)


def resnet18(weights=None, small_images=False, progress=True):
    """ReSA ResNet-18 encoder (512 features) from `weights` (a path or a URL; None =
    random); `small_images=True` for checkpoints trained on CIFAR-sized images."""
    return pretrained_resnet("resnet18", weights, small_images, progress)
