"""Bad input ends a script with one clear line and exit code 2, never a traceback."""
import functools
import os
import sys


class UsageError(Exception):
    """A problem with the user's input (paths, flags, data, checkpoints)."""


def exit_on_usage_error(main):
    """Wrap a script's `main` so that a UsageError prints one line and exits with 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            if os.environ.get("RANK", "0") == "0":  # one message, not one per process
                prog = os.path.basename(sys.argv[0]) if sys.argv else "resa"
                print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
