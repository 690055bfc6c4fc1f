"""Datasets and image transforms: the multi-crop views of pretraining (SPEC §1) and
the plain / augmented transforms of evaluation (SPEC §5-§7).

Every user-facing problem with the data (missing folders, missing files, no network
for a download) is raised as a `UsageError` with one line that says what to do.
"""
import gzip
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from src.demo_data import NUM_CLASSES as DEMO_NUM_CLASSES
from src.demo_data import ensure_demo_dataset
from src.errors import UsageError
from src.logger import get_logger

DATASETS = ('imagenet', 'cifar10', 'cifar100', 'stl10', 'fashion_mnist', 'demo')
RESA_CIFAR_DATASETS = ('cifar10', 'cifar100', 'stl10')   # SPEC §7: the authors' resa_cifar

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# resa_cifar's monitor (eval/dataloader.py) normalises CIFAR-10 *and* CIFAR-100 with
# CIFAR-10's statistics, its std written with three decimals
RESA_CIFAR_MONITOR_NORM = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'   # Debian dataset-fashion-mnist
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
ARCHIVES = {'cifar10': 'cifar-10-python.tar.gz', 'cifar100': 'cifar-100-python.tar.gz',
            'stl10': 'stl10_binary.tar.gz'}   # what torchvision looks for in --data_path
DOWNLOAD_TIMEOUT_S = 20      # per socket operation, so an offline machine fails fast


@dataclass(frozen=True)
class DatasetInfo:
    """What the code needs to know about a dataset besides its files."""
    mean: tuple
    std: tuple
    crop_size: int          # default pretraining crop
    small_images: bool      # True: encoder uses the CIFAR stem (3x3 conv, no max-pool)
    blur_prob: float        # Gaussian blur probability of the strong views
    num_classes: int
    monitor_norm: tuple = None   # (mean, std) of the online monitor's images, if not those


_INFO = {
    'imagenet': DatasetInfo(IMAGENET_MEAN, IMAGENET_STD, 224, False, 0.5, 1000),
    'cifar10': DatasetInfo((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, True, 0.0, 10,
                           RESA_CIFAR_MONITOR_NORM),
    'cifar100': DatasetInfo((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, True, 0.0, 100,
                            RESA_CIFAR_MONITOR_NORM),
    # resa_cifar's STL-10: 32 px crops of the 96 px images with the ImageNet stem, no blur
    'stl10': DatasetInfo((0.43, 0.42, 0.39), (0.27, 0.26, 0.27), 32, False, 0.0, 10),
    'fashion_mnist': DatasetInfo((0.2860,) * 3, (0.3530,) * 3, 32, True, 0.0, 10),
    'demo': DatasetInfo(IMAGENET_MEAN, IMAGENET_STD, 32, False, 0.0, DEMO_NUM_CLASSES),
}


def dataset_info(name):
    """The `DatasetInfo` of a dataset name from `DATASETS`."""
    if name not in _INFO:
        raise UsageError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')
    return _INFO[name]


class UnreadableImage(UsageError):
    """An image file that does not decode (truncated, not an image, gone). Training
    substitutes another sample (src.loader.SeededSamples); evaluation stops."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


def as_rgb(img):
    """A PIL image in RGB mode. 16-bit grayscale (modes I;16* and I, e.g. PNG, TIFF) is
    first scaled to 8 bits: PIL's own conversion clips it, so mid-grey turned white."""
    if img.mode == 'I' or img.mode.startswith('I;16'):
        img = Image.fromarray((np.asarray(img).astype(np.int64).clip(0, 65535) >> 8)
                              .astype(np.uint8))
    return img.convert('RGB')  # a loaded copy, even of an RGB image


def read_rgb(path):
    """The RGB image at `path` (torchvision's ImageFolder loader, with a clear error)."""
    try:
        with open(path, 'rb') as f:
            return as_rgb(Image.open(f))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f'cannot read image {path} ({type(err).__name__}: {err})',
                              str(path)) from None


# ----------------------------------------------------------------------------- transforms

class ToRGB:
    """Converts grayscale (fashion_mnist) or palette images to 3-channel RGB."""

    def __call__(self, img):
        return img if img.mode == 'RGB' else as_rgb(img)


class GaussianBlur:
    """PIL Gaussian blur with sigma ~ U[0.1, 2.0], applied with probability p.

    Written out because torchvision's version takes a kernel size, while the
    reference blurs with PIL's radius = sigma.
    """

    def __init__(self, p, sigma=(0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        if torch.rand(()).item() >= self.p:
            return img
        sigma = torch.empty(()).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self):
        return f'{type(self).__name__}(p={self.p}, sigma={self.sigma})'


class MultiCropTransform:
    """PIL image -> list of V view tensors: the weak view, then the strong views of
    every crop group in order (SPEC §1)."""

    def __init__(self, args, info):
        lists = (args.crops_nmb, args.crops_size, args.crops_min_scale,
                 args.crops_max_scale, args.solarization_prob)
        if len({len(x) for x in lists}) != 1 or not args.crops_nmb:
            raise UsageError('--crops_nmb, --crops_size, --crops_min_scale, --crops_max_scale '
                             'and --solarization_prob need the same number of values')
        finish = [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(info.mean, info.std)]
        weak = T.Compose([
            T.RandomResizedCrop(args.crops_size[0],
                                scale=(args.crops_min_scale[0], args.crops_max_scale[0]),
                                interpolation=InterpolationMode.BILINEAR),
            *finish])
        self.views = [weak]
        for i, count in enumerate(args.crops_nmb):
            strong = T.Compose([
                T.RandomResizedCrop(args.crops_size[i],
                                    scale=(args.crops_min_scale[i], args.crops_max_scale[i]),
                                    interpolation=InterpolationMode.BICUBIC),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                GaussianBlur(p=info.blur_prob),
                T.RandomSolarize(threshold=128, p=args.solarization_prob[i]),
                *finish])
            self.views += [strong] * count

    def __call__(self, img):
        img = ToRGB()(img)
        return [view(img) for view in self.views]

    def __len__(self):
        return len(self.views)


def build_eval_transform(info, crop, kind):
    """Image -> normalised tensor for evaluation: 'plain' (no randomness, bicubic
    resize: k-NN and feature extraction, SPEC §6), 'val' (plain with the bilinear
    resize of the linear probe's validation, SPEC §5), 'train_aug' (linear probe
    training) or 'monitor' (plain, normalised as resa_cifar's monitor does, SPEC §7)."""
    if kind not in ('plain', 'val', 'train_aug', 'monitor'):
        raise ValueError(f'kind must be "plain", "val", "train_aug" or "monitor", not {kind!r}')
    mean, std = info.mean, info.std
    if kind == 'monitor':
        kind, (mean, std) = 'plain', info.monitor_norm or (mean, std)
    if info.small_images:
        # Resize/CenterCrop leave an image that already has the crop size unchanged
        # (CIFAR 32 -> 32); they only act on other sizes (fashion_mnist 28 -> 32).
        ops = [T.Resize(crop, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(crop)]
        if kind == 'train_aug':
            ops += [T.RandomCrop(crop, padding=4), T.RandomHorizontalFlip()]
    elif kind in ('plain', 'val'):
        resample = InterpolationMode.BICUBIC if kind == 'plain' else InterpolationMode.BILINEAR
        ops = [T.Resize(round(crop * 256 / 224), interpolation=resample), T.CenterCrop(crop)]
    else:
        ops = [T.RandomResizedCrop(crop), T.RandomHorizontalFlip()]
    return T.Compose([ToRGB(), *ops, T.ToTensor(), T.Normalize(mean, std)])


# ----------------------------------------------------------------------------- datasets

class ViewsOnly(Dataset):
    """Drops the labels: a pretraining item is only its list of views."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index][0]


def read_idx(path):
    """The uint8 array in a gzipped IDX file (the MNIST file format)."""
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise UsageError(f'{path}: cannot read it as a gzipped IDX file ({err})') from err
    if len(data) < 4 or data[:3] != b'\x00\x00\x08':
        raise UsageError(f'{path}: not an IDX file of unsigned bytes')
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], 'big') for k in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise UsageError(f'{path}: truncated or corrupt (header says shape {shape})')
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST from its four .gz files; items are (PIL 'L' image or transformed
    image, label). Read directly so that nothing is ever downloaded."""

    classes = list(FASHION_MNIST_CLASSES)

    def __init__(self, folder, train, transform=None):
        prefix = 'train' if train else 't10k'
        self.data = read_idx(Path(folder) / f'{prefix}-images-idx3-ubyte.gz')
        labels = read_idx(Path(folder) / f'{prefix}-labels-idx1-ubyte.gz')
        if self.data.ndim != 3 or labels.shape != self.data.shape[:1]:
            raise UsageError(f'{folder}: {prefix} images {self.data.shape} and labels '
                             f'{labels.shape} do not match')
        self.targets = labels.astype(int).tolist()
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.data[index])
        return (self.transform(img) if self.transform else img), self.targets[index]


def _fashion_mnist_folder(data_path, train):
    """The Debian package folder if it has the split's files, else --data_path."""
    prefix = 'train' if train else 't10k'
    names = (f'{prefix}-images-idx3-ubyte.gz', f'{prefix}-labels-idx1-ubyte.gz')
    for folder in (Path(FASHION_MNIST_DIR), data_path):
        if all((folder / name).is_file() for name in names):
            return folder
    raise UsageError(f'fashion_mnist: {names[0]} and {names[1]} are neither in '
                     f'{FASHION_MNIST_DIR} nor in --data_path {data_path}; install the Debian '
                     f'package dataset-fashion-mnist or put the files in --data_path')


def _torchvision_dataset(name, root, split, transform):
    """CIFAR-10/100 or STL-10, downloaded into `root` when absent."""
    if name == 'stl10':
        cls = datasets.STL10
        kwargs = {'split': {'pretrain': 'train+unlabeled', 'train': 'train', 'val': 'test'}[split]}
    else:
        cls = datasets.CIFAR10 if name == 'cifar10' else datasets.CIFAR100
        kwargs = {'train': split != 'val'}
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)    # torchvision's urlopen has no timeout
    try:
        dataset = cls(str(root), transform=transform, download=True, **kwargs)
    except Exception as err:   # no network, HTTP error, bad archive: all mean the same here
        raise UsageError(f'{name}: not found in --data_path {root.resolve()} and could not be '
                         f'downloaded ({type(err).__name__}: {err}); put {ARCHIVES[name]} '
                         f'(or its extracted folder) there') from err
    finally:
        socket.setdefaulttimeout(previous)
    if name == 'stl10':        # STL10 keeps its labels in a numpy array called `labels`
        dataset.targets = [int(t) for t in dataset.labels]
    return dataset


def walk_once(top):
    """(folder, file names) of `top` and of every folder below it, symbolic links
    followed, in torchvision's order; a folder reached a second time (a link that loops
    back, two links to one folder) is listed once, with a warning."""
    def identity(path):
        info = os.stat(path)
        return info.st_dev, info.st_ino

    seen, found = {identity(top)}, []
    for root, dirs, files in os.walk(top, followlinks=True):
        dirs.sort()  # the first path to a folder, in sorted order, is the one kept
        for name in list(dirs):
            path = os.path.join(root, name)
            try:
                key = identity(path)
            except OSError:  # os.walk skips what it cannot read
                continue
            if key in seen:
                get_logger().warning(f'{path} leads to a folder listed already (a symbolic '
                                     f'link loop?): its images are counted once')
                dirs.remove(name)
            seen.add(key)
        found.append((root, files))
    return sorted(found)


class ImageFiles(datasets.ImageFolder):
    """torchvision's ImageFolder with its file list (same order, same extensions) made
    by `walk_once`: a symbolic-link loop in a class folder no longer lists its images
    again and again."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        valid = is_valid_file or (
            lambda path: datasets.folder.has_file_allowed_extension(path, extensions))
        samples, empty = [], set(class_to_idx)
        for name in sorted(class_to_idx):
            folder = os.path.join(directory, name)
            if not os.path.isdir(folder):
                continue
            for root, files in walk_once(folder):
                for file in sorted(files):
                    path = os.path.join(root, file)
                    if valid(path):
                        samples.append((path, class_to_idx[name]))
                        empty.discard(name)
        if empty and not allow_empty:
            raise FileNotFoundError(f'Found no valid file for the classes '
                                    f'{", ".join(sorted(empty))}. Supported extensions are: '
                                    f'{", ".join(extensions or ())}')
        return samples


def dataset_record(dataset):
    """{'size', 'files'} of a training set, kept in its checkpoints to notice at resume
    that the images changed. `files` is a hash of a folder dataset's file list (paths
    relative to its root, with their labels: moving the folder changes nothing), None
    for datasets of another kind; wrappers (.dataset, .images) are looked through."""
    folder = dataset
    while folder is not None and not isinstance(folder, datasets.DatasetFolder):
        folder = next((getattr(folder, name) for name in ('dataset', 'images')
                       if hasattr(folder, name)), None)
    files = None
    if folder is not None:
        root = os.path.join(folder.root, '')
        listing = '\n'.join(f'{label} {path.removeprefix(root)}' for path, label in folder.samples)
        files = hashlib.sha256(listing.encode()).hexdigest()[:16]
    return {'size': len(dataset), 'files': files}


def _image_folder(root, split, transform):
    """torchvision ImageFolder of `root/split`, with clear errors for bad layouts."""
    folder = root / split
    if not folder.is_dir():
        raise UsageError(f'--data_path {root} has no {split}/ folder '
                         f'(expected {split}/<class>/<image files>)')
    if not any(p.is_dir() for p in folder.iterdir()):
        raise UsageError(f'{folder} has no class folders (expected {split}/<class>/<image files>)')
    try:
        return ImageFiles(str(folder), transform=transform, loader=read_rgb)
    except FileNotFoundError as err:
        raise UsageError(f'{folder}: class folders without image files ({err})') from err


def _data_root(args):
    """`args.data_path` as a Path, checked as far as the dataset needs it."""
    if not args.data_path:
        raise UsageError('--data_path is required for --dataset imagenet (a folder with '
                         'train/ and val/ ImageFolders)')
    root = Path(args.data_path).expanduser()
    if root.exists() and not root.is_dir():
        raise UsageError(f'--data_path {root} is not a folder')
    if args.dataset == 'imagenet' and not root.is_dir():
        raise UsageError(f'--data_path {root} does not exist')
    return root


def _load(args, split, transform):
    """The raw dataset of `split` ('pretrain', 'train' or 'val') with `transform`."""
    dataset_info(args.dataset)
    root = _data_root(args)
    if args.dataset in ('imagenet', 'demo'):
        if args.dataset == 'demo':
            ensure_demo_dataset(root)
        return _image_folder(root, 'val' if split == 'val' else 'train', transform)
    if args.dataset == 'fashion_mnist':
        train = split != 'val'
        return FashionMNIST(_fashion_mnist_folder(root, train), train, transform)
    return _torchvision_dataset(args.dataset, root, split, transform)


def _first(dataset, n):
    """The first n samples (all when n < 0); ImageFolders stay ImageFolders."""
    if n < 0:
        return dataset
    if isinstance(dataset, datasets.ImageFolder):
        dataset.samples = dataset.samples[:n]
        dataset.imgs = dataset.samples
        dataset.targets = dataset.targets[:n]
        return dataset
    return Subset(dataset, range(min(n, len(dataset))))


def pretrain_images(args, transform=None):
    """The training (image, label) items of `args.dataset` (the first --size_dataset),
    with `transform`; without one, the GPU data backend reads them (src/gpu_data.py)."""
    return _first(_load(args, 'pretrain', transform), args.size_dataset)


def build_pretrain_dataset(args):
    """Training images of `args.dataset`; each item is the list of V view tensors."""
    return ViewsOnly(pretrain_images(args, MultiCropTransform(args, dataset_info(args.dataset))))


def build_eval_dataset(args, split, kind):
    """(image tensor, label) items of `split` ('train' or 'val' = test split), with the
    'plain', 'monitor', 'val' or 'train_aug' transform (see `build_eval_transform`); never
    truncated.

    ImageFolder datasets come back as ImageFolders (`.classes`, `.samples`, `.targets`);
    the others have at least `.classes` and `.targets`.
    """
    if split not in ('train', 'val'):
        raise ValueError(f'split must be "train" or "val", not {split!r}')
    info = dataset_info(args.dataset)
    crops = getattr(args, 'crops_size', None)
    crop = crops[0] if crops else info.crop_size
    return _load(args, split, build_eval_transform(info, crop, kind))
