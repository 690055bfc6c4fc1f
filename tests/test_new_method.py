"""A new method is one class and one registry line: a toy method, written here and
registered in method.METHODS, pretrains through main.py with its own flag, resumes,
records its name, and a checkpoint is refused under another --method."""
import json

import pytest
import torch
import torch.nn.functional as F

import main as main_script
from method import METHODS
from method.base import BaseMethod, Hyper
from src.checkpoint import load_file

FLAGS = ["--dataset", "demo", "--arch", "resnet18", "--mlp_dim", "32", "--emb", "16",
         "--size_dataset", "16", "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0",
         "--eval_every", "0", "--seed", "0", "--workers", "0", "--log_every", "1"]


class Toy(BaseMethod):
    """Pull the embeddings of the two views of an image together, nothing else."""

    HYPER = (Hyper("toy_weight", 2.0, "scale of the toy loss"),)

    def __init__(self, encoder, feature_dim, heads, *, toy_weight=2.0):
        super().__init__(encoder, feature_dim, heads)
        self.toy_weight = toy_weight

    def forward(self, views):
        _, z = self.branch(self.to_device(views), self.encoder, self.projector, self.predictor)
        return self.toy_weight * (2 - 2 * F.cosine_similarity(z[0], z[1]).mean())


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", Toy)


def test_a_registered_method_pretrains_through_main_with_its_own_flag(toy, demo_path,
                                                                       tmp_path, capsys):
    with pytest.raises(SystemExit) as help_exit:
        main_script.main(["--help"])
    assert help_exit.value.code == 0
    assert "Toy (--method toy)" in capsys.readouterr().out  # its flag group

    dump = tmp_path / "toy"
    main_script.main([*FLAGS, "--data_path", demo_path, "--dump_path", str(dump),
                      "--method", "toy", "--toy_weight", "3.0"])
    checkpoint = load_file(dump / "checkpoint.pth.tar")
    assert (checkpoint["epoch"], checkpoint["args"]["method"]) == (1, "toy")
    assert checkpoint["args"]["toy_weight"] == 3.0
    assert checkpoint["evaluated_encoder"] == "encoder."
    assert not any(k.startswith("module.momentum") for k in checkpoint["state_dict"])
    assert set(torch.load(dump / "encoder.pth", weights_only=True)) == {
        k.removeprefix("module.encoder.") for k in checkpoint["state_dict"]
        if k.startswith("module.encoder.")}
    log = (dump / "out.log").read_text()
    assert "epoch 1/1 iter 2/2" in log and "networks: toy" in log

    # the checkpoint names its method: resuming it as ReSA is refused in one line
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main_script.main([*FLAGS, "--data_path", demo_path, "--dump_path", str(dump),
                          "--epochs", "2"])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--method toy -> resa" in err[0]
    assert json.dumps(checkpoint["args"])  # the recorded flags are plain values
