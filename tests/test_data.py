"""Tests of src/data/ (datasets.py, readers.py, transforms.py, demo.py): views, eval
transforms, the demo dataset, the Fashion-MNIST reader, truncation and the clear-error
cases."""
import gzip
import re
import socket
import urllib.error
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from src import config
from src.data import demo as demo_data
from src.data import readers
from src.data.datasets import DATASETS, dataset_spec, eval_dataset, pretrain_dataset
from src.data.readers import read_idx
from src.data.transforms import GaussianBlur, MultiCropTransform, eval_transform
from src.errors import UsageError


def make_views(**overrides):
    """config.Views of one 32 px strong view, no blur, normalised with mean 0.5 and std
    0.25 (lists become tuples, as args.py hands them over)."""
    values = dict(crops_nmb=[1], crops_size=[32], crops_min_scale=[0.2], crops_max_scale=[1.0],
                  solarization_prob=[0.2], blur_prob=0.0, mean=(0.5,) * 3, std=(0.25,) * 3)
    values.update(overrides)
    return config.Views(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def dataset_views(name, **overrides):
    """make_views with the blur and normalisation of dataset `name`, as args.py sets them."""
    spec = dataset_spec(name)
    return make_views(blur_prob=spec.blur_prob, mean=spec.mean, std=spec.std, **overrides)


def make_data(**overrides):
    """config.Data of the demo dataset (no --data_path), all of its images."""
    return config.Data(**{'dataset': 'demo', 'data_path': '', 'size_dataset': -1, **overrides})


def unnormalize(view, views):
    """A normalised view back to [0, 1] pixel values (`views`: its config.Views)."""
    return view * torch.tensor(views.std)[:, None, None] + torch.tensor(views.mean)[:, None, None]


def random_image(width=50, height=40, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    """The demo dataset, generated once into an existing empty folder."""
    root = tmp_path_factory.mktemp('demo')
    demo_data.ensure_demo_dataset(root)
    return root


# ----------------------------------------------------------------------------- views

@pytest.mark.parametrize('nmb, sizes, expected', [
    ([1], [32], [32, 32]),
    ([2, 1], [32, 16], [32, 32, 32, 16]),
    ([1, 3], [24, 8], [24, 24, 8, 8, 8]),
])
def test_views_count_sizes_and_order(nmb, sizes, expected):
    views_config = make_views(crops_nmb=nmb, crops_size=sizes, crops_min_scale=[0.2] * len(nmb),
                              crops_max_scale=[1.0] * len(nmb),
                              solarization_prob=[0.2] * len(nmb))
    transform = MultiCropTransform(views_config)
    views = transform(random_image())
    assert len(transform) == len(views) == len(expected)
    assert [tuple(v.shape) for v in views] == [(3, s, s) for s in expected]
    assert all(v.dtype == torch.float32 for v in views)


def test_weak_view_has_no_colour_ops_but_strong_views_do():
    colour = (200, 60, 30)
    img = Image.new('RGB', (40, 40), colour)
    no_blur = make_views()
    transform = MultiCropTransform(no_blur)
    target = torch.tensor(colour, dtype=torch.float32)[:, None, None] / 255
    strong_changed = 0
    torch.manual_seed(0)
    for _ in range(30):
        weak, strong = (unnormalize(v, no_blur) for v in transform(img))
        assert torch.allclose(weak, target.expand_as(weak), atol=1e-5)
        strong_changed += (strong - target).abs().max().item() > 0.02
    assert strong_changed >= 10        # jitter p=0.8, grayscale p=0.2


@pytest.mark.parametrize('prob', [0.0, 1.0])
def test_solarization_probability(prob):
    # A white image stays >= 153/255 under colour jitter (brightness >= 0.6, no
    # contrast/saturation/hue effect on gray), so solarizing maps it to <= 102/255.
    img = Image.new('RGB', (40, 40), (255, 255, 255))
    no_blur = make_views(solarization_prob=[prob])
    transform = MultiCropTransform(no_blur)
    torch.manual_seed(0)
    for _ in range(20):
        weak, strong = (unnormalize(v, no_blur) for v in transform(img))
        assert weak.min() > 0.999
        if prob == 1.0:
            assert strong.max() < 0.41
        else:
            assert strong.min() > 0.59


def test_solarization_per_group():
    img = Image.new('RGB', (40, 40), (255, 255, 255))
    no_blur = make_views(crops_nmb=[1, 2], crops_size=[32, 16], crops_min_scale=[0.2, 0.05],
                         crops_max_scale=[1.0, 0.2], solarization_prob=[0.0, 1.0])
    views = [unnormalize(v, no_blur) for v in MultiCropTransform(no_blur)(img)]
    assert views[1].min() > 0.59
    assert views[2].max() < 0.41 and views[3].max() < 0.41


def test_grayscale_input_gives_three_channels():
    img = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))   # mode 'L'
    views = MultiCropTransform(dataset_views('fashion_mnist'))(img)
    assert all(v.shape == (3, 32, 32) for v in views)
    assert torch.equal(views[0][0], views[0][1]) and torch.equal(views[0][1], views[0][2])


def test_gaussian_blur_probability():
    checker = Image.fromarray((np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8))
    assert GaussianBlur(p=0.0)(checker) is checker
    torch.manual_seed(0)
    blurred = np.asarray(GaussianBlur(p=1.0)(checker), dtype=float)
    assert blurred.std() < 0.9 * np.asarray(checker, dtype=float).std()


def test_mismatched_crop_lists_are_a_usage_error():
    with pytest.raises(UsageError, match='crop lists must have equal lengths'):
        make_views(crops_nmb=[1, 1])


def statistics(spec):
    """(mean, std, crop size, small images, blur probability, classes) of a DatasetSpec."""
    return (spec.mean, spec.std, spec.crop_size, spec.small_images, spec.blur_prob,
            spec.num_classes)


def test_dataset_spec():
    assert set(DATASETS) == {'imagenet', 'cifar10', 'cifar100', 'stl10', 'fashion_mnist', 'demo',
                             'folder', 'filelist', 'shards'}
    for name in ('imagenet', 'folder', 'filelist', 'shards'):  # your own images: ImageNet's
        assert statistics(dataset_spec(name)) == (
            (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, False, 0.5, 1000)
    assert dataset_spec('cifar10').mean == (0.4914, 0.4822, 0.4465)
    assert dataset_spec('cifar100').std == (0.2673, 0.2564, 0.2762)
    assert dataset_spec('cifar100').num_classes == 100
    assert all(dataset_spec(n).small_images and dataset_spec(n).blur_prob == 0.0
               and dataset_spec(n).stem == 'cifar'
               for n in ('cifar10', 'cifar100', 'fashion_mnist'))
    # the demo goes through the ImageNet path (stem included) at 32 px, without blur
    demo = dataset_spec('demo')
    assert not demo.small_images and demo.stem == 'imagenet' and demo.blur_prob == 0.0
    with pytest.raises(UsageError, match='unknown dataset'):
        dataset_spec('mnist')


# ----------------------------------------------------------------------------- eval transforms

def test_plain_eval_transform_imagenet_like_is_resize_center_crop():
    transform = eval_transform(dataset_spec('imagenet'), 224, 'plain')
    img = random_image(300, 200)
    out = transform(img)
    assert out.shape == (3, 224, 224)
    assert torch.equal(out, transform(img))
    # Resize(256) makes the short side 256: 384x256, then the centre 224x224.
    resized = img.resize((384, 256), Image.BICUBIC).crop((80, 16, 304, 240))
    expected = transform.transforms[-1](transform.transforms[-2](resized))
    assert torch.allclose(out, expected)


def test_plain_eval_transform_small_images():
    info = dataset_spec('cifar10')
    img = random_image(32, 32)
    out = eval_transform(info, 32, 'plain')(img)
    assert torch.allclose(unnormalize(out, info),
                          torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255, atol=1e-6)
    gray28 = Image.fromarray(np.zeros((28, 28), np.uint8))
    assert eval_transform(dataset_spec('fashion_mnist'), 32, 'plain')(gray28).shape == (3, 32, 32)


@pytest.mark.parametrize('name, crop', [('imagenet', 64), ('cifar10', 32), ('fashion_mnist', 32)])
def test_train_aug_eval_transform_is_random_with_right_shape(name, crop):
    transform = eval_transform(dataset_spec(name), crop, 'train_aug')
    img = random_image(28 if name == 'fashion_mnist' else 80, 28 if name == 'fashion_mnist' else 80)
    torch.manual_seed(0)
    outs = [transform(img) for _ in range(5)]
    assert all(o.shape == (3, crop, crop) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


# ----------------------------------------------------------------------------- demo dataset

def test_demo_dataset_layout_and_counts(demo_root):
    assert (demo_root / demo_data.MARKER).is_file()
    train = datasets.ImageFolder(str(demo_root / 'train'))
    val = datasets.ImageFolder(str(demo_root / 'val'))
    assert train.classes == val.classes == [demo_data.class_folder(i) for i in range(10)]
    assert train.classes[0] == '00_red' and train.classes[-1] == '09_rose'
    assert len(train) == 10 * demo_data.TRAIN_PER_CLASS == 2000
    assert len(val) == 10 * demo_data.VAL_PER_CLASS == 500
    assert np.bincount(train.targets).tolist() == [200] * 10
    img, label = train[0]
    assert img.size == (32, 32) and img.mode == 'RGB' and label == 0
    assert all(Path(p).suffix == '.jpg' for p, _ in train.samples)


def test_demo_dataset_is_deterministic(demo_root, tmp_path):
    other = tmp_path / 'not' / 'yet' / 'there'
    demo_data.ensure_demo_dataset(other)
    files = sorted(p.relative_to(demo_root) for p in demo_root.rglob('*') if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob('*') if p.is_file())
    assert all((demo_root / f).read_bytes() == (other / f).read_bytes() for f in files)
    assert [p.name for p in other.parent.iterdir()] == ['there']       # no temp folder left


def test_demo_dataset_is_reused_when_marker_exists(demo_root, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError('regenerated a complete dataset')
    monkeypatch.setattr(demo_data, 'generate_demo_dataset', fail)
    before = sorted((p, p.stat().st_mtime_ns) for p in Path(demo_root).rglob('*'))
    demo_data.ensure_demo_dataset(demo_root)
    assert sorted((p, p.stat().st_mtime_ns) for p in Path(demo_root).rglob('*')) == before


def test_interrupted_demo_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def make_image(label, rng):
        calls.append(label)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return Image.new('RGB', (32, 32))
    monkeypatch.setattr(demo_data, 'make_image', make_image)
    with pytest.raises(KeyboardInterrupt):
        demo_data.ensure_demo_dataset(tmp_path / 'demo')
    assert list(tmp_path.iterdir()) == []


def test_demo_replaces_an_earlier_version_of_itself(tmp_path):
    """A folder marked as an older demo dataset (shape classes) is regenerated, not
    trained on: the marker proves this project made it."""
    old = tmp_path / 'demo'
    (old / 'train' / '00_circle').mkdir(parents=True)
    (old / demo_data.OLD_MARKERS[0]).write_text('10 classes\n')
    demo_data.ensure_demo_dataset(old)
    assert (old / demo_data.MARKER).is_file() and not (old / demo_data.OLD_MARKERS[0]).exists()
    assert sorted(p.name for p in (old / 'train').iterdir()) == [
        demo_data.class_folder(i) for i in range(10)]


def test_demo_classes_differ_in_hue_and_not_in_shape(demo_root):
    """Mean foreground hue of each class sits near label / 10; every class holds
    many shapes (the nuisance), so shape does not tell the class."""
    import colorsys
    for label in (0, 3, 7):
        hues = []
        for path in sorted((demo_root / 'train' / demo_data.class_folder(label)).iterdir())[:20]:
            rgb = np.asarray(Image.open(path), dtype=np.float64) / 255
            bright = rgb[rgb.max(axis=2) >= 0.8 * rgb.max()]   # foreground pixels
            hues.append(colorsys.rgb_to_hsv(*np.median(bright, axis=0))[0])
        circular = np.angle(np.mean(np.exp(2j * np.pi * np.array(hues)))) / (2 * np.pi) % 1
        assert min(abs(circular - label / 10), 1 - abs(circular - label / 10)) < 0.03
    drawn = []  # the shape index each image draws

    class Recorder:
        def __init__(self, rng):
            self.rng = rng

        def __getattr__(self, name):
            return getattr(self.rng, name)

        def integers(self, *a, **k):
            drawn.append(int(self.rng.integers(*a, **k)))
            return drawn[-1]
    rng = Recorder(np.random.default_rng(1))
    for _ in range(50):
        demo_data.make_image(4, rng)
    assert len(set(drawn)) == len(demo_data.SHAPES)


def test_demo_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / 'mine.txt').write_text('keep me')
    with pytest.raises(UsageError, match='no complete demo dataset'):
        demo_data.ensure_demo_dataset(tmp_path)
    assert (tmp_path / 'mine.txt').read_text() == 'keep me'


def test_demo_pretrain_dataset_and_size_dataset(demo_root):
    data = make_data(data_path=str(demo_root))
    views_config = make_views(crops_nmb=[2], crops_size=[32], crops_min_scale=[0.2],
                              crops_max_scale=[1.0], solarization_prob=[0.2])
    full = pretrain_dataset(data, views_config)
    assert len(full) == 2000
    views = full[0]
    assert isinstance(views, list) and [v.shape for v in views] == [(3, 32, 32)] * 3
    small = pretrain_dataset(replace(data, size_dataset=7), views_config)
    assert len(small) == 7
    folder = small.dataset
    assert len(folder.samples) == len(folder.imgs) == len(folder.targets) == 7
    assert folder.samples == full.dataset.samples[:7]


def test_demo_eval_dataset(demo_root):
    data = make_data(data_path=str(demo_root), size_dataset=7)     # not applied to eval
    train = eval_dataset(data, 'train', 'plain', 32)
    val = eval_dataset(data, 'val', 'plain', 32)
    assert (len(train), len(val)) == (2000, 500)
    assert train.classes == val.classes and len(val.samples) == len(val.targets) == 500
    x, y = val[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    assert torch.equal(x, val[0][0])
    assert eval_dataset(data, 'train', 'train_aug', 32)[0][0].shape == (3, 32, 32)


# ----------------------------------------------------------------------------- fashion-mnist

def write_idx(path, array):
    """A gzipped IDX file of uint8 values."""
    header = bytes([0, 0, 8, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.skipif(not Path(readers.FASHION_MNIST_DIR).is_dir(),
                    reason='Debian package dataset-fashion-mnist is not installed')
def test_fashion_mnist_reader_on_real_files():
    for split, count in (('train', 60000), ('val', 10000)):
        ds = eval_dataset(make_data(dataset='fashion_mnist', data_path='/nonexistent'),
                          split, 'plain', 32)
        assert len(ds) == len(ds.targets) == count
        assert ds.data.shape == (count, 28, 28)
        assert sorted(set(ds.targets)) == list(range(10)) and len(ds.classes) == 10
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and 0 <= y < 10
    pre = pretrain_dataset(make_data(dataset='fashion_mnist', data_path='/nonexistent',
                                     size_dataset=100), dataset_views('fashion_mnist'))
    assert len(pre) == 100 and [v.shape for v in pre[99]] == [(3, 32, 32)] * 2


def test_fashion_mnist_from_data_path(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, 'FASHION_MNIST_DIR', str(tmp_path / 'absent'))
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', images)
    write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', np.array([4, 0, 9]))
    ds = eval_dataset(make_data(dataset='fashion_mnist', data_path=str(tmp_path)),
                      'val', 'plain', 32)
    assert ds.targets == [4, 0, 9]
    assert np.array_equal(ds.data, images)
    raw = readers.FashionMNIST(tmp_path, train=False)
    assert raw[1][0].mode == 'L' and raw[1][0].size == (28, 28)
    with pytest.raises(UsageError, match='dataset-fashion-mnist.*--data_path'):   # no train files
        pretrain_dataset(make_data(dataset='fashion_mnist', data_path=str(tmp_path)), make_views())


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / 'plain.gz').write_bytes(b'not gzip at all')
    with pytest.raises(UsageError, match='gzipped IDX'):
        read_idx(tmp_path / 'plain.gz')
    with gzip.open(tmp_path / 'short.gz', 'wb') as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, 'big') + b'abc')
    with pytest.raises(UsageError, match='truncated'):
        read_idx(tmp_path / 'short.gz')


# ----------------------------------------------------------------------------- usage errors

def make_image_folder(root, split, classes=('a', 'b'), per_class=2):
    for name in classes:
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            random_image(20, 20, seed=i).save(root / split / name / f'{i}.png')


def test_missing_data_path(tmp_path):
    with pytest.raises(UsageError, match='does not exist'):
        pretrain_dataset(make_data(dataset='imagenet', data_path=str(tmp_path / 'nope')),
                         make_views())
    with pytest.raises(UsageError, match='required'):
        pretrain_dataset(make_data(dataset='imagenet', data_path=''), make_views())
    (tmp_path / 'file').write_text('x')
    with pytest.raises(UsageError, match='not a folder'):
        pretrain_dataset(make_data(dataset='imagenet', data_path=str(tmp_path / 'file')),
                         make_views())


def test_missing_train_and_val_folders(tmp_path):
    data = make_data(dataset='imagenet', data_path=str(tmp_path))
    with pytest.raises(UsageError, match='no train/ folder'):
        pretrain_dataset(data, make_views())
    make_image_folder(tmp_path, 'train')
    assert len(pretrain_dataset(data, make_views())) == 4
    assert eval_dataset(data, 'train', 'plain', 32).classes == ['a', 'b']
    with pytest.raises(UsageError, match='no val/ folder'):
        eval_dataset(data, 'val', 'plain', 32)


def test_train_folder_without_classes_or_images(tmp_path):
    data = make_data(dataset='imagenet', data_path=str(tmp_path))
    (tmp_path / 'train').mkdir()
    (tmp_path / 'train' / 'loose.png').write_bytes(b'')
    with pytest.raises(UsageError, match='no class folders'):
        pretrain_dataset(data, make_views())
    (tmp_path / 'train' / 'cls').mkdir()
    (tmp_path / 'train' / 'cls' / 'notes.txt').write_text('no images here')
    with pytest.raises(UsageError, match='without image files'):
        pretrain_dataset(data, make_views())


@pytest.mark.parametrize('name, module', [('cifar10', 'cifar'), ('cifar100', 'cifar'),
                                          ('stl10', 'stl10')])
def test_torchvision_dataset_offline_is_a_usage_error(name, module, tmp_path, monkeypatch):
    timeouts = []

    def offline(*args, **kwargs):
        timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(f'torchvision.datasets.{module}.download_and_extract_archive', offline)
    before = socket.getdefaulttimeout()
    archive = re.escape(readers.ARCHIVES[name])
    with pytest.raises(UsageError, match=f'{name}: not found in --data_path .*put {archive}'):
        pretrain_dataset(make_data(dataset=name, data_path=str(tmp_path)), make_views())
    assert timeouts == [readers.DOWNLOAD_TIMEOUT_S]       # the download ran with a timeout
    assert socket.getdefaulttimeout() == before        # ... which was restored


def test_stl10_is_resa_cifars_recipe(tmp_path, monkeypatch):
    """resa_cifar's STL-10 run: train+unlabeled, 32 px crops, resnet18 with the ImageNet
    stem and plain initialisation, no predictor, fp32, no blur, its mean and std."""
    from torchvision.datasets import stl10
    from args import get_args, pretraining
    from helpers_eval import make_fake_stl10
    from method import build_model
    monkeypatch.setattr(stl10, 'check_integrity', lambda *args, **kwargs: True)
    make_fake_stl10(tmp_path, train=20, unlabeled=30, test=10)
    assert statistics(dataset_spec('stl10')) == ((0.43, 0.42, 0.39), (0.27, 0.26, 0.27), 32,
                                                 False, 0.0, 10)
    args = get_args(['--dataset', 'stl10', '--data_path', str(tmp_path), '--mlp_dim', '16',
                     '--emb', '8'])
    assert (args.arch, args.epochs, args.lr, args.wd, args.warmup_epochs, args.crops_size,
            args.pred, args.stem, args.precision) == (
        'resnet18', 1000, 0.3, 1e-4, 2, [32], False, 'imagenet', 'fp32')
    configs = pretraining(args)
    assert (configs.views.blur_prob, configs.views.mean, configs.views.std) == (
        0.0, (0.43, 0.42, 0.39), (0.27, 0.26, 0.27))
    pretrain = pretrain_dataset(configs.data, configs.views)
    assert len(pretrain) == 50  # train + unlabeled
    assert [tuple(v.shape) for v in pretrain[0]] == [(3, 32, 32)] * 2
    assert len(eval_dataset(configs.data, 'train', 'monitor', 32)) == 20
    assert len(eval_dataset(configs.data, 'val', 'monitor', 32)) == 10
    model = build_model(configs.method, configs.heads, configs.encoder)
    assert model.predictor is None and model.encoder.conv1.kernel_size == (7, 7)
    assert all(block.bn2.weight.eq(1).all() for block in model.encoder.layer1)  # no zero-init
