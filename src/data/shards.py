"""WebDataset tar shards (`--dataset shards`), read with random access.

A sample is the run of consecutive members that share a key (webdataset's
convention: `000123.jpg`, `000123.cls`); its image is the member with an image
extension. At start-up each shard's headers are indexed with the tarfile module (no
image is read), which gives every sample's offset and size: sample i is then one
seek and one read, so the global-batch sampler and the exact resume work as for
image files (every rank and loader worker reads only the samples of its own batches).
Shards must be uncompressed tars (a compressed tar cannot seek). A member that does
not decode, or that a truncated shard cuts short, is an UnreadableImage: training
replaces and counts it like any bad image.
"""
import glob
import os
import tarfile

import numpy as np

from src.data.images import ImageSamples, decode_rgb, unreadable
from src.data.own_images import SHOWN, pretraining_only
from src.errors import UnreadableImage, UsageError

TAR_MAGIC, TAR_MAGIC_END = b"ustar", 262  # bytes 257-261 of a (POSIX or GNU) tar
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "pgm", "tif", "tiff")


def shard_paths(pattern):
    """The shard files of --data_path `pattern`: webdataset's brace expansion
    ('DIR/train-{000000..000099}.tar') or a folder's .tar files, sorted."""
    from webdataset.shardlists import expand_urls  # a slow import, for this dataset only
    pattern = str(pattern)
    paths = (sorted(glob.glob(os.path.join(pattern, "*.tar"))) if os.path.isdir(pattern)
             else expand_urls(pattern))
    missing = [path for path in paths if not os.path.isfile(path)]
    if len(missing) == len(paths):
        raise UsageError(f"--data_path {pattern} matches no shard file (expected "
                         f"'DIR/train-{{000000..000099}}.tar' or a folder of .tar files)")
    if missing:
        raise UsageError(f"--data_path {pattern}: {len(missing)} of its {len(paths)} shards "
                         f"do not exist, e.g. {', '.join(missing[:SHOWN])}")
    return paths


def index_shard(path):
    """([(member name, data offset, size)] of the image of each sample of the shard at
    `path`, the number of samples without an image)."""
    from webdataset.tariterators import base_plus_ext
    try:
        with open(path, "rb") as f:
            if f.read(TAR_MAGIC_END)[TAR_MAGIC_END - len(TAR_MAGIC):] != TAR_MAGIC:
                raise tarfile.ReadError("no tar header at its start (compressed?)")
        members = tar_members(path)
    except (tarfile.TarError, OSError) as err:
        raise UsageError(f"cannot index the shard {path} ({type(err).__name__}: {err}); "
                         f"shards are uncompressed tar files") from None
    images, samples, last, found = [], 0, None, False
    for name, offset, size in members:
        key, ext = base_plus_ext(name)
        if key is None:  # no extension: not part of a sample
            continue
        if key != last:
            samples, last, found = samples + 1, key, False
        if not found and ext.lower() in IMAGE_EXTENSIONS:
            images.append((name, offset, size))
            found = True
    return images, samples - len(images)


def tar_members(path):
    """[(name, data offset, size)] of the files in the tar at `path`. A bad header block
    is stepped over; a truncated tar keeps the members it has, the last one cut short
    (reading it fails later, as an unreadable image)."""
    members = []
    with tarfile.open(path, "r:", ignore_zeros=True) as tar:
        try:
            for member in tar:
                if member.isfile():
                    members.append((member.name, member.offset_data, member.size))
        except tarfile.ReadError:  # "unexpected end of data": the tar ends early
            pass
    return members


class ShardImages(ImageSamples):
    """The images of the shards `paths`, in shard order then tar order (label -1)."""

    def __init__(self, paths, transform=None):
        names, shard, offsets, sizes, without = [], [], [], [], 0
        for number, path in enumerate(paths):
            images, missing = index_shard(path)
            without += missing
            names += [f"{os.path.abspath(path)}/{name}" for name, _, _ in images]
            shard += [number] * len(images)
            offsets += [offset for _, offset, _ in images]
            sizes += [size for _, _, size in images]
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
        super().__init__(root, [(name, -1) for name in names], transform=transform)
        self.paths = list(paths)
        # arrays rather than lists: loader workers share them without copying
        self.shard, self.offsets, self.sizes = (np.asarray(a, dtype=np.int64)
                                                for a in (shard, offsets, sizes))
        self.note = f"in {len(paths)} shards" + (
            f"; skipped {without} samples without an image" if without else "")

    def read_bytes(self, index):
        """The file contents of image `index`, read from its shard."""
        name, size = self.samples[index][0], int(self.sizes[index])
        try:
            with open(self.paths[self.shard[index]], "rb") as f:
                f.seek(int(self.offsets[index]))
                raw = f.read(size)
        except OSError as err:
            raise unreadable(name, err) from None
        if len(raw) != size:
            raise UnreadableImage(f"cannot read image {name} (its shard ends "
                                  f"{size - len(raw)} bytes early: truncated)", name)
        return raw

    def load(self, index):
        return decode_rgb(self.read_bytes(index), self.samples[index][0])


def tar_shards(root, split, transform):
    """The reader of --dataset shards: ShardImages of --data_path's shards."""
    pretraining_only("shards", split)
    dataset = ShardImages(shard_paths(root), transform)
    if not len(dataset):
        raise UsageError(f"the shards of --data_path {root} hold no image")
    return dataset
