"""Print the README's table of flags from the one parser in args.py.

    python tools/flags_table.py > /tmp/flags.md
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from args import build_parser  # noqa: E402


def rows():
    parser = build_parser()
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        yield f"| **{group.title}** | | |"
        for action in actions:
            names = " ".join(f"`{name}`" for name in action.option_strings)
            shown = "" if action.default is None or action.nargs == 0 else action.default
            default = f"`{shown}`" if shown != "" else ""
            yield f"| {names} | {default} | {action.help.replace('|', '/')} |"


def main():
    argparse.ArgumentParser(description="Print the README's markdown table of the flags "
                            "of main.py, eval_knn.py and eval_linear.py.").parse_args()
    print("| flag | default | meaning |")
    print("|---|---|---|")
    for row in rows():
        print(row)


if __name__ == "__main__":
    main()
