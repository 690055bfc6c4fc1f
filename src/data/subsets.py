"""The standard ImageNet 1% / 10% training subsets (SPEC §5).

A subset list is a text file of training-image file names, one a line
(`n01440764_10026.JPEG`; the class is the text before the first `_`). The two public
lists ship with the project in src/imagenet_subset/ (the same files as in the authors'
repository), so `--train_percent 1|10` works offline; `--train_files` gives another.
"""
import os
from pathlib import Path

from src.errors import UsageError

SHIPPED_DIR = Path(__file__).resolve().parent / "imagenet_subset"


def shipped_subset(percent):
    """Path of the `{percent}percent.txt` list shipped with the project."""
    return SHIPPED_DIR / f"{percent}percent.txt"


def parse_subset(text, source):
    """The file names of a subset list; blank lines are skipped, anything that is not a
    `<class>_<id>.<ext>` name is a UsageError (e.g. an HTML page saved by mistake)."""
    names = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [n for n in names if "_" not in n or "/" in n or "." not in n]
    if not names or bad:
        raise UsageError(f"{source} is not a subset list (one training file name a line, "
                         f"e.g. n01440764_10026.JPEG); " + (f"bad lines: {bad[:3]}" if bad
                                                           else "it is empty"))
    return names


def subset_class(name):
    return name.split("_", 1)[0]


def read_subset(path):
    """Names of the subset list at `path`."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read the subset list {path}: {err}")
    return parse_subset(text, path)


def subset_names(percent, train_files=None):
    """The subset's file names, from `train_files` when given, else the shipped list."""
    if train_files:
        if not os.path.isfile(train_files):
            raise UsageError(f"--train_files {train_files} does not exist")
        return read_subset(train_files)
    return read_subset(shipped_subset(percent))


def select_subset(dataset, names):
    """Keep only the samples of an ImageFolder whose file name is in `names`, in place.

    Samples keep the ImageFolder's (sorted) order; names absent from the training
    folder are a UsageError that shows a few of them.
    """
    wanted = set(names)
    kept = [s for s in dataset.samples if os.path.basename(s[0]) in wanted]
    found = {os.path.basename(s[0]) for s in kept}
    missing = sorted(wanted - found)
    if missing:
        raise UsageError(f"{len(missing)} of the {len(wanted)} subset images are not in the "
                         f"training folder, e.g. {', '.join(missing[:3])} (class folder "
                         f"{subset_class(missing[0])}/)")
    dataset.samples = kept
    dataset.imgs = kept
    dataset.targets = [target for _, target in kept]
    return dataset


def low_shot(train, percent, train_files=None):
    """The training set `train` restricted to the ImageNet `percent`% subset (1 or 10;
    100 keeps it whole), from `train_files` or the shipped list."""
    if percent == 100:
        return train
    if not hasattr(train, "samples"):
        raise UsageError(f"--train_percent {percent} needs an ImageFolder training set "
                         f"(--dataset imagenet)")
    return select_subset(train, subset_names(percent, train_files))
