"""The GPU data backend (`--data_backend gpu`): loader workers only read each image's
bytes and draw its view parameters; the training process decodes the whole batch on
its device (nvjpeg through torchvision) and makes the views there as batched tensor
operations (src/data/gpu_views.py), with the same laws as the PIL pipeline.

The parameters are drawn from torch's global generator inside `SeededSamples`, which
seeds it from (seed, epoch, index): the exact-resume rule holds for this backend too.
Files the device decoder may refuse (other formats, grayscale, CMYK and progressive
JPEGs, in-memory datasets) are decoded on the CPU in the worker; unreadable or
truncated files are `UnreadableImage`s, which the loader replaces by other samples.
What still fails on the device is decoded otherwise and counted (`DecodeFallbacks`).
"""
import io
from collections import Counter, namedtuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from src.data.gpu_views import draw_params, make_views
from src.data.images import READ_ERRORS, as_rgb, unreadable
from src.errors import UsageError
from src.logger import get_logger

# data: the JPEG's bytes (uint8, 1-D) when `jpeg`, else the decoded uint8 (3, H, W)
EncodedImage = namedtuple("EncodedImage", "data jpeg params")
EncodedBatch = namedtuple("EncodedBatch", "data jpeg params")
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"


def rgb_tensor(img):
    """A PIL image as a uint8 (3, H, W) tensor."""
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def device_decodable(img, raw):
    """Whether the device decoder takes the file `raw` opened as `img`: a complete
    baseline JPEG in colour. The rest is decoded in the worker, up front, rather than
    failing on the GPU and being decoded again in the training process."""
    return (img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
            and raw.startswith(JPEG_START) and raw.rstrip(b"\0").endswith(JPEG_END))


def read_encoded(path):
    """`encode` of the image file at `path`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise unreadable(path, err) from None
    return encode(raw, path)


def encode(raw, name):
    """(bytes or decoded tensor, is a plain JPEG, height, width) of the image file
    contents `raw`; the header is parsed on the CPU, the pixels are decoded here only
    if not a plain JPEG."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            plain = device_decodable(img, raw)
            data = (torch.frombuffer(bytearray(raw), dtype=torch.uint8) if plain
                    else rgb_tensor(as_rgb(img)))
    except READ_ERRORS as err:
        raise unreadable(name, err) from None
    return data, plain, height, width


class EncodedImages(torch.utils.data.Dataset):
    """Pretraining items for the GPU backend: EncodedImage(data, jpeg, params) of the
    (image, label) items `images`, the params (V, N_PARAMS) of the views of `specs`
    (config.ViewSpec) drawn from torch's global generator."""

    def __init__(self, images, specs):
        self.images, self.specs = images, specs
        self.samples = getattr(images, "samples", None)  # an ImageFolder: read the files
        self.read_bytes = getattr(images, "read_bytes", None)  # tar shards: read the member

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        if self.read_bytes is not None:
            data, jpeg, height, width = encode(self.read_bytes(index), self.samples[index][0])
        elif self.samples is not None:
            data, jpeg, height, width = read_encoded(self.samples[index][0])
        else:
            data, jpeg = rgb_tensor(self.images[index][0]), False
            height, width = data.shape[1:]
        return EncodedImage(data, jpeg, draw_params(None, height, width, self.specs))


def collate_encoded(items):
    """EncodedBatch of a list of EncodedImage: sizes differ, so the data stay a list."""
    return EncodedBatch([item.data for item in items], [item.jpeg for item in items],
                        torch.stack([item.params for item in items]))


BATCH_BY_IMAGE = "batches decoded image by image"
BY_PIL = "images decoded by PIL in the training process"
LOST = "images no decoder could read (replaced by another)"


class DecodeFallbacks:
    """The times decoding left the batched path on the device, counted per epoch. The
    first is logged with its reason (no nvJPEG, a file it refuses...): a run that falls
    back all the time is slow, and should say why."""

    def __init__(self):
        self.counts, self.logged = Counter(), False

    def record(self, what, err):
        self.counts[what] += 1
        if not self.logged:
            self.logged = True
            reason = (str(err).strip().splitlines() or [""])[0]
            get_logger().warning(f"GPU decoding fell back for the first time, {what}: "
                                 f"{type(err).__name__}: {reason}; fallbacks are counted "
                                 f"per epoch")

    def log_epoch(self, epoch):
        if self.counts:
            get_logger().warning(f"epoch {epoch}: GPU decoding fell back: " + ", ".join(
                f"{what}: {count}" for what, count in self.counts.items()))
        self.counts.clear()


def out_of_memory(err):
    """Out of memory is the run's problem, not the image's: never a reason to fall back."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)


def decode(batch, device, fallbacks=None):
    """The batch's images as uint8 (3, H, W) tensors on `device`, in order: the JPEGs
    decoded together on `device`; if that fails, one by one, and one that fails there
    is decoded by PIL on the CPU; None where even that fails (see `replace_unreadable`).
    Each fallback is recorded in `fallbacks`; out of memory is raised."""
    fallbacks = fallbacks or DecodeFallbacks()
    jpegs = [i for i, plain in enumerate(batch.jpeg) if plain]
    images = [None if plain else data.to(device, non_blocking=True)
              for data, plain in zip(batch.data, batch.jpeg)]
    try:
        decoded = decode_jpeg([batch.data[i] for i in jpegs], mode=ImageReadMode.RGB,
                              device=device) if jpegs else []
    except RuntimeError as err:
        if out_of_memory(err):
            raise
        fallbacks.record(BATCH_BY_IMAGE, err)
        decoded = [decode_one(batch.data[i], device, fallbacks) for i in jpegs]
    for i, image in zip(jpegs, decoded):
        images[i] = image
    return images


def decode_one(data, device, fallbacks):
    """One JPEG on `device`, else with PIL on the CPU; None if neither decodes it."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        if out_of_memory(err):
            raise
        refused = err
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            image = rgb_tensor(img).to(device)
    except (OSError, SyntaxError, ValueError) as err:
        fallbacks.record(LOST, err)
        return None
    fallbacks.record(BY_PIL, refused)
    return image


def replace_unreadable(images, params):
    """(images, params) where each image that no decoder could read (None) becomes a
    copy of the batch's first readable sample, its view parameters included: the lost
    image's crop boxes were drawn for its own size, not for the substitute's."""
    readable = [i for i, image in enumerate(images) if image is not None]
    if not readable:
        raise UsageError("no image of a batch could be decoded, on the GPU or by PIL")
    if len(readable) == len(images):
        return images, params
    rows = [i if image is not None else readable[0] for i, image in enumerate(images)]
    return [images[i] for i in rows], params[rows]


class GpuViews:
    """EncodedBatch -> the V view batches of config.Views `views` on `device` (decode,
    then the views outside autocast, so the augmentation's arithmetic is fp32 whatever
    --precision says)."""

    def __init__(self, views, device, memory_format=torch.contiguous_format):
        self.specs, self.mean, self.std = views.specs(), views.mean, views.std
        self.device, self.memory_format = device, memory_format
        self.fallbacks = DecodeFallbacks()

    def log_fallbacks(self, epoch):
        """Log how often decoding fell back in the epoch that ended (if it did)."""
        self.fallbacks.log_epoch(epoch)

    def __call__(self, batch):
        images, params = replace_unreadable(decode(batch, self.device, self.fallbacks),
                                            batch.params)
        with torch.autocast(self.device.type, enabled=False):
            views = make_views(images, params, self.specs, self.mean, self.std)
        return [view.contiguous(memory_format=self.memory_format) for view in views]
