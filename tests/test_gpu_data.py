"""The GPU data backend on CPU tensors: what the workers read, the batched decode with
its fallbacks, the views it feeds to the step, and main.py with --data_backend gpu."""
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import main as main_script
from args import get_args, pretraining
from src.data.datasets import pretrain_dataset
from src.data.encoded import (EncodedBatch, GpuViews, decode, read_encoded,
                              replace_unreadable)
from src.data.gpu_views import N_PARAMS
from src.data.pipeline import PretrainingData
from src.errors import UnreadableImage, UsageError
from src.logger import LOGGER_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


def picture(size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def save(img, path, **kwargs):
    img.save(path, **kwargs)
    return path


def test_workers_ship_jpeg_bytes_and_decode_everything_else(tmp_path):
    jpeg = save(picture(), tmp_path / "a.jpg", quality=95)
    data, plain, height, width = read_encoded(jpeg)
    assert plain and (height, width) == (30, 40) and data.dtype == torch.uint8
    assert data.numpy().tobytes() == jpeg.read_bytes()  # the file itself, not decoded
    # what the device decoder may refuse is decoded in the worker, by content type
    for name, img, kwargs in (("p.png", picture(), {}), ("c.jpg", picture(mode="CMYK"), {}),
                              ("g.jpg", picture(mode="L"), {}),
                              ("progressive.jpg", picture(), {"progressive": True})):
        path = save(img, tmp_path / name, **kwargs)
        data, plain, height, width = read_encoded(path)
        assert not plain and data.shape == (3, 30, 40)
        expected = np.array(Image.open(path).convert("RGB"))  # what PIL decodes
        assert torch.equal(data, torch.from_numpy(expected).permute(2, 0, 1))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpeg.read_bytes()[:-200])  # truncated: no end-of-image marker
    text = tmp_path / "t.jpg"
    text.write_text("not an image")
    for path in (cut, text):
        with pytest.raises(UnreadableImage, match="cannot read image"):
            read_encoded(path)


def test_batched_decode_matches_the_cpu_decoder_and_falls_back(tmp_path, monkeypatch):
    files = [save(picture((40 + i, 30)), tmp_path / f"{i}.jpg", quality=90) for i in range(3)]
    items = [read_encoded(f) for f in files]
    png = read_encoded(save(picture((20, 10)), tmp_path / "x.png"))
    batch = EncodedBatch([d for d, *_ in items] + [png[0]], [True] * 3 + [False],
                         torch.zeros(4, 2, N_PARAMS))
    images = decode(batch, torch.device("cpu"))
    assert [tuple(i.shape) for i in images] == [(3, 30, 40), (3, 30, 41), (3, 30, 42),
                                                (3, 10, 20)]
    pil = torch.from_numpy(np.array(Image.open(files[1]))).permute(2, 0, 1).int()
    assert (images[1].int() - pil).abs().float().mean() < 2  # libjpeg vs PIL: rounding
    # the device decoder refuses the batch and one image: PIL decodes that one instead
    import src.data.encoded as encoded
    real = encoded.decode_jpeg

    def picky(data, **kwargs):
        if isinstance(data, list) or data.numel() == items[1][0].numel():
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kwargs)
    monkeypatch.setattr(encoded, "decode_jpeg", picky)
    out = decode(EncodedBatch([items[0][0], items[1][0]], [True, True],
                              torch.zeros(2, 2, N_PARAMS)), torch.device("cpu"))
    assert torch.equal(out[0], images[0]) and torch.equal(out[1].int(), pil)
    garbage = torch.zeros_like(items[1][0])  # refused by the device decoder and by PIL
    params = torch.arange(2 * 2 * N_PARAMS, dtype=torch.float64).view(2, 2, N_PARAMS)
    out = decode(EncodedBatch([items[0][0], garbage], [True, True], params),
                 torch.device("cpu"))
    assert out[1] is None
    images, kept = replace_unreadable(out, params)
    # a copy of the batch's readable sample, with that sample's views
    assert images[1] is images[0] and torch.equal(kept[1], params[0])
    assert torch.equal(kept[0], params[0])
    with pytest.raises(UsageError, match="no image of a batch"):
        replace_unreadable([None, None], params)


def test_gpu_backend_views_have_the_pil_pipelines_count_sizes_and_determinism(demo_path):
    configs = pretraining(get_args([
        "--dataset", "demo", "--data_path", demo_path, "--size_dataset", "40",
        "--crops_nmb", "1", "1", "--crops_size", "32", "16", "--crops_min_scale", "0.2", "0.05",
        "--crops_max_scale", "1", "0.3", "--solarization_prob", "0.2", "0.2",
        "--data_backend", "gpu", "--batch_size", "8"]))
    pil_views = pretrain_dataset(configs.data, configs.views)[0]
    batches = {}
    for workers in (0, 2):
        data = PretrainingData(replace(configs.data, workers=workers), configs.views)
        make = data.to_device(torch.device("cpu"))
        assert isinstance(make, GpuViews)
        loader = data.loader(seed=3)
        loader.batch_sampler.set_epoch(1)
        batches[workers] = [make(batch.data) for batch in loader]
    views = batches[0][0]
    assert [tuple(v.shape[1:]) for v in views] == [tuple(v.shape) for v in pil_views]
    assert [v.shape[0] for v in views] == [8, 8, 8] and len(batches[0]) == 5
    for a, b in zip(batches[0], batches[2]):  # the worker count changes nothing
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # normalised like the PIL views: roughly zero-mean for these images, not [0, 1]
    assert views[0].min() < -1 and views[0].dtype == torch.float32


def undecodable_jpeg(path, size=(640, 480)):
    """A JPEG whose header reads (size, RGB, the end marker last) but whose pixels no
    decoder reads: its components name a quantisation table it does not define."""
    picture(size).save(path, quality=90)
    raw = bytearray(path.read_bytes())
    frame = raw.index(b"\xff\xc0")  # baseline frame header: 3 components from byte 10
    for component in range(raw[frame + 9]):
        raw[frame + 10 + 3 * component + 2] = 3
    path.write_bytes(bytes(raw))
    return path


def test_pretraining_with_the_gpu_backend_replaces_an_image_no_decoder_reads(tmp_path):
    """main.py --data_backend gpu on CPU tensors. The 640x480 file passes the worker's
    header check and fails both decoders; the batch's first image (64x48) takes its
    place with its own crop boxes, not boxes drawn for 640x480 (which F.interpolate
    refused: sizes of 0), and the epoch's fallbacks are counted in the log."""
    for i in range(16):
        folder = tmp_path / "data" / "train" / f"n0100000{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        if i == 5:
            undecodable_jpeg(folder / "bad.JPEG")
        else:
            picture((64, 48)).save(folder / f"{i}.JPEG", quality=90)
    main_script.main(["--dataset", "imagenet", "--data_path", str(tmp_path / "data"),
                      "--arch", "resnet18", "--mlp_dim", "64", "--emb", "32",
                      "--crops_size", "32", "--batch_size", "8", "--epochs", "1",
                      "--warmup_epochs", "0", "--workers", "0", "--eval_every", "0",
                      "--seed", "0", "--data_backend", "gpu",
                      "--dump_path", str(tmp_path / "run")])
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["args"]["data_backend"] == "gpu"
    log = (tmp_path / "run" / "out.log").read_text()
    assert "epoch 1/1 iter 2/2" in log
    assert "images no decoder could read (replaced by another): 1" in log  # the epoch's count


class Recorded(logging.Handler):
    """The messages of the repository's logger while a test runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def logged():
    handler = Recorded()
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def jpeg_batch(tmp_path, count=3):
    files = [save(picture((40 + i, 30)), tmp_path / f"{i}.jpg", quality=90) for i in range(count)]
    rows = torch.zeros(count, 2, N_PARAMS, dtype=torch.float64)
    rows[:, :, 2:4] = torch.tensor([20., 20.])  # a 20x20 crop box at the corner
    return EncodedBatch([read_encoded(f)[0] for f in files], [True] * count, rows)


def test_decode_fallbacks_are_logged_first_with_their_reason_then_counted_per_epoch(
        tmp_path, monkeypatch, logged):
    import src.data.encoded as encoded
    real = encoded.decode_jpeg

    def no_batches(data, **kwargs):  # e.g. a build whose nvJPEG cannot decode batches
        if isinstance(data, list):
            raise RuntimeError("nvjpeg: batched decode unsupported")
        return real(data, **kwargs)
    monkeypatch.setattr(encoded, "decode_jpeg", no_batches)
    views = GpuViews(pretraining(get_args(["--dataset", "demo"])).views, torch.device("cpu"))
    batch = jpeg_batch(tmp_path)
    for _ in range(2):
        views(batch)
    assert len(logged) == 1 and "nvjpeg: batched decode unsupported" in logged[0]
    views.log_fallbacks(epoch=1)
    assert "epoch 1" in logged[1] and "batches decoded image by image: 2" in logged[1]
    views.log_fallbacks(epoch=2)  # nothing fell back since: nothing to say
    assert len(logged) == 2


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory."),
                                   RuntimeError("CUDA error: out of memory")])
def test_out_of_memory_while_decoding_is_not_a_fallback(tmp_path, monkeypatch, error, logged):
    import src.data.encoded as encoded

    def out_of_memory(data, **kwargs):
        raise error
    monkeypatch.setattr(encoded, "decode_jpeg", out_of_memory)
    with pytest.raises(type(error), match="out of memory"):
        decode(jpeg_batch(tmp_path), torch.device("cpu"))
    assert not logged
