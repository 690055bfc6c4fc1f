"""The train/val pair of an evaluation, checked against each other and --num_classes.

Labels are class indices; if val/ held other classes than train/, the same index
would name different classes and every accuracy would be silently wrong.
"""
from src.data import build_eval_dataset
from src.distributed import main_process_first
from src.errors import UsageError


def check_classes(train, val, num_classes):
    """UsageError unless train and val have the same classes and they fit the head."""
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


def eval_datasets(args, train_kind, val_kind="plain"):
    """(train, val) datasets with the `train_kind` and `val_kind` transforms.

    Built on rank 0 first, so that a download happens once.
    """
    def build():
        return (build_eval_dataset(args, "train", train_kind),
                build_eval_dataset(args, "val", val_kind))

    train, val = main_process_first(build)
    check_classes(train, val, args.num_classes)
    return train, val
