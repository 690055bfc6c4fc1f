"""The standard ImageNet 1% / 10% training subsets (SPEC §5).

A subset list is a text file of training-image file names, one a line
(`n01440764_10026.JPEG`; the class is the text before the first `_`). The project does
not ship the lists: they come from `--train_files` or are downloaded once from the
public SimCLR release into a cache folder.
"""
import os
import tempfile
import urllib.request
from pathlib import Path

from src.errors import UsageError

SUBSET_URL = ("https://raw.githubusercontent.com/google-research/simclr/master/"
              "imagenet_subsets/{percent}percent.txt")
DOWNLOAD_TIMEOUT_S = 20


def cache_dir():
    """`$XDG_CACHE_HOME/resa`, or `~/.cache/resa`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resa"


def parse_subset(text, source):
    """The file names of a subset list; blank lines are skipped, anything that is not a
    `<class>_<id>.<ext>` name is a UsageError (e.g. an HTML error page)."""
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
        raise UsageError(f"cannot read --train_files {path}: {err}")
    return parse_subset(text, path)


def download_subset(percent, timeout=DOWNLOAD_TIMEOUT_S):
    """Path of the cached `{percent}percent.txt`, downloaded on first use.

    The download goes to a temporary file that is renamed into place once checked, so
    an interrupted or failed download never leaves a partial list in the cache.
    """
    target = cache_dir() / f"{percent}percent.txt"
    if target.is_file():
        return target
    url = SUBSET_URL.format(percent=percent)
    hint = (f"give the list with --train_files PATH, or put it at {target} "
            f"(it is downloaded from {url} when the network allows)")
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8")
        parse_subset(text, url)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except (OSError, ValueError, UsageError) as err:  # URLError and timeouts are OSErrors
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        raise UsageError(f"the ImageNet {percent}% subset list could not be downloaded "
                         f"({type(err).__name__}: {err}); {hint}")
    return target


def subset_names(percent, train_files=None):
    """The subset's file names, from `train_files` when given, else from the cache."""
    if train_files:
        if not os.path.isfile(train_files):
            raise UsageError(f"--train_files {train_files} does not exist")
        return read_subset(train_files)
    return read_subset(download_subset(percent))


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
