"""Every checkpoint form users have loads into the evaluation encoder, strictly
(SPEC §5); anything else is one clear line with exit code 2."""
import os
import zipfile

import numpy as np
import pytest
import torch
import torchvision

from helpers_eval import assert_usage_error, fast_flags, resnet, run_script
from src.checkpoint import encoder_form, load_file, with_module_prefix
from src.errors import UsageError
from src.models import build_predictor, build_projector
from src.eval.pretrained import load_pretrained_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


def seeded_encoder(seed):
    torch.manual_seed(seed)
    encoder, _ = resnet("resnet18")
    for name, buffer in encoder.state_dict().items():  # distinct BN statistics too
        if name.endswith("running_mean"):
            buffer.normal_(0, 0.1)
    return encoder.state_dict()


ONLINE, MOMENTUM = seeded_encoder(1), seeded_encoder(2)


def prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def full_state():
    """The method's state_dict layout (SPEC §2) with distinct online/momentum encoders."""
    projector = build_projector(512, 3, 64, 32).state_dict()
    return {**prefixed(ONLINE, "encoder."), **prefixed(projector, "projector."),
            **prefixed(build_predictor(32, 64).state_dict(), "predictor."),
            **prefixed(MOMENTUM, "momentum_encoder."),
            **prefixed(projector, "momentum_projector.")}


def torchvision_resnet18():
    return {**MOMENTUM, **{k: v for k, v in torchvision.models.resnet18().state_dict().items()
                           if k.startswith("fc.")}}


FORMS = {
    # name: (file content, expected encoder state, words of the log line)
    "ours": ({"epoch": 3, "state_dict": with_module_prefix(full_state()),
              "optimizer": {"state": {}, "param_groups": []}, "args": {"arch": "resnet18"}},
             MOMENTUM, ("momentum encoder", "epoch 3")),
    # main.py records the encoder its method evaluates: BYOL's is the online one
    "ours_evaluating_the_online_encoder": (
        {"epoch": 3, "state_dict": with_module_prefix(full_state()),
         "evaluated_encoder": "encoder.", "args": {"arch": "resnet18", "method": "byol"}},
        ONLINE, ("full checkpoint: its online encoder", "epoch 3")),
    # the authors' loop writes the scheduled lr into the optimizer as a numpy float64
    "authors_full": ({"epoch": 100, "state_dict": with_module_prefix(full_state()),
                      "optimizer": {"state": {}, "param_groups": [
                          {"lr": np.float64(0.05), "momentum": 0.9, "params": [0]}]}},
                     MOMENTUM, ("momentum encoder", "epoch 100")),
    "our_export": (encoder_form(with_module_prefix(full_state()))[0], MOMENTUM,
                   ("torchvision layout",)),
    "torchvision_with_fc": (torchvision_resnet18(), MOMENTUM, ("fc head dropped",)),
    "module_prefix": (prefixed(ONLINE, "module."), ONLINE, ("torchvision layout",)),
    "momentum_encoder_prefix": (prefixed(MOMENTUM, "momentum_encoder."), MOMENTUM,
                                ("momentum encoder",)),
    "encoder_prefix": (prefixed(ONLINE, "encoder."), ONLINE, ("'encoder.' prefix",)),
    "module_encoder_prefix": (prefixed(ONLINE, "module.encoder."), ONLINE,
                              ("'encoder.' prefix",)),
    "nested_state_dict": ({"state_dict": dict(ONLINE)}, ONLINE, ("torchvision layout",)),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_loads_exactly(form, tmp_path, log_lines):
    content, expected, words = FORMS[form]
    path = tmp_path / "weights.pth"
    torch.save(content, path)
    encoder, _ = resnet("resnet18")
    assert load_pretrained_encoder(encoder, str(path))
    loaded = encoder.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert any(all(w in line for w in words) and str(path) in line for line in log_lines), \
        log_lines


def save_as_numpy1(content, path):
    """torch.save `content`, then rename numpy 2's scalar constructor in the pickle to
    the numpy 1.x name that the authors' released files carry."""
    torch.save(content, path.with_suffix(".np2"))
    with zipfile.ZipFile(path.with_suffix(".np2")) as src, \
            zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar",
                                    b"numpy.core.multiarray\nscalar")
            dst.writestr(info.filename, data)


def test_authors_numpy1_checkpoint_loads(tmp_path, log_lines):
    content, expected, _ = FORMS["authors_full"]
    path = tmp_path / "resa_full.pth"
    save_as_numpy1(content, path)
    assert b"numpy.core.multiarray\nscalar" in zipfile.ZipFile(path).read("resa_full/data.pkl")
    encoder, _ = resnet("resnet18")
    assert load_pretrained_encoder(encoder, str(path)) == "full checkpoint: its momentum encoder"
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in expected.items())
    lr = load_file(str(path))["optimizer"]["param_groups"][0]["lr"]
    assert isinstance(lr, np.float64) and lr == 0.05


@pytest.mark.parametrize("content", [b"hello, this is a text file\n", bytes(range(256)) * 4, b""])
def test_files_that_are_not_checkpoints(content, tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="is not a readable PyTorch checkpoint"):
        load_file(str(path))


def test_empty_path_keeps_the_random_encoder_with_a_warning(log_lines):
    encoder, _ = resnet("resnet18")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert load_pretrained_encoder(encoder, "") is None
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert any("RANDOMLY INITIALISED" in line for line in log_lines)


def load_error(content, tmp_path, arch="resnet18", stem="imagenet"):
    path = tmp_path / "bad.pth"
    torch.save(content, path)
    encoder, _ = resnet(arch, stem)
    with pytest.raises(UsageError) as err:
        load_pretrained_encoder(encoder, str(path))
    return str(err.value)


def test_missing_keys_are_listed(tmp_path):
    partial = {k: v for k, v in ONLINE.items() if not k.startswith("layer4.1.bn2")}
    message = load_error(partial, tmp_path)
    assert "missing layer4.1.bn2.bias" in message and "layer4.1.bn2.running_var" in message


def test_no_encoder_key_at_all(tmp_path):
    message = load_error({"head.weight": torch.zeros(2, 2)}, tmp_path)
    assert "fits no encoder" in message and "head.weight" in message


def test_other_arch_and_other_stem_are_refused(tmp_path):
    assert "missing layer1.0.bn3" in load_error(dict(ONLINE), tmp_path, arch="resnet50")
    assert "conv1.weight" in load_error(dict(ONLINE), tmp_path, stem="cifar")


def test_a_file_without_a_state_dict(tmp_path):
    assert "no state dict" in load_error(torch.zeros(3), tmp_path)


class Payload:
    """A custom class: weights_only loading must refuse to build it."""


class RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("make", [lambda marker: Payload(), RunsCode])
def test_pickled_objects_are_refused(make, tmp_path):
    marker = tmp_path / "ran"
    message = load_error({**ONLINE, "extra": make(marker)}, tmp_path)
    assert "pickled" in message and "weights_only" in message
    assert not marker.exists()


def test_script_refuses_pickled_code_with_one_line(image_folder, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": dict(ONLINE), "hook": RunsCode(marker)}, path)
    result = run_script("eval_knn.py", *fast_flags(image_folder, tmp_path / "out",
                                                   "--pretrained", path))
    assert_usage_error(result, str(path), "pickled")
    assert not marker.exists()


def test_script_missing_pretrained_file(image_folder, tmp_path):
    missing = tmp_path / "nowhere.pth"
    result = run_script("eval_knn.py", *fast_flags(image_folder, tmp_path / "out",
                                                   "--pretrained", missing))
    assert_usage_error(result, "not found", str(missing))


def test_script_text_file_as_pretrained(image_folder, tmp_path):
    path = tmp_path / "README.txt"
    path.write_text("not a checkpoint\n")
    result = run_script("eval_linear.py", *fast_flags(image_folder, tmp_path / "out",
                                                      "--pretrained", path, "--epochs", 1))
    assert_usage_error(result, str(path), "not a readable PyTorch checkpoint")


def test_script_checkpoint_that_fits_no_encoder(image_folder, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"module.head.weight": torch.zeros(2, 2)}}, path)
    result = run_script("eval_linear.py", *fast_flags(image_folder, tmp_path / "out",
                                                      "--pretrained", path, "--epochs", 1))
    assert_usage_error(result, "fits no encoder", "module.head.weight")
