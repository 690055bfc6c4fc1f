"""How a script ends. Every way out has its exit code, and no process is left behind:

    0    done
    1    a failure: a non-finite loss (one line; the last checkpoint is intact) or an
         unexpected exception (its traceback)
    2    bad input: flags, paths, data, checkpoints (one line, no traceback)
    74   a file could not be written: disk full, quota, file-size limit (one line;
         the old checkpoint is intact)
    75   stopped by a signal once the checkpoint was written (src/train/preemption.py)
    130  interrupted (a second Ctrl-C): one line, no traceback

`script_entry` wraps each script's `main`: it maps the exceptions to these codes,
releases what the run held until its end (`hold_until_exit`: the dump folder's lock)
and makes sure that no data-loader worker survives the script (see
`end_child_processes`).
"""
import contextlib
import functools
import multiprocessing
import os
import sys

EXIT_FAILED, EXIT_USAGE, EXIT_DISK, EXIT_PREEMPTED, EXIT_INTERRUPTED = 1, 2, 74, 75, 130
CHILD_GRACE_S = 2.0  # for loader workers already told to stop, before SIGKILL


class UsageError(Exception):
    """A problem with the user's input (paths, flags, data, checkpoints)."""


class NonFiniteLoss(RuntimeError):
    """Raised on every rank when training diverged: the averaged loss, or the weights
    about to be checkpointed, are NaN or infinite."""


class UnreadableImage(UsageError):
    """An image file that does not decode (truncated, not an image, gone). Training
    substitutes another sample (src/data/loader.py); evaluation stops."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


class DiskError(Exception):
    """A file could not be written (disk full, quota, file-size limit, I/O error)."""


class Preempted(Exception):
    """Raised on every process once the checkpoint after a stop signal is written."""


_held = contextlib.ExitStack()  # what the running script holds until it ends


def hold_until_exit(resource):
    """Enter the context manager `resource` until the script's `main` ends, however it
    ends (script_entry releases it; without script_entry, at process exit)."""
    return _held.enter_context(resource)


def script_entry(main):
    """Wrap a script's `main` with the exit codes above; see the module docstring."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            _fail(err, EXIT_USAGE)
        except DiskError as err:
            _fail(err, EXIT_DISK)
        except NonFiniteLoss as err:
            _fail(err, EXIT_FAILED)
        except Preempted:
            sys.exit(EXIT_PREEMPTED)
        except KeyboardInterrupt:
            _fail("interrupted (Ctrl-C)", EXIT_INTERRUPTED)
        finally:  # any other exception goes on: Python prints it and exits with 1
            _held.close()
            end_child_processes()

    return wrapper


def end_child_processes(grace=CHILD_GRACE_S):
    """Make sure no multiprocessing child (a data-loader worker) outlives the script.

    The loops stop their loaders' workers themselves (src/loader.py's Loader.close);
    this is the last resort. It matters because the workers ignore SIGTERM (so that a
    stop signal sent to the whole process group cannot kill one mid-step), and at
    interpreter exit multiprocessing terminates its children with SIGTERM and then
    waits for them: a worker that nobody had stopped would hold the run forever.
    """
    children = multiprocessing.active_children()
    for child in children:
        child.join(grace / len(children))
    for child in multiprocessing.active_children():
        child.kill()
        child.join()


def _fail(err, code):
    if os.environ.get("RANK", "0") == "0":  # one message, not one per process
        prog = os.path.basename(sys.argv[0]) if sys.argv else "resa"
        message = str(err)
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep its line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
