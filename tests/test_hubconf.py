"""torch.hub entry points (hubconf.py): every checkpoint form, paths and URLs, the
download cache and strict loading; offline only."""
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import ResNet

import hubconf
from helpers_eval import REPO, resnet
from src.checkpoint import with_module_prefix
from src.errors import UsageError
from src.models import build_projector

pytestmark = pytest.mark.usefixtures("one_thread")


def hub(model, **kwargs):
    return torch.hub.load(str(REPO), model, source="local", **kwargs)


def assert_same_tensors(model, state):
    assert isinstance(model, ResNet) and isinstance(model.fc, nn.Identity)
    assert set(model.state_dict()) == set(state)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[key]), key


def test_encoder_only_file_by_path(resnet18_file):
    assert_same_tensors(hub("resnet18", weights=str(resnet18_file)), torch.load(resnet18_file))


def test_full_checkpoint_by_file_url_gives_its_momentum_encoder(tmp_path):
    torch.manual_seed(0)
    online, _ = resnet("resnet18")
    momentum, _ = resnet("resnet18")
    projector = build_projector(512, 2, 16, 8).state_dict()
    state = {**{f"encoder.{k}": v for k, v in online.state_dict().items()},
             **{f"projector.{k}": v for k, v in projector.items()},
             **{f"momentum_encoder.{k}": v for k, v in momentum.state_dict().items()},
             **{f"momentum_projector.{k}": v for k, v in projector.items()}}
    path = tmp_path / "my run" / "checkpoint.pth.tar"  # a space: the URL quotes it
    path.parent.mkdir()
    # the authors' numpy 1.x training loop left numpy scalars in the optimizer state
    torch.save({"epoch": 2, "state_dict": with_module_prefix(state),
                "optimizer": {"param_groups": [{"lr": np.float64(0.1)}]}}, path)
    model = hub("resnet18", weights=path.as_uri())
    assert_same_tensors(model, momentum.state_dict())


def test_https_weights_are_downloaded_once_into_the_hub_cache(resnet18_file, tmp_path,
                                                             monkeypatch):
    downloads = []

    def fake_download(url, dst, progress=True):  # offline: copy the local file
        downloads.append(url)
        shutil.copy(resnet18_file, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = "https://example.org/releases/resa_resnet18_only.pth"
    for _ in range(2):
        assert_same_tensors(hubconf.resnet18(weights=url), torch.load(resnet18_file))
    assert downloads == [url]
    assert (tmp_path / "hub" / "checkpoints" / "resa_resnet18_only.pth").is_file()


def test_release_names_map_to_the_authors_urls(resnet18_file, tmp_path, monkeypatch):
    base = "https://github.com/winci-ai/resa/releases/download/resnet50/"
    assert len(hubconf.RELEASES) == 10
    for run in ("bs256_ep100", "bs256_ep200", "bs1024_ep100", "bs1024_ep200", "bs1024_ep800"):
        for kind in ("only", "full"):
            assert hubconf.RELEASES[f"{kind}_{run}"] == f"{base}resa_resnet50_{kind}_{run}.pth"
    fetched = []
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, progress=True: fetched.append(url)
                        or shutil.copy(resnet18_file, dst))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UsageError, match="does not fit"):  # a resnet18 file, in truth
        hubconf.resnet50(weights="only_bs256_ep100")
    assert fetched == [hubconf.RELEASES["only_bs256_ep100"]]


def test_mismatched_weights_are_a_clear_error(resnet18_file):
    with pytest.raises(UsageError, match="does not fit this model.*missing layer1.0.bn3"):
        hub("resnet50", weights=str(resnet18_file))
    with pytest.raises(UsageError, match="does not fit"):  # CIFAR stem: other conv1 shape
        hub("resnet18", weights=str(resnet18_file), small_images=True)


def test_unknown_names_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="no release of that name.*only_bs256_ep100"):
        hubconf.resnet50(weights="only_bs512_ep100")
    with pytest.raises(UsageError, match="checkpoint not found"):
        hubconf.resnet18(weights=str(tmp_path / "absent.pth"))


def test_no_weights_is_a_random_encoder():
    model = hub("resnet50")
    assert isinstance(model.fc, nn.Identity)
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)
    assert hubconf.dependencies == ["torch", "torchvision"]
