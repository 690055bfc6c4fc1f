"""Your own images: --dataset folder (every image under a folder, hidden files and
non-images skipped, a fixed order) and --dataset filelist (relative and absolute paths,
optional labels, train/val lists for the evaluations), --mean/--std, pretraining on
both, eval_knn on labelled lists, and each bad input as one line and exit code 2 with
nothing written to --dump_path."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import args
import main as main_script
from helpers_eval import assert_ok, run_script
from helpers_run import one_line
from src.config import Data
from src.data.datasets import eval_dataset, pretrain_images
from src.data.demo import make_image
from src.data.own_images import image_list, image_tree
from src.errors import UsageError

TINY = ["--arch", "resnet18", "--crops_size", "32", "--mlp_dim", "64", "--emb", "32",
        "--batch_size", "8", "--size_dataset", "16", "--epochs", "1", "--warmup_epochs", "0",
        "--workers", "0", "--eval_every", "0", "--seed", "0", "--log_every", "1"]


def write_images(folder, names, seed=0):
    """JPEG/PNG files `names` (paths relative to `folder`), each a different image."""
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(i % 10, rng, size=24).save(path)
    return [str(Path(folder) / name) for name in names]


def pretrain(dump, *flags):
    """main.py in this process; the exit code (0 when it returned)."""
    try:
        main_script.main([*TINY, "--dump_path", str(dump), *map(str, flags)])
    except SystemExit as stop:
        return stop.code
    return 0


def test_folder_finds_every_image_below_in_sorted_order_and_skips_the_rest(tmp_path):
    images = write_images(tmp_path, ["a/10.png", "a/2.jpg", "a/b/c/deep.jpeg", "b.JPG",
                                     "z/last.webp"])
    write_images(tmp_path, [".hidden/x.jpg", "a/.y.jpg"])
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    dataset = image_tree(tmp_path, "pretrain", None)
    # sorted by folder (a folder's own files before its subfolders'), then by name
    assert [path for path, _ in dataset.samples] == [
        images[3], images[0], images[1], images[2], images[4]]
    assert dataset.targets == [-1] * 5 and dataset[2][0].size == (24, 24)
    assert dataset.note == (f"skipped: hidden files or folders 2, non-image files 1 (e.g. "
                            f"{tmp_path / 'a' / 'notes.txt'})")
    with pytest.raises(UsageError, match="no labels to evaluate with"):
        image_tree(tmp_path, "train", None)


def test_filelist_reads_relative_and_absolute_paths_with_or_without_labels(tmp_path):
    files = write_images(tmp_path / "imgs", ["p0.jpg", "p1.jpg", "p2.jpg", "sub/p3.jpg"])
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "plain.txt").write_text(
        f"# a comment\n../imgs/p2.jpg\n\n{files[0]}\n")
    unlabelled = image_list(tmp_path / "lists" / "plain.txt", "pretrain", None)
    assert [p for p, _ in unlabelled.samples] == [
        str(tmp_path / "lists" / "../imgs/p2.jpg"), files[0]]  # the list's order
    (tmp_path / "train.csv").write_text(
        "path,label\nimgs/p0.jpg,10\nimgs/p1.jpg,2\nimgs/sub/p3.jpg,2\n")
    (tmp_path / "val.txt").write_text(f"{files[2]} 10\nimgs/p0.jpg   2\n")
    train = image_list(tmp_path, "train", None)
    val = image_list(tmp_path, "val", None)
    assert train.classes == val.classes == ["2", "10"]  # integers sort as numbers
    assert train.targets == [1, 0, 0] and val.targets == [1, 0]
    assert [p for p, _ in val.samples] == [files[2], str(tmp_path / "imgs/p0.jpg")]
    assert [p for p, _ in image_list(tmp_path, "pretrain", None).samples] == \
        [str(tmp_path / "imgs" / name) for name in ("p0.jpg", "p1.jpg", "sub/p3.jpg")]
    (tmp_path / "val.txt").write_text("imgs/p1.jpg 7\n")
    with pytest.raises(UsageError, match="labels that the train list does not have, e.g. 7"):
        image_list(tmp_path, "val", None)
    with pytest.raises(UsageError, match="is one list"):
        image_list(tmp_path / "train.csv", "train", None)


def test_mean_and_std_replace_the_dataset_statistics(tmp_path):
    write_images(tmp_path, ["a.png"])
    parsed = args.get_args(["--dataset", "folder", "--data_path", str(tmp_path)])
    assert (parsed.mean, parsed.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    parsed = args.get_args(["--dataset", "cifar10", "--mean", ".5", ".5", ".5", "--std",
                            "1", "1", "1"])
    config = args.pretraining(parsed)
    assert config.views.mean == config.data.mean == (0.5, 0.5, 0.5)
    assert config.views.std == (1.0, 1.0, 1.0)
    (tmp_path / "train.csv").write_text("a.png,x\n")
    shutil.copy(tmp_path / "train.csv", tmp_path / "val.csv")
    data = Data("filelist", str(tmp_path), mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0))
    image, _ = eval_dataset(data, "val", "plain", 24)[0]
    own, _ = eval_dataset(Data("filelist", str(tmp_path)), "val", "plain", 24)[0]
    # x' = (x - m) / s: the two normalisations of the same pixels differ by that map
    pixels = own * torch.tensor([0.229, 0.224, 0.225])[:, None, None] + \
        torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    assert torch.allclose(image, pixels - 0.5, atol=1e-5)


@pytest.mark.parametrize("dataset", ["folder", "filelist"])
def test_main_pretrains_two_steps_on_a_folder_and_on_a_list(dataset, tmp_path, capsys):
    files = write_images(tmp_path / "photos", [f"{i % 3}/{i}.jpg" for i in range(20)])
    (tmp_path / "photos" / "list.txt").write_text("\n".join(files) + "\n")
    data = tmp_path / "photos" / ("list.txt" if dataset == "filelist" else "")
    assert pretrain(tmp_path / "run", "--dataset", dataset, "--data_path", data) == 0
    log = (tmp_path / "run" / "out.log").read_text()
    assert "16 training images" in log and "epoch 1/1 iter 2/2" in log
    assert (tmp_path / "run" / "encoder.pth").is_file()
    if dataset == "filelist":
        assert f"(listed in {data})" in log
    else:  # other statistics make another run: its checkpoint is not resumed
        capsys.readouterr()
        assert pretrain(tmp_path / "run", "--dataset", dataset, "--data_path", data,
                        "--mean", "0.5", "0.5", "0.5") == 2
        assert "--mean [0.485, 0.456, 0.406] -> [0.5, 0.5, 0.5]" in one_line(capsys)


def test_eval_knn_on_labelled_lists(tmp_path, resnet18_file):
    files = write_images(tmp_path / "imgs", [f"{i}.png" for i in range(8)])
    rows = "".join(f"{file},{'cat' if i % 2 else 'dog'}\n" for i, file in enumerate(files))
    (tmp_path / "train.csv").write_text(rows)
    (tmp_path / "val.csv").write_text(rows)
    result = run_script("eval_knn.py", "--dataset", "filelist", "--data_path", tmp_path,
                        "--arch", "resnet18", "--crops_size", "32", "--batch_size", "4",
                        "--workers", "0", "--nb_knn", "1", "--pretrained", resnet18_file,
                        "--dump_path", tmp_path / "knn", "--use_cuda", "False")
    assert_ok(result)
    assert "8 train and 8 val images of 2 classes" in result.stdout
    assert "1-NN (T=0.07): top-1 100.00" in result.stdout  # val = train: itself is nearest


def bad_inputs(root):
    """(flags, words of the error line) of each bad --data_path."""
    empty = root / "empty"
    write_images(empty, [".hidden.jpg"])
    (empty / "readme.md").write_text("no images here")
    lists = root / "lists"
    lists.mkdir()
    (lists / "missing.csv").write_text("".join(f"gone/{i}.jpg,0\n" for i in range(5)))
    return [
        (["--dataset", "folder", "--data_path", empty], ["holds no image file",
                                                         "hidden files or folders 1"]),
        (["--dataset", "folder", "--data_path", root / "nowhere"], ["does not exist"]),
        (["--dataset", "filelist", "--data_path", lists / "missing.csv"],
         ["5 of the 5 listed files do not exist", "gone/0.jpg", "gone/2.jpg"]),
        (["--dataset", "filelist", "--data_path", lists / "none.txt"], ["does not exist"]),
        (["--dataset", "folder", "--data_path", empty, "--std", "1", "0", "1"],
         ["--std values must be positive"]),
    ]


def test_bad_data_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    for number, (flags, words) in enumerate(bad_inputs(tmp_path)):
        dump = tmp_path / f"dump{number}"
        capsys.readouterr()
        assert pretrain(dump, *flags) == 2, flags
        line = one_line(capsys)
        assert all(word in line for word in words), line
        assert not dump.exists(), flags


def test_size_dataset_keeps_the_first_images_of_a_list(tmp_path):
    files = write_images(tmp_path, [f"{i}.png" for i in range(5)])
    (tmp_path / "l.txt").write_text("\n".join(reversed(files)))
    images = pretrain_images(Data("filelist", str(tmp_path / "l.txt"), size_dataset=2))
    assert [p for p, _ in images.samples] == [files[4], files[3]] and len(images) == 2
