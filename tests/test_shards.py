"""WebDataset tar shards: tools/make_shards.py writes the images of a folder or a list
unchanged and in order, --dataset shards reads them back by random access (both data
backends), a corrupt or truncated member is an unreadable image that training
replaces and counts, and a bad pattern or shard is one line and exit code 2 with
nothing written to --dump_path. (The kill-and-restart run on shards is in
test_fault_tolerance.py.)"""
import gzip
import re
import tarfile

import pytest

from helpers_eval import assert_ok, assert_usage_error, run_script
from helpers_run import one_line
from src.config import Data
from src.data.datasets import eval_dataset
from src.data.loader import SeededSamples
from src.data.own_images import image_tree
from src.data.shards import shard_paths, tar_shards
from src.errors import UnreadableImage, UsageError
from test_own_data import pretrain, write_images


def make_shards(src, out, size):
    """tools/make_shards.py SRC OUT --shard_size size; the --data_path it prints."""
    result = run_script("tools/make_shards.py", src, out, "--shard_size", size)
    assert_ok(result)
    return re.search(r"--data_path '([^']+)'", result.stdout).group(1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of 20 images (x.png and y.png first, then two subfolders of JPEGs), and
    its shards of 6 (4 shards)."""
    root = tmp_path_factory.mktemp("shards")
    write_images(root / "photos", [f"{i % 2}/{i:02d}.jpg" for i in range(18)] + ["x.png",
                                                                                 "y.png"])
    return root, make_shards(root / "photos", root / "out", 6)


def test_make_shards_then_read_gives_the_same_images_in_the_same_order(photos, tmp_path):
    root, pattern = photos
    assert pattern == f"{root}/out/train-{{000000..000003}}.tar"
    shards = tar_shards(pattern, "pretrain", None)
    folder = image_tree(root / "photos", "pretrain", None)
    assert len(shards) == len(folder) == 20 and shards.note == "in 4 shards"
    for i, (path, _) in enumerate(folder.samples):
        with open(path, "rb") as f:
            assert shards.read_bytes(i) == f.read(), i
    assert shards[19][0].tobytes() == folder[19][0].tobytes()
    with tarfile.open(f"{root}/out/train-000003.tar") as tar:
        assert tar.getnames() == ["000000018.jpg", "000000019.jpg"]
    # a list with labels: its labels go in as .cls members, beside the image
    (tmp_path / "l.csv").write_text(f"{folder.samples[4][0]},cat\n{folder.samples[5][0]},dog\n")
    listed = make_shards(tmp_path / "l.csv", tmp_path / "out", 10)
    assert listed == f"{tmp_path}/out/train-000000.tar"
    with tarfile.open(listed) as tar:
        assert tar.getnames() == ["000000000.cls", "000000000.jpg", "000000001.cls",
                                  "000000001.jpg"]
        assert tar.extractfile("000000001.cls").read() == b"dog"
    assert tar_shards(listed, "pretrain", None).read_bytes(0) == shards.read_bytes(4)
    assert shard_paths(root / "out") == shard_paths(pattern)  # a folder of shards


@pytest.mark.parametrize("backend", ["pil", "gpu"])
def test_main_pretrains_two_steps_on_shards(photos, backend, tmp_path):
    _, pattern = photos
    assert pretrain(tmp_path, "--dataset", "shards", "--data_path", pattern,
                    "--data_backend", backend) == 0
    log = (tmp_path / "out.log").read_text()
    assert "16 training images (in 4 shards)" in log and "epoch 1/1 iter 2/2" in log


def test_a_corrupt_or_cut_member_is_replaced_and_counted_like_a_bad_image(photos, tmp_path):
    root, _ = photos
    out = tmp_path / "shards"
    pattern = make_shards(root / "photos", out, 10)
    first, second = sorted(out.glob("*.tar"))
    with tarfile.open(first) as tar:
        member = tar.getmember("000000003.jpg")
    data = bytearray(first.read_bytes())
    data[member.offset_data:member.offset_data + member.size] = b"\x00" * member.size
    first.write_bytes(bytes(data))
    with tarfile.open(second) as tar:
        last = tar.getmember("000000019.jpg")
    second.write_bytes(second.read_bytes()[:last.offset_data + last.size // 2])
    shards = tar_shards(pattern, "pretrain", None)
    assert len(shards) == 20
    for index, words in ((3, r"000000003.jpg \(UnidentifiedImageError"),
                         (19, r"000000019.jpg \(its shard ends [0-9]+ bytes early")):
        with pytest.raises(UnreadableImage, match=words):
            shards[index]
    samples = SeededSamples(shards, seed=0)
    item, bad = samples[(0, 3)]
    assert bad == [f"{first}/000000003.jpg"] and item[0].size == (24, 24)
    assert samples[(0, 19)][1] == [f"{second}/000000019.jpg"]
    assert samples[(0, 4)][1] == []


def test_bad_shards_are_one_line_exit_2_and_nothing_written(photos, tmp_path, capsys):
    root, pattern = photos
    (tmp_path / "packed.tar").write_bytes(gzip.compress((root / "out" /
                                                          "train-000000.tar").read_bytes()))
    cases = [
        (str(tmp_path / "none-{000000..000009}.tar"), ["matches no shard file"]),
        (pattern.replace("000003", "000005"), ["2 of its 6 shards do not exist",
                                                "train-000004.tar"]),
        (str(tmp_path / "packed.tar"), ["cannot index the shard", "uncompressed"]),
    ]
    for number, (data_path, words) in enumerate(cases):
        dump = tmp_path / f"dump{number}"
        capsys.readouterr()
        assert pretrain(dump, "--dataset", "shards", "--data_path", data_path) == 2
        line = one_line(capsys)
        assert all(word in line for word in words), line
        assert not dump.exists()


def test_shards_are_for_pretraining_and_make_shards_checks_its_input(photos, tmp_path):
    _, pattern = photos
    with pytest.raises(UsageError, match="--dataset shards has no labels to evaluate with"):
        eval_dataset(Data("shards", pattern), "train", "plain", 32)
    result = run_script("tools/make_shards.py", tmp_path / "nothing", tmp_path / "o")
    assert_usage_error(result, "neither a folder of images nor a list file")
