"""Bad input ends a script with one clear line and exit code 2, never a traceback;
a non-finite loss ends it with one line and exit code 1."""
import functools
import os
import sys


class UsageError(Exception):
    """A problem with the user's input (paths, flags, data, checkpoints)."""


class NonFiniteLoss(RuntimeError):
    """Raised on every rank when the averaged loss is NaN or infinite."""


def exit_on_usage_error(main):
    """Wrap a script's `main`: a UsageError prints one line and exits with 2, a
    non-finite loss prints one line and exits with 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            _fail(err, 2)
        except NonFiniteLoss as err:
            _fail(err, 1)

    return wrapper


def _fail(err, code):
    if os.environ.get("RANK", "0") == "0":  # one message, not one per process
        prog = os.path.basename(sys.argv[0]) if sys.argv else "resa"
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    sys.exit(code)
