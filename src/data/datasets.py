"""The dataset registry: everything the code knows about each dataset, in one entry
of DATASETS (how to read it, its statistics, image size, stem, classes and the flag
defaults of its recipe), and the functions that build the pretraining and evaluation
sets from a config.Data. Adding a dataset is adding an entry here (and, for a new file
format, a reader in src/data/readers.py; your own images: src/data/own_images.py and
src/data/shards.py).
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset, Subset
from torchvision import datasets

from src.data import readers
from src.data.demo import NUM_CLASSES as DEMO_NUM_CLASSES
from src.data.images import ImageSamples
from src.data.own_images import image_list, image_tree
from src.data.shards import tar_shards
from src.data.transforms import MultiCropTransform, eval_transform
from src.distributed import main_process_first
from src.errors import UsageError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# resa_cifar's recipe (SPEC §7), for the datasets of the authors' second repository
RESA_CIFAR = {"arch": "resnet18", "epochs": 1000, "lr": 0.3, "wd": 1e-4, "pred": False,
              "precision": "fp32", "wandb_project": "resa_cifar"}
# resa_cifar's monitor (eval/dataloader.py) normalises CIFAR-10 *and* CIFAR-100 with
# CIFAR-10's statistics, its std written with three decimals
RESA_CIFAR_MONITOR_NORM = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset. `read(root, split, transform)` gives its (image, label) items (see
    src/data/readers.py); `small_images` are evaluated at their own size (no 256/224
    resize); `recipe` holds the flag defaults of its recipe (a flag given on the command
    line wins); `monitored`: main.py's online monitor runs on it; `path_help` says what
    --data_path is, and a reader with `folder_path` False checks it itself (a file, a
    pattern)."""
    read: Callable
    mean: tuple
    std: tuple
    num_classes: int
    crop_size: int          # default pretraining crop
    stem: str               # default --stem: "cifar" (3x3 stride-1, no max-pool) or "imagenet"
    small_images: bool
    blur_prob: float        # Gaussian blur probability of the strong views
    recipe: dict = field(default_factory=dict)
    monitor_norm: tuple = None  # (mean, std) of the online monitor's images, if not those
    default_path: str = "./data"  # None: --data_path is required
    plain_init_resnet18: bool = False  # resnet18 without zero-init residual BNs
    monitored: bool = True
    superclasses: Callable = None  # root -> (coarse label of every test image, names)
    path_help: str = "a folder with train/ and val/ ImageFolders"
    folder_path: bool = True


DATASETS = {
    "imagenet": DatasetSpec(readers.image_folder, IMAGENET_MEAN, IMAGENET_STD, 1000, 224,
                            "imagenet", False, 0.5, {"arch": "resnet50"}, default_path=None,
                            monitored=False),
    "cifar10": DatasetSpec(readers.torchvision_reader("cifar10"), (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), 10, 32, "cifar", True, 0.0, RESA_CIFAR,
                           RESA_CIFAR_MONITOR_NORM, plain_init_resnet18=True),
    "cifar100": DatasetSpec(readers.torchvision_reader("cifar100"), (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), 100, 32, "cifar", True, 0.0, RESA_CIFAR,
                            RESA_CIFAR_MONITOR_NORM, plain_init_resnet18=True,
                            superclasses=readers.cifar100_superclasses),
    # resa_cifar's STL-10: 32 px crops of the 96 px images with the ImageNet stem, no blur
    "stl10": DatasetSpec(readers.torchvision_reader("stl10"), (0.43, 0.42, 0.39),
                         (0.27, 0.26, 0.27), 10, 32, "imagenet", False, 0.0, RESA_CIFAR,
                         plain_init_resnet18=True),
    "fashion_mnist": DatasetSpec(readers.fashion_mnist, (0.2860,) * 3, (0.3530,) * 3, 10, 32,
                                 "cifar", True, 0.0, {"arch": "resnet18"},
                                 plain_init_resnet18=True),
    "demo": DatasetSpec(readers.demo_folder, IMAGENET_MEAN, IMAGENET_STD, DEMO_NUM_CLASSES, 32,
                        "imagenet", False, 0.0, {"arch": "resnet18"},
                        default_path="./data/demo", plain_init_resnet18=True),
    # your own images, with ImageNet's statistics (--mean/--std) and recipe
    "folder": DatasetSpec(image_tree, IMAGENET_MEAN, IMAGENET_STD, 1000, 224, "imagenet",
                          False, 0.5, default_path=None, monitored=False,
                          path_help="a folder of images in any layout, searched recursively"),
    "filelist": DatasetSpec(image_list, IMAGENET_MEAN, IMAGENET_STD, 1000, 224, "imagenet",
                            False, 0.5, default_path=None, monitored=False, folder_path=False,
                            path_help="a .csv or .txt list of image paths, or a folder with "
                            "train.csv and val.csv"),
    "shards": DatasetSpec(tar_shards, IMAGENET_MEAN, IMAGENET_STD, 1000, 224, "imagenet",
                          False, 0.5, default_path=None, monitored=False, folder_path=False,
                          path_help="WebDataset tar shards, e.g. 'DIR/train-{000000..000099}.tar'"
                          ", or their folder"),
}


def dataset_spec(name):
    """The DatasetSpec of a name of DATASETS."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def data_root(data):
    """`data.data_path` as a Path, checked as far as the dataset needs it."""
    spec = dataset_spec(data.dataset)
    if not data.data_path:
        raise UsageError(f"--data_path is required for --dataset {data.dataset} "
                         f"({spec.path_help})")
    root = Path(data.data_path).expanduser()
    if not spec.folder_path:
        return root
    if root.exists() and not root.is_dir():
        raise UsageError(f"--data_path {root} is not a folder")
    if spec.default_path is None and not root.is_dir():
        raise UsageError(f"--data_path {root} does not exist")
    return root


def read_split(data, split, transform):
    """The (image, label) items of `split` ('pretrain', 'train' or 'val')."""
    return dataset_spec(data.dataset).read(data_root(data), split, transform)


def first(dataset, n):
    """The first n samples (all when n < 0); ImageFolders and ImageSamples stay what
    they are."""
    if n < 0:
        return dataset
    if isinstance(dataset, (datasets.ImageFolder, ImageSamples)):
        dataset.samples = dataset.samples[:n]
        dataset.imgs = dataset.samples
        dataset.targets = dataset.targets[:n]
        return dataset
    return Subset(dataset, range(min(n, len(dataset))))


class ViewsOnly(Dataset):
    """Drops the labels: a pretraining item is only its list of views."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index][0]


def pretrain_images(data, transform=None):
    """The training (image, label) items (the first --size_dataset), with `transform`;
    without one, the GPU data backend reads them (src/data/encoded.py)."""
    return first(read_split(data, "pretrain", transform), data.size_dataset)


def pretrain_dataset(data, views):
    """The training images, each item the list of the views of config.Views `views`."""
    return ViewsOnly(pretrain_images(data, MultiCropTransform(views)))


def eval_dataset(data, split, kind, crop):
    """(image tensor, label) items of `split` ('train' or 'val' = test split) at `crop`
    pixels, with the `kind` transform of src/data/transforms.eval_transform; never
    truncated. ImageFolder datasets come back as ImageFolders (`.classes`, `.samples`,
    `.targets`); the others have at least `.classes` and `.targets`."""
    if split not in ("train", "val"):
        raise ValueError(f'split must be "train" or "val", not {split!r}')
    transform = eval_transform(dataset_spec(data.dataset), crop, kind, data.mean, data.std)
    return read_split(data, split, transform)


def check_classes(train, val, num_classes):
    """UsageError unless train and val have the same classes and they fit the head:
    with other classes in val/, the same index would name different classes and every
    accuracy would be silently wrong."""
    if list(train.classes) != list(val.classes):
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        detail = (f"only in train: {only_train[:3]}; only in val: {only_val[:3]}"
                  if only_train or only_val else "same names in another order")
        raise UsageError(f"the val split's {len(val.classes)} classes differ from the train "
                         f"split's {len(train.classes)} ({detail})")
    if num_classes < len(train.classes):
        raise UsageError(f"--num_classes {num_classes} is smaller than the "
                         f"{len(train.classes)} classes of the data")


def eval_datasets(data, crop, num_classes, train_kind, val_kind="plain"):
    """(train, val) datasets with the `train_kind` and `val_kind` transforms, checked
    against each other and `num_classes`; built on rank 0 first (a download happens
    once)."""
    train, val = main_process_first(lambda: (eval_dataset(data, "train", train_kind, crop),
                                             eval_dataset(data, "val", val_kind, crop)))
    check_classes(train, val, num_classes)
    return train, val
