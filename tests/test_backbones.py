"""timm backbones (issue 19): a tiny ViT pretrains through main.py, resumes bit for bit,
and every evaluation reads what it wrote; the ViT recipe (AdamW, weight-decay cosine,
no decay on norms and biases, gradient clipping); bad names are one line."""
import json
import sys

import pytest
import torch

import eval_clusters
import eval_knn
import eval_linear
import hubconf
import main as main_script
from args import get_args, pretraining
from crash_run import arm, send
from helpers_run import digest
from method import build_model
from src.checkpoint import load_file
from src.config import Encoder, Optim
from src.eval.monitor import OnlineMonitor
from src.models import build_encoder
from src.schedules import wd_schedule
from src.train.optim import AmpOptimizer, build_optimizer

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

VIT = ["--arch", "vit_tiny_patch16_224", "--patch_size", "4"]
# two steps: 8 images in batches of 4; a weak 32 px view, a strong 32 px and a 16 px one
PRETRAIN = [*VIT, "--dataset", "imagenet", "--mlp_dim", "64", "--emb", "32",
            "--batch_size", "4", "--size_dataset", "8", "--epochs", "1", "--warmup_epochs",
            "0", "--workers", "0", "--seed", "0", "--checkpoint_minutes", "0",
            "--crops_nmb", "1", "1", "--crops_size", "32", "16", "--crops_min_scale", "0.2",
            "0.05", "--crops_max_scale", "1", "0.3", "--solarization_prob", "0.2", "0"]


def pretrain(folder, dump, *flags):
    """main.py in this process, on one thread (see conftest's one_thread, which a
    module fixture precedes); the exit code (0 when it returned)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main_script.main([*PRETRAIN, "--data_path", str(folder), "--dump_path", str(dump),
                          *flags])
    except SystemExit as stop:
        return stop.code
    finally:
        torch.set_num_threads(threads)
    return 0


@pytest.fixture(scope="module")
def vit_run(image_folder, tmp_path_factory):
    dump = tmp_path_factory.mktemp("vit")
    assert pretrain(image_folder, dump) == 0
    return dump


def tiny_vit(img_size=32):
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=img_size,
                             patch_size=4)


def test_vit_pretraining_writes_a_timm_encoder(vit_run):
    checkpoint = load_file(vit_run / "checkpoint.pth.tar")
    assert (checkpoint["epoch"], checkpoint["iteration"]) == (1, 0)
    assert checkpoint["args"]["optimizer"] == "adamw" and checkpoint["args"]["clip_grad"] == 3.0
    state = torch.load(vit_run / "encoder.pth", weights_only=True)
    model = tiny_vit()
    model.load_state_dict(state, strict=True)  # timm's layout, key for key
    momentum = {k.removeprefix("module.momentum_encoder."): v for k, v in
                checkpoint["state_dict"].items() if k.startswith("module.momentum_encoder.")}
    assert all(torch.equal(state[k], momentum[k]) for k in state) and set(state) == set(momentum)
    log = (vit_run / "out.log").read_text()
    assert "vit_tiny_patch16_224" in log and "timm layout" in log


def test_weight_decay_follows_its_cosine_on_the_decayed_group_only(vit_run):
    groups = load_file(vit_run / "checkpoint.pth.tar")["optimizer"]["param_groups"]
    wds = wd_schedule(Optim(wd=0.04, weight_decay_end=0.4, epochs=1), 2)
    assert wds[1] == pytest.approx(0.04 + 0.36 * 0.5)  # the last step's: cos(pi/2) = 0
    assert groups[0]["weight_decay"] == wds[1] and groups[1]["weight_decay"] == 0
    wds = wd_schedule(Optim(wd=0.04, weight_decay_end=0.4, epochs=2, warmup_epochs=1), 5)
    assert len(wds) == 10 and wds[0] == pytest.approx(0.04, abs=1e-15)  # no warm-up
    assert wds[-1] == pytest.approx(0.39119017294, abs=1e-10)  # 0.4 - 0.18 (1 + cos .9 pi)
    constant = wd_schedule(Optim(wd=1e-5, weight_decay_end=1e-5), 7)  # ResNets': exactly wd
    assert len(constant) == 700 and set(constant.tolist()) == {1e-5}
    assert [g["lr"] for g in groups] == pytest.approx([(5e-4 + 5e-5) / 2 * 4 / 256] * 2)


def test_a_stopped_and_resumed_vit_run_is_bit_identical(vit_run, image_folder, tmp_path,
                                                       monkeypatch):
    dump = tmp_path / "run"
    arm(0, "forward", 1, send("TERM"), monkeypatch.setattr)  # checkpoint after step 1
    assert pretrain(image_folder, dump) == 75
    assert load_file(dump / "checkpoint.pth.tar")["iteration"] == 1
    monkeypatch.undo()
    assert pretrain(image_folder, dump) == 0
    assert "resumed from" in (dump / "out.log").read_text()
    ours, reference = (load_file(d / "checkpoint.pth.tar") for d in (dump, vit_run))
    for key in ("state_dict", "optimizer"):
        flat = {k: v for k, v in _tensors(ours[key])}
        expected = {k: v for k, v in _tensors(reference[key])}
        assert flat.keys() == expected.keys() and len(flat) > 100
        assert [k for k in flat if not torch.equal(flat[k], expected[k])] == []
    assert digest(dump / "encoder.pth") == digest(vit_run / "encoder.pth")


def _tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}/{i}")


def eval_flags(folder, dump, pretrained, *extra):
    return [*VIT, "--dataset", "imagenet", "--data_path", str(folder), "--crops_size", "32",
            "--batch_size", "4", "--workers", "0", "--dump_path", str(dump), "--pretrained",
            str(pretrained), *map(str, extra)]


@pytest.mark.parametrize("name", ["checkpoint.pth.tar", "encoder.pth"])
def test_every_evaluation_reads_the_vit_run(vit_run, image_folder, tmp_path, name):
    weights = vit_run / name
    eval_knn.main(eval_flags(image_folder, tmp_path / "knn", weights, "--nb_knn", 1))
    knn = json.loads((tmp_path / "knn" / "knn_results.json").read_text())
    assert knn["1"]["top1"] == 100.0  # val/ is a copy of train/: the nearest image is itself
    how = "finetune" if name == "checkpoint.pth.tar" else "freeze"
    eval_linear.main(eval_flags(image_folder, tmp_path / how, weights, "--epochs", 1,
                                "--weights", how, "--lr_classifier", 10))
    assert json.loads((tmp_path / how / "linear_results.json").read_text())["last_acc"] >= 0
    eval_clusters.main(eval_flags(image_folder, tmp_path / "clusters", weights,
                                  "--tsne_samples", 0, "--nb_knn", 1))
    scores = json.loads((tmp_path / "clusters" / "clustering.json").read_text())
    assert scores["encoding"]["knn_top1"] == 100.0
    assert ("embedding" in scores) == (name == "checkpoint.pth.tar")
    hub = hubconf.timm_backbone("vit_tiny_patch16_224", str(weights), img_size=32,
                                patch_size=4)
    assert torch.equal(hub.pos_embed, torch.load(vit_run / "encoder.pth")["pos_embed"])


def test_the_monitor_measures_a_vit(image_folder):
    config = pretraining(get_args(["--dataset", "imagenet", "--data_path", str(image_folder),
                                   *VIT, "--crops_size", "32", "--batch_size", "4",
                                   "--workers", "0", "--num_classes", "2"]))
    encoder, _ = build_encoder(config.encoder)
    monitor = OnlineMonitor(config.data, config.monitor, 32, torch.device("cpu"),
                            classifier_epochs=3)
    scores = monitor.evaluate(encoder.eval())
    assert all(0 <= scores[k] <= 100 for k in ("knn5_euclid_top1", "wknn20_top1",
                                                "linear_top1"))
    assert -1 <= scores["sc_encoding"] <= 1


def test_vit_recipe_sits_between_the_method_and_the_dataset():
    vit = pretraining(get_args(["--dataset", "cifar10", *VIT])).optim
    assert (vit.optimizer, vit.lr, vit.wd, vit.weight_decay_end, vit.wd_norms_biases,
            vit.clip_grad, vit.epochs) == ("adamw", 5e-4, 0.04, 0.4, False, 3.0, 1000)
    given = pretraining(get_args(["--dataset", "demo", *VIT, "--optimizer", "sgd", "--lr",
                                  "0.1", "--wd", "0.05", "--clip_grad", "0"])).optim
    assert (given.optimizer, given.lr, given.wd, given.weight_decay_end, given.clip_grad) == (
        "sgd", 0.1, 0.05, 0.4, 0.0)
    resnet = pretraining(get_args(["--dataset", "cifar10"]))
    assert (resnet.optim.optimizer, resnet.optim.lr, resnet.optim.wd,
            resnet.optim.weight_decay_end, resnet.optim.wd_norms_biases,
            resnet.optim.clip_grad) == ("sgd", 0.3, 1e-4, 1e-4, True, 0.0)
    assert (resnet.encoder.img_size, resnet.encoder.patch_size) == (None, None)
    assert pretraining(get_args(["--dataset", "demo", "--method", "byol", *VIT])).heads.emb == 256


def test_norms_and_biases_get_no_weight_decay():
    config = pretraining(get_args(["--dataset", "demo", *VIT, "--mlp_dim", "64", "--emb",
                                   "32"]))
    method = build_model(config.method, config.heads, config.encoder)
    decayed, plain = build_optimizer(method, config.optim, 1e-3).param_groups
    names = {id(p): n for n, p in method.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.04, 0.0)
    assert decayed_names | plain_names == set(names.values()) and not decayed_names & plain_names
    assert {"encoder.norm.weight", "encoder.norm.bias", "encoder.blocks.0.norm1.weight",
            "encoder.blocks.0.attn.qkv.bias", "projector.1.weight", "projector.1.bias",
            "predictor.0.bias"} <= plain_names
    assert {"encoder.pos_embed", "encoder.cls_token", "encoder.patch_embed.proj.weight",
            "encoder.blocks.0.attn.qkv.weight", "projector.0.weight"} <= decayed_names
    shapes = dict(method.named_parameters())
    assert all(n.endswith(".bias") or shapes[n].ndim == 1 for n in plain_names)
    assert all(not n.endswith(".bias") and shapes[n].ndim > 1 for n in decayed_names)
    resnet = pretraining(get_args(["--dataset", "demo"]))
    model = build_model(resnet.method, resnet.heads, resnet.encoder)
    (group,) = build_optimizer(model, resnet.optim, 0.1).param_groups
    assert group["weight_decay"] == 1e-5 and len(group["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_gradient_clipping_bounds_the_total_norm(clip):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = 100 * model(torch.randn(8, 6)).square().sum()
    AmpOptimizer(optimizer, torch.device("cpu"), clip_grad=clip).step(loss)
    grads = [p.grad for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert (norm == pytest.approx(0.5, rel=1e-5)) if clip else norm > 10
    steps = [b - p.detach() for b, p in zip(before, model.parameters())]
    assert all(torch.allclose(s, g) for s, g in zip(steps, grads))  # the step took the clip


def one_line_error(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main_script.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("flags,expected", [
    (["--arch", "vit_smal_patch16_224"], "did you mean vit_small_patch16_224"),
    (["--arch", "vit_small_patch16_224.augreg_in21k"], "names pretrained weights"),
    (["--arch", "hf-hub:timm/vit_small_patch16_224.augreg_in21k"], "names pretrained weights"),
    ([*VIT, "--crops_size", "30"], "--crops_size 30 not divisible by the patch size 4"),
    (["--arch", "vit_tiny_patch16_224", "--crops_nmb", "1", "1", "--crops_size", "32", "24",
      *(f for flag in ("--crops_min_scale", "--crops_max_scale", "--solarization_prob")
        for f in (flag, "0.5", "0.5"))], "--crops_size 24 not divisible by the patch size 16"),
    (["--arch", "convnext_tiny", "--patch_size", "4"], "is not a ViT"),
])
def test_bad_backbones_are_one_line_and_write_nothing(flags, expected, tmp_path, capsys):
    dump = tmp_path / "never"
    err = one_line_error(["--dataset", "demo", "--dump_path", str(dump), *flags], capsys)
    assert expected in err and not dump.exists()


def test_resnets_need_no_timm_and_other_names_say_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    config = pretraining(get_args(["--dataset", "demo"]))
    assert build_encoder(config.encoder)[1] == 512
    err = one_line_error(["--dataset", "demo", *VIT, "--dump_path", str(tmp_path / "no")],
                         capsys)
    assert "timm is not installed" in err and not (tmp_path / "no").exists()
