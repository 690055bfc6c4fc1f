"""How a script ends when it cannot go on: bad input (flags, paths, data, checkpoints,
a disk that refuses a checkpoint) with one clear line and exit code 2, never a
traceback; a non-finite loss with one line and exit code 1; a stop signal, once its
checkpoint is written, with exit code 75 (see src/preemption.py)."""
import functools
import os
import sys

from src.preemption import EXIT_PREEMPTED, Preempted


class UsageError(Exception):
    """A problem with the user's input (paths, flags, data, checkpoints)."""


class NonFiniteLoss(RuntimeError):
    """Raised on every rank when the averaged loss is NaN or infinite."""


def exit_on_usage_error(main):
    """Wrap a script's `main`: a UsageError prints one line and exits with 2, a
    non-finite loss prints one line and exits with 1, Preempted exits with 75 (the
    run logged why)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            _fail(err, 2)
        except NonFiniteLoss as err:
            _fail(err, 1)
        except Preempted:
            sys.exit(EXIT_PREEMPTED)

    return wrapper


def _fail(err, code):
    if os.environ.get("RANK", "0") == "0":  # one message, not one per process
        prog = os.path.basename(sys.argv[0]) if sys.argv else "resa"
        message = str(err)
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep its line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
