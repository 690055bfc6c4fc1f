"""Training batches depend only on (seed, epoch, iteration): the global-batch sampler,
per-sample seeded views, and deterministic substitutes for unreadable images."""
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

import src.data.loader as loader_module
from src.data.datasets import pretrain_dataset
from src.data.loader import GlobalBatchSampler, SeededSamples, collate_samples, train_loader
from src.errors import UnreadableImage
from test_data import dataset_views, make_data


def sampler(size, batch, world_size=1, rank=0, drop_last=True, seed=3, monkeypatch=None):
    monkeypatch.setattr(loader_module, "get_world_size", lambda: world_size)
    monkeypatch.setattr(loader_module, "get_rank", lambda: rank)
    return GlobalBatchSampler(size, batch, seed, drop_last)


def indices(batches):
    return [[i for _, i in batch] for batch in batches]


def test_one_process_takes_distributed_samplers_order(monkeypatch):
    s = sampler(10, 3, monkeypatch=monkeypatch)
    s.set_epoch(2)
    reference = DistributedSampler(range(10), num_replicas=1, rank=0, seed=3, drop_last=True)
    reference.set_epoch(2)
    order = list(reference)
    assert len(s) == 3 and indices(s) == [order[0:3], order[3:6], order[6:9]]
    assert all(epoch == 2 for batch in s for epoch, _ in batch)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_split_each_global_batch(monkeypatch, drop_last):
    """Two processes of batch 2 see exactly the global batches of one process of batch 4:
    the same samples at the same iteration, whatever the world size."""
    whole = indices(sampler(11, 4, drop_last=drop_last, monkeypatch=monkeypatch))
    halves = [indices(sampler(11, 2, 2, r, drop_last, monkeypatch=monkeypatch)) for r in (0, 1)]
    together = [a + b for a, b in zip(*halves)]
    if drop_last:
        assert len(whole) == 2 and all(len(b) == 4 for b in whole)  # 11 // 4
        assert together == whole
    else:  # every sample is used: 4 + 4 + 3; two processes pad to 12 with the first index
        assert [len(b) for b in whole] == [4, 4, 3] and [len(b) for b in together] == [4, 4, 4]
        assert together[:2] == whole[:2] and together[2] == whole[2] + [whole[0][0]]
        assert sorted(i for batch in whole for i in batch) == list(range(11))


def test_start_at_skips_batches_once(monkeypatch):
    s = sampler(20, 4, monkeypatch=monkeypatch)
    full = indices(s)
    s.start_at(3)
    assert indices(s) == full[3:]
    assert indices(s) == full  # the next epoch starts at its beginning again


class Pictures(torch.utils.data.Dataset):
    """Random 'augmentations' of fixed images; index 2 and 5 are unreadable files."""

    bad = {2: "img2.JPEG", 5: "img5.JPEG"}

    def __len__(self):
        return 8

    def __getitem__(self, index):
        if index in self.bad:
            raise UnreadableImage(f"cannot read image {self.bad[index]}", self.bad[index])
        return torch.full((2,), float(index)) + torch.rand(2)


def test_views_depend_only_on_seed_epoch_and_index():
    samples = SeededSamples(Pictures(), seed=7)
    first, bad = samples[(1, 3)]
    assert bad == [] and torch.equal(first, samples[(1, 3)][0])
    torch.manual_seed(123)  # the global random state does not matter ...
    state = torch.get_rng_state()
    assert torch.equal(first, samples[(1, 3)][0])
    assert torch.equal(torch.get_rng_state(), state)  # ... and is left untouched
    assert not torch.equal(first, samples[(2, 3)][0])  # another epoch, other views
    assert not torch.equal(first, SeededSamples(Pictures(), seed=8)[(1, 3)][0])


def test_unreadable_images_get_a_deterministic_substitute():
    samples = SeededSamples(Pictures(), seed=7)
    item, bad = samples[(0, 2)]
    assert bad[0] == "img2.JPEG" and item is not None
    assert int(item[0]) not in Pictures.bad  # a readable sample took its place
    again, bad_again = samples[(0, 2)]
    assert torch.equal(item, again) and bad == bad_again


def test_a_batch_without_any_readable_image(monkeypatch):
    class AllBad(Pictures):
        bad = {i: f"img{i}.JPEG" for i in range(8)}

    monkeypatch.setattr(loader_module, "MAX_SUBSTITUTES", 3)
    samples = SeededSamples(AllBad(), seed=0)
    item, bad = samples[(0, 1)]
    assert item is None and len(bad) == 3
    batch = collate_samples([samples[(0, 1)], samples[(0, 4)]])
    assert batch.data is None and batch.reads == 2 + 6 and len(batch.bad_files) == 6
    good = SeededSamples(Pictures(), seed=0)
    mixed = collate_samples([samples[(0, 1)], good[(0, 0)]])
    assert torch.equal(mixed.data[0], mixed.data[1])  # the unreadable one took a copy


def test_views_identical_with_0_and_2_workers(tmp_path):
    """The demo images through the real PIL pipeline: batches do not depend on the
    number of loader workers (nor on which worker made a sample)."""
    from src.data.demo import make_image
    import numpy as np
    rng = np.random.default_rng(0)
    for label in range(2):
        folder = tmp_path / "train" / f"c{label}"
        folder.mkdir(parents=True)
        for i in range(12):
            make_image(label, rng).save(folder / f"{i}.jpg")
    (tmp_path / "train" / "c0" / "broken.jpg").write_bytes(b"not a jpeg")
    dataset = pretrain_dataset(make_data(dataset="imagenet", data_path=str(tmp_path)),
                               dataset_views("imagenet"))
    batches = {}
    for workers in (0, 2):
        loader = train_loader(dataset, 5, workers, seed=1)
        loader.batch_sampler.set_epoch(4)
        batches[workers] = list(loader)
    assert len(batches[0]) == 5 and len(batches[0][0].data) == 2  # 25 // 5 batches, 2 views
    for a, b in zip(batches[0], batches[2]):
        assert all(torch.equal(x, y) for x, y in zip(a.data, b.data))
        assert a.bad_files == b.bad_files and a.reads == b.reads
    assert sum(len(b.bad_files) for b in batches[0]) == 1
    assert any("broken.jpg" in path for b in batches[0] for path in b.bad_files)


def test_an_image_is_read_as_rgb_and_bad_files_name_their_path(tmp_path):
    from src.data.images import read_rgb
    Image.new("L", (4, 4)).save(tmp_path / "gray.png")
    assert read_rgb(tmp_path / "gray.png").mode == "RGB"
    good = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good)
    good.write_bytes(good.read_bytes()[:200])  # truncated
    for path in (good, tmp_path / "absent.jpg"):
        with pytest.raises(UnreadableImage, match="cannot read image") as err:
            read_rgb(path)
        assert err.value.path == str(path)
