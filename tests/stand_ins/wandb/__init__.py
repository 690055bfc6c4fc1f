"""A stand-in for the optional `wandb` package, for the tests only (put
tests/stand_ins on the path): it records every call the code makes, one JSON line
each, in the file named by $WANDB_STAND_IN_LOG, and talks to no network."""
import json
import os


def _record(call, **data):
    with open(os.environ["WANDB_STAND_IN_LOG"], "a") as f:
        f.write(json.dumps({"call": call, **data}, default=str) + "\n")


class Run:
    def __init__(self, run_id):
        self.id = run_id

    def log(self, data, step=None):
        _record("log", data=data, step=step)

    def finish(self):
        _record("finish")


def init(**kwargs):
    _record("init", kwargs=kwargs, mode=os.environ.get("WANDB_MODE"))
    return Run(kwargs.get("id"))
