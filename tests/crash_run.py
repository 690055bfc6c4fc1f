"""Run a script and break it at a chosen moment: `python tests/crash_run.py main.py ARGS`
(or under torchrun). What happens, and when, is set by environment variables, each a
comma-separated list of "RANK:POINT:N" (the N-th time that rank reaches POINT, counted
from the start of its process):

    RESA_CRASH="0:save:1"          SIGKILL the whole run (torchrun, every rank and every
                                   loader worker), as a node failure would
    RESA_RAISE="1:forward:3"       raise RuntimeError("injected failure"), as a bug would
    RESA_SIGNAL="0:data:1:USR1"    send the signal (USR1, TERM, INT) to this process

POINTs: "step" after an optimizer step, "forward" at the start of a training step,
"save" halfway through writing a file with torch.save (the rest follows unless killed),
"rotate" right after a checkpoint became the previous one (the rename onto
*.prev.pth.tar), "data" when a dataset starts to load, "eval" at the forward of an
encoder in eval mode (evaluation, the online monitor). `arm` also serves the tests in
their own process, with pytest's monkeypatch.setattr as `patch`.
"""
import io
import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ACTIONS = ("RESA_CRASH", "RESA_RAISE", "RESA_SIGNAL")


def descendants(root):
    """Pids of every process below `root`, from /proc."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_everything():
    root = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()
    others = [pid for pid in [root, *descendants(root)] if pid != os.getpid()]
    for pid in others:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def raise_failure():
    print("crash_run: injected failure", file=sys.stderr, flush=True)
    raise RuntimeError("injected failure")


def send(name):
    """An action that sends SIG`name` to this process."""
    signum = getattr(signal, f"SIG{name}")
    return lambda: os.kill(os.getpid(), signum)


def arm(rank, point, count, action, patch=setattr):
    """Call `action()` the `count`-th time this process (if its RANK is `rank`) reaches
    `point`; `patch(owner, name, value)` installs the hook."""
    if int(os.environ.get("RANK", "0")) != rank:
        return
    calls = {"n": 0}
    armed_in = os.getpid()  # not in the loader workers, which inherit the patches

    def counted():
        if os.getpid() != armed_in:
            return False
        calls["n"] += 1
        return calls["n"] == count

    if point == "step":
        from src.train.optim import AmpOptimizer
        step = AmpOptimizer.step

        def step_then(self, loss):
            step(self, loss)
            if counted():
                action()
        patch(AmpOptimizer, "step", step_then)
    elif point == "forward":
        from src.train.loop import TrainLoop
        train_step = TrainLoop._train_step

        def in_step(self, batch):
            if counted():
                action()
            return train_step(self, batch)
        patch(TrainLoop, "_train_step", in_step)
    elif point == "save":
        import torch
        save = torch.save

        def in_the_middle(obj, f, *args, **kwargs):
            if isinstance(f, io.BytesIO) or not counted():  # BytesIO: pickling a tensor
                return save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[:len(data) // 2])
            f.flush()
            action()
            f.write(data[len(data) // 2:])
        patch(torch, "save", in_the_middle)
    elif point == "rotate":
        replace = os.replace

        def replace_then(source, destination):
            replace(source, destination)
            if str(destination).endswith(".prev.pth.tar") and counted():
                action()
        patch(os, "replace", replace_then)
    elif point == "data":
        import src.data.datasets as datasets
        load = datasets.read_split

        def loading(*args, **kwargs):
            if counted():
                action()
            return load(*args, **kwargs)
        patch(datasets, "read_split", loading)
    elif point == "eval":
        from torchvision.models.resnet import ResNet
        forward = ResNet.forward

        def evaluating(self, x):
            if not self.training and counted():
                action()
            return forward(self, x)
        patch(ResNet, "forward", evaluating)
    else:
        raise SystemExit(f"unknown crash point {point!r}")


def arm_from_environment():
    for variable in ACTIONS:
        for spec in filter(None, os.environ.get(variable, "").split(",")):
            rank, point, count, *name = spec.split(":")
            action = {"RESA_CRASH": kill_everything, "RESA_RAISE": raise_failure}.get(
                variable) or send(name[0])
            arm(int(rank), point, int(count), action)


def as_from_a_terminal():
    """SIGINT as a terminal's foreground process has it: a test run started as a
    background job (`cmd &` without job control) hands its children SIGINT ignored,
    and Python then installs no KeyboardInterrupt for the emulated Ctrl-C."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    as_from_a_terminal()
    arm_from_environment()
    script = sys.argv.pop(1)
    sys.argv[0] = script
    runpy.run_path(str(REPO / script), run_name="__main__")
