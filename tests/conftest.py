"""Fixtures shared by the tests (helpers live in helpers_eval.py and helpers_run.py)."""
import logging

import pytest
import torch

from helpers_eval import make_image_folder, resnet
from src.logger import LOGGER_NAME


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared CPU, idle threads spinning against other
    processes make tiny ops many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_path(tmp_path_factory):
    """The demo dataset, generated once per test session."""
    from src.data.demo import ensure_demo_dataset
    path = tmp_path_factory.mktemp("demo") / "data"
    ensure_demo_dataset(str(path))
    return str(path)


@pytest.fixture(scope="session")
def method_run(demo_path, tmp_path_factory):
    """`method_run(name)`: the dump folder of one uninterrupted tiny run of main.py
    --method `name` (helpers_run's TINY, one process, no loader worker), made once per
    session and shared by the kill tests and the evaluations of every method."""
    from helpers_run import launch
    runs = {}

    def run(name):
        if name not in runs:
            dump = tmp_path_factory.mktemp(f"run_{name}")
            code, output = launch(dump, demo_path, "--method", name, "--workers", "0")
            assert code == 0, output[-3000:]
            runs[name] = dump
        return runs[name]
    return run


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def resnet18_file(tmp_path_factory):
    """An encoder-only resnet18 file (ImageNet stem), with non-default BN statistics so
    that a load that skipped buffers would be noticed."""
    torch.manual_seed(1)
    encoder, _ = resnet("resnet18")
    for name, buffer in encoder.state_dict().items():
        if name.endswith("running_mean"):
            buffer.uniform_(-0.1, 0.1)
        elif name.endswith("running_var"):
            buffer.uniform_(0.8, 1.2)
    path = tmp_path_factory.mktemp("weights") / "encoder.pth"
    torch.save(encoder.state_dict(), path)
    return path


@pytest.fixture
def log_lines():
    """Messages of the project logger during the test."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)
