"""Print the README's table of flags from the one parser (args.py, flags.py).

    python tools/flags_table.py > /tmp/flags.md
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from args import all_flags  # noqa: E402
from flags import SCRIPTS  # noqa: E402

SHORT = {"main": "main", "eval_linear": "linear", "eval_knn": "knn", "clusters": "clusters"}


def rows():
    title = None
    for group, readers, names, kwargs in all_flags()[0]:
        if not names:  # a group's place alone
            continue
        if group != title:
            title = group
            yield f"| **{group}** | | | |"
        shown = kwargs.get("default")
        default = "" if shown is None or kwargs.get("action") else f"`{shown}`"
        read_by = ", ".join(SHORT[s] for s in SCRIPTS if s in readers) or "none"
        flags = " ".join(f"`{name}`" for name in names)
        meaning = kwargs["help"].replace("%%", "%").replace("|", "/")  # as --help shows it
        yield f"| {flags} | {default} | {read_by} | {meaning} |"


def main():
    argparse.ArgumentParser(description="Print the README's markdown table of the flags "
                            "of main.py, eval_knn.py and eval_linear.py.").parse_args()
    print("| flag | default | read by | meaning |")
    print("|---|---|---|---|")
    for row in rows():
        print(row)


if __name__ == "__main__":
    main()
