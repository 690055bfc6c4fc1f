"""Run main.py or eval_linear.py and kill the whole run with SIGKILL at a chosen moment,
as a node failure would: `python tests/crash_run.py main.py ARGS` (or under torchrun).

RESA_CRASH="RANK:step:N" kills after the N-th optimizer step of that rank (counted
from the start of this process), "RANK:forward:N" at the start of its N-th forward,
"RANK:save:N" halfway through writing its N-th file with torch.save. The kill reaches
torchrun, every rank and every loader worker.
"""
import io
import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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


def arm(rank, kind, count):
    if int(os.environ.get("RANK", "0")) != rank:
        return
    calls = {"n": 0}
    armed_in = os.getpid()  # not in the loader workers, which inherit the patches

    def counted():
        if os.getpid() != armed_in:
            return False
        calls["n"] += 1
        return calls["n"] == count

    if kind == "step":
        from src.optim import AmpOptimizer
        step = AmpOptimizer.step

        def step_then_kill(self, loss):
            step(self, loss)
            if counted():
                kill_everything()
        AmpOptimizer.step = step_then_kill
    elif kind == "forward":
        from src.train_loop import TrainLoop
        train_step = TrainLoop._train_step

        def kill_in_step(self, batch):
            if counted():
                kill_everything()
            return train_step(self, batch)
        TrainLoop._train_step = kill_in_step
    elif kind == "save":
        import torch
        save = torch.save

        def half_then_kill(obj, f, *args, **kwargs):
            if isinstance(f, io.BytesIO) or not counted():  # BytesIO: pickling a tensor
                return save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            f.flush()
            kill_everything()
        torch.save = half_then_kill
    else:
        raise SystemExit(f"unknown crash kind {kind!r}")


if __name__ == "__main__":
    if os.environ.get("RESA_CRASH"):
        rank, kind, count = os.environ["RESA_CRASH"].split(":")
        arm(int(rank), kind, int(count))
    script = sys.argv.pop(1)
    sys.argv[0] = script
    runpy.run_path(str(REPO / script), run_name="__main__")
