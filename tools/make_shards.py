"""Write WebDataset tar shards (for `main.py --dataset shards`) from your own images: a
folder (every image under it, in the order `--dataset folder` reads them) or a list
(.csv or .txt, read as `--dataset filelist` reads it; its labels become `.cls`
members). Each image's bytes are copied unchanged (no re-encoding) under the key of
its position, so the shards hold the same images in the same order: a run on them is
the run on the folder or the list.

    python tools/make_shards.py data/demo/train shards/ --shard_size 100
    python main.py --dataset shards --data_path 'shards/train-{000000..000002}.tar' ...

It prints the --data_path pattern of the shards it wrote.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.data.own_images import image_tree, read_list  # noqa: E402
from src.errors import UsageError, script_entry  # noqa: E402

DIGITS = 6  # shard numbers: train-000000.tar


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each flag's default."""


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("src", help="a folder of images (searched recursively, hidden files and "
                        "non-images skipped) or a .csv/.txt list of image paths with optional "
                        "labels")
    parser.add_argument("out", help="folder to write the shards into (created if absent)")
    parser.add_argument("--shard_size", type=int, default=10000,
                        help="images per shard (the last shard holds the rest); a few "
                        "thousand photos make shards of a few hundred MB")
    parser.add_argument("--prefix", default="train",
                        help="shard file names: OUT/PREFIX-000000.tar, OUT/PREFIX-000001.tar, ...")
    args = parser.parse_args(argv)
    if args.shard_size <= 0:
        parser.error(f"--shard_size must be positive, got {args.shard_size}")
    return args


def source_images(src):
    """[(path, label or None)] of the folder or list `src`."""
    if src.is_dir():
        return [(path, None) for path, _ in image_tree(src, "pretrain", None).samples]
    if not src.is_file():
        raise UsageError(f"{src} is neither a folder of images nor a list file")
    return read_list(src)


def write_shards(images, out, shard_size, prefix="train"):
    """Write `images` ([(path, label or None)]) into shards of `shard_size` in `out`;
    returns the shard paths."""
    import webdataset  # slow to import: not for --help
    os.makedirs(out, exist_ok=True)
    pattern = os.path.join(out, f"{prefix}-%0{DIGITS}d.tar")
    with webdataset.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0) as sink:
        for index, (path, label) in enumerate(images):
            ext = os.path.splitext(path)[1].lstrip(".").lower() or "jpg"
            try:
                with open(path, "rb") as f:
                    sample = {"__key__": f"{index:09d}", ext: f.read()}
            except OSError as err:
                raise UsageError(f"cannot read {path} ({err.strerror or err})") from None
            if label is not None:
                sample["cls"] = label
            sink.write(sample)
    return [pattern % shard for shard in range(-(-len(images) // shard_size))]


@script_entry
def main(argv=None):
    args = parse(argv)
    images = source_images(Path(args.src).expanduser())
    shards = write_shards(images, args.out, args.shard_size, args.prefix)
    first, last = f"{0:0{DIGITS}d}", f"{len(shards) - 1:0{DIGITS}d}"
    numbers = f"{{{first}..{last}}}" if len(shards) > 1 else first
    print(f"wrote {len(images)} images in {len(shards)} shards; pretrain on them with\n"
          f"  --dataset shards --data_path '{os.path.join(args.out, args.prefix)}-{numbers}.tar'")


if __name__ == "__main__":
    main()
