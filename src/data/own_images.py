"""Your own images (README "Your own images"): every image under a folder, in any
layout and without labels (`--dataset folder`), or the images named by a list file,
with or without labels (`--dataset filelist`). The order is fixed (folders and file
names sorted; a list's own order), so per-sample seeds and exact resume hold as for
ImageFolders.

A list is a .csv (`path,label` rows, an optional `path` header) or a .txt (a path a
line, optionally followed by spaces and a label; a path with spaces needs a .csv).
Relative paths are relative to the list's folder. The evaluations read a folder that
holds train.csv and val.csv (or .txt), with labels.
"""
import csv
import io
import os

from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from src.data.images import ImagePaths, walk_once
from src.errors import UsageError

LIST_SUFFIXES = (".csv", ".txt")
HEADERS = ("path", "file", "filename")  # a CSV first row that names its columns
SHOWN = 3  # missing files named in an error


def pretraining_only(dataset, split):
    """A UsageError when an evaluation asks for the labels of an unlabelled dataset."""
    if split != "pretrain":
        raise UsageError(f"--dataset {dataset} has no labels to evaluate with: evaluate on a "
                         f"labelled train/ + val/ folder (--dataset imagenet) or on labelled "
                         f"lists (--dataset filelist); see the README, 'Your own images'")


def image_tree(root, split, transform):
    """ImagePaths of every image file under `root` (folders followed once, see
    walk_once); hidden files and folders, and files without an image extension, are
    skipped and counted in the dataset's `note`."""
    pretraining_only("folder", split)
    hidden, others, paths = [], [], []

    def hidden_folder(path):
        if os.path.basename(path).startswith("."):
            hidden.append(path)
            return True
        return False

    for folder, files in walk_once(str(root), hidden_folder):
        for name in sorted(files):
            path = os.path.join(folder, name)
            (hidden if name.startswith(".") else paths
             if has_file_allowed_extension(name, IMG_EXTENSIONS) else others).append(path)
    note = skipped_note(hidden, others)
    if not paths:
        raise UsageError(f"--data_path {root} holds no image file ({' '.join(IMG_EXTENSIONS)})"
                         + (f"; {note}" if note else ""))
    dataset = ImagePaths(root, [(path, -1) for path in paths], transform=transform)
    dataset.note = note
    return dataset


def skipped_note(hidden, others):
    """What image_tree left out, in a few words ('' for nothing)."""
    parts = [f"hidden files or folders {len(hidden)}"] if hidden else []
    if others:
        parts.append(f"non-image files {len(others)} (e.g. {others[0]})")
    return "skipped: " + ", ".join(parts) if parts else ""


def image_list(root, split, transform):
    """ImagePaths of the list of `split` (see list_file): label -1 for pretraining,
    the class index for the evaluations, whose classes are the train list's labels."""
    path = list_file(root, split)
    rows = read_list(path)
    if split == "pretrain":
        dataset = ImagePaths(path.parent, [(file, -1) for file, _ in rows], transform=transform)
        dataset.note = f"listed in {path}"
        return dataset
    train_path = list_file(root, "train")
    train = rows if path == train_path else read_list(train_path, check_files=False)
    for name, listed in {path: rows, train_path: train}.items():
        if any(label is None for _, label in listed):
            raise UsageError(f"{name} has no labels (a second column): the evaluations need "
                             f"them")
    classes = class_names({label for _, label in train})
    index = {label: i for i, label in enumerate(classes)}
    unknown = sorted({label for _, label in rows} - set(index))
    if unknown:
        raise UsageError(f"{path}: {len(unknown)} labels that the train list does not have, "
                         f"e.g. {', '.join(unknown[:SHOWN])}")
    return ImagePaths(path.parent, [(file, index[label]) for file, label in rows], classes,
                      transform)


def list_file(root, split):
    """The list of `split` that --data_path `root` gives: the list itself (pretraining
    only), or a folder's train.csv / val.csv (.txt also)."""
    if root.is_dir():
        name = "val" if split == "val" else "train"
        for suffix in LIST_SUFFIXES:
            if (root / (name + suffix)).is_file():
                return root / (name + suffix)
        raise UsageError(f"--data_path {root} has no {name}.csv or {name}.txt (a list of "
                         f"image paths{', with labels' if split != 'pretrain' else ''})")
    if not root.is_file():
        raise UsageError(f"--data_path {root} does not exist (expected a .csv or .txt list of "
                         f"image paths, or a folder with train.csv and val.csv)")
    if split != "pretrain":
        raise UsageError(f"--data_path {root} is one list: the evaluations read a train and a "
                         f"val list; give --data_path the folder that holds train.csv and "
                         f"val.csv (or .txt)")
    return root


def read_list(path, check_files=True):
    """[(absolute path, label or None)] of the list file `path`; a UsageError for a list
    that is empty, malformed, or (`check_files`) names files that do not exist."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's BOM too
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read the list {path} ({type(err).__name__}: {err})") from None
    csv_list = path.suffix.lower() == ".csv"
    lines = csv.reader(io.StringIO(text)) if csv_list else (line.split() for line in
                                                            text.splitlines())
    rows = []
    for number, fields in enumerate(lines, 1):
        fields = [field.strip() for field in fields]
        if not fields or not fields[0] or fields[0].startswith("#"):
            continue
        if csv_list and not rows and fields[0].lower() in HEADERS:
            continue
        if len(fields) > 2:
            raise UsageError(f"{path}, line {number}: {len(fields)} fields; expected a path "
                             f"and an optional label" + ("" if csv_list else
                                                         " (a path with spaces needs a .csv)"))
        rows.append((os.path.join(path.parent, os.path.expanduser(fields[0])),
                     fields[1] if len(fields) == 2 else None, number))
    if not rows:
        raise UsageError(f"the list {path} names no file")
    if len({label is None for _, label, _ in rows}) > 1:
        first = next(number for _, label, number in rows if label is None)
        raise UsageError(f"{path}, line {first}: no label, while other lines have one")
    if check_files:
        missing = [file for file, _, _ in rows if not os.path.isfile(file)]
        if missing:
            raise UsageError(f"{path}: {len(missing)} of the {len(rows)} listed files do not "
                             f"exist, e.g. {', '.join(missing[:SHOWN])}")
    return [(file, label) for file, label, _ in rows]


def class_names(labels):
    """The labels sorted: as numbers when they all are integers, else as text."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)
