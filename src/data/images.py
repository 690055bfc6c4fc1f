"""Reading image files: one decode path for every dataset and both data backends, the
listing of an image folder that follows each real directory once, and the dataset of
a list of images (folders, file lists, tar shards)."""
import io
import os

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from src.errors import UnreadableImage
from src.logger import get_logger

READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


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
    except READ_ERRORS as err:
        raise unreadable(path, err) from None


def decode_rgb(raw, name):
    """The RGB image of the file contents `raw` (bytes), called `name` in errors."""
    try:
        return as_rgb(Image.open(io.BytesIO(raw)))
    except READ_ERRORS as err:
        raise unreadable(name, err) from None


def unreadable(name, err):
    return UnreadableImage(f'cannot read image {name} ({type(err).__name__}: {err})', str(name))


class ToRGB:
    """Converts grayscale (fashion_mnist) or palette images to 3-channel RGB."""

    def __call__(self, img):
        return img if img.mode == 'RGB' else as_rgb(img)


def walk_once(top, skip_folder=None):
    """(folder, file names) of `top` and of every folder below it, symbolic links
    followed, in torchvision's order; a folder reached a second time (a link that loops
    back, two links to one folder) is listed once, with a warning. A folder whose path
    `skip_folder` (if given) holds true of is not entered."""
    def identity(path):
        info = os.stat(path)
        return info.st_dev, info.st_ino

    seen, found = {identity(top)}, []
    for root, dirs, files in os.walk(top, followlinks=True):
        dirs.sort()  # the first path to a folder, in sorted order, is the one kept
        if skip_folder:
            dirs[:] = [name for name in dirs if not skip_folder(os.path.join(root, name))]
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


class ImageSamples(Dataset):
    """(image, label) items of `samples`, a list of (name, label): torchvision's
    ImageFolder interface (`root`, `samples`, `targets`, `classes`, `transform`) for a
    list of images made otherwise. Label -1 = none. A subclass says how `load(index)`
    gets the PIL image; an unreadable one is an UnreadableImage."""

    note = ""  # what the reader tells of the images (skipped files, shards), for the log

    def __init__(self, root, samples, classes=(), transform=None):
        self.root, self.samples, self.classes = str(root), samples, list(classes)
        self.targets = [label for _, label in samples]
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        img = self.load(index)
        return (self.transform(img) if self.transform else img), self.targets[index]

    def load(self, index):
        raise NotImplementedError


class ImagePaths(ImageSamples):
    """ImageSamples whose names are paths of image files."""

    def load(self, index):
        return read_rgb(self.samples[index][0])
