"""How each kind of dataset is read from disk: `read(root, split, transform)` gives
(image, label) items of split 'pretrain', 'train' or 'val' (the test split). A new
dataset in one of these formats is only an entry in src/data/datasets.py.

Every problem with the files (missing folders, missing files, no network for a
download) is a `UsageError` with one line that says what to do.
"""
import gzip
import pickle
import socket
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from src.data.demo import ensure_demo_dataset
from src.data.images import ImageFiles, read_rgb
from src.errors import UsageError

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'   # Debian dataset-fashion-mnist
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
ARCHIVES = {'cifar10': 'cifar-10-python.tar.gz', 'cifar100': 'cifar-100-python.tar.gz',
            'stl10': 'stl10_binary.tar.gz'}   # what torchvision looks for in --data_path
DOWNLOAD_TIMEOUT_S = 20      # per socket operation, so an offline machine fails fast


def image_folder(root, split, transform):
    """ImageNet's layout: root/train/<class>/<images> and root/val/<class>/<images>."""
    folder = root / ('val' if split == 'val' else 'train')
    if not folder.is_dir():
        raise UsageError(f'--data_path {root} has no {folder.name}/ folder '
                         f'(expected {folder.name}/<class>/<image files>)')
    if not any(p.is_dir() for p in folder.iterdir()):
        raise UsageError(f'{folder} has no class folders (expected '
                         f'{folder.name}/<class>/<image files>)')
    try:
        return ImageFiles(str(folder), transform=transform, loader=read_rgb)
    except FileNotFoundError as err:
        raise UsageError(f'{folder}: class folders without image files ({err})') from err


def demo_folder(root, split, transform):
    """The demo data (src/data/demo.py), generated into `root` on first use."""
    ensure_demo_dataset(root)
    return image_folder(root, split, transform)


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


def fashion_mnist(root, split, transform):
    """Fashion-MNIST from the Debian package's folder if it has the split's files, else
    from `root`."""
    train = split != 'val'
    prefix = 'train' if train else 't10k'
    names = (f'{prefix}-images-idx3-ubyte.gz', f'{prefix}-labels-idx1-ubyte.gz')
    for folder in (Path(FASHION_MNIST_DIR), root):
        if all((folder / name).is_file() for name in names):
            return FashionMNIST(folder, train, transform)
    raise UsageError(f'fashion_mnist: {names[0]} and {names[1]} are neither in '
                     f'{FASHION_MNIST_DIR} nor in --data_path {root}; install the Debian '
                     f'package dataset-fashion-mnist or put the files in --data_path')


def torchvision_reader(name):
    """The reader of torchvision's CIFAR-10, CIFAR-100 or STL-10 (`name`), which
    downloads into --data_path when the files are absent and the network allows."""
    def read(root, split, transform):
        if name == 'stl10':
            cls = datasets.STL10
            kwargs = {'split': {'pretrain': 'train+unlabeled', 'train': 'train',
                                'val': 'test'}[split]}
        else:
            cls = datasets.CIFAR10 if name == 'cifar10' else datasets.CIFAR100
            kwargs = {'train': split != 'val'}
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)    # torchvision's urlopen has no timeout
        try:
            dataset = cls(str(root), transform=transform, download=True, **kwargs)
        except Exception as err:  # no network, HTTP error, bad archive: all mean the same
            raise UsageError(f'{name}: not found in --data_path {root.resolve()} and could '
                             f'not be downloaded ({type(err).__name__}: {err}); put '
                             f'{ARCHIVES[name]} (or its extracted folder) there') from err
        finally:
            socket.setdefaulttimeout(previous)
        if name == 'stl10':    # STL10 keeps its labels in a numpy array called `labels`
            dataset.targets = [int(t) for t in dataset.labels]
        return dataset

    return read


def cifar100_superclasses(root):
    """(coarse label of every test image, the 20 superclass names), read from the
    dataset's own files in --data_path (cifar-100-python/test and meta)."""
    folder = Path(root) / 'cifar-100-python'
    try:
        with open(folder / 'test', 'rb') as f:
            coarse = pickle.load(f, encoding='latin1')['coarse_labels']
        with open(folder / 'meta', 'rb') as f:
            names = pickle.load(f, encoding='latin1')['coarse_label_names']
    except (OSError, KeyError, pickle.UnpicklingError) as err:
        raise UsageError(f"cannot read CIFAR-100's superclasses from {folder} "
                         f'({type(err).__name__}: {err})')
    return np.asarray(coarse), list(names)
