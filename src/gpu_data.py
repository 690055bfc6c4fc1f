"""The GPU data backend (`--data_backend gpu`): loader workers only read each image's
bytes and draw its view parameters; the training process decodes the whole batch on
its device (nvjpeg through torchvision) and makes the views there as batched tensor
operations (src/gpu_views.py), with the same laws as the PIL pipeline.

The parameters are drawn from torch's global generator inside `SeededSamples`, which
seeds it from (seed, epoch, index): the exact-resume rule holds for this backend too.
Files that are not plain JPEGs (PNG, CMYK JPEG, in-memory datasets) are decoded on the
CPU in the worker; unreadable or truncated files are `UnreadableImage`s, which the
loader replaces by other samples.
"""
import io
from collections import namedtuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from src.data import UnreadableImage, as_rgb, dataset_info, pretrain_images
from src.errors import UsageError
from src.gpu_views import draw_params, make_views, view_specs
from src.logger import get_logger

# data: the JPEG's bytes (uint8, 1-D) when `jpeg`, else the decoded uint8 (3, H, W)
EncodedImage = namedtuple("EncodedImage", "data jpeg params")
EncodedBatch = namedtuple("EncodedBatch", "data jpeg params")
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"


def rgb_tensor(img):
    """A PIL image as a uint8 (3, H, W) tensor."""
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def read_encoded(path):
    """(bytes or decoded tensor, is a plain JPEG, height, width) of an image file; the
    header is parsed on the CPU, the pixels are decoded here only if not a plain JPEG."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            plain = (img.format == "JPEG" and img.mode in ("RGB", "L")
                     and raw.startswith(JPEG_START) and raw.rstrip(b"\0").endswith(JPEG_END))
            data = (torch.frombuffer(bytearray(raw), dtype=torch.uint8) if plain
                    else rgb_tensor(as_rgb(img)))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"cannot read image {path} ({type(err).__name__}: {err})",
                              str(path)) from None
    return data, plain, height, width


class EncodedImages(torch.utils.data.Dataset):
    """Pretraining items for the GPU backend: EncodedImage(data, jpeg, params), the
    params (V, N_PARAMS) of the views drawn from torch's global generator."""

    def __init__(self, images, specs):
        self.images, self.specs = images, specs
        self.samples = getattr(images, "samples", None)  # an ImageFolder: read the files

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        if self.samples is not None:
            data, jpeg, height, width = read_encoded(self.samples[index][0])
        else:
            data, jpeg = rgb_tensor(self.images[index][0]), False
            height, width = data.shape[1:]
        return EncodedImage(data, jpeg, draw_params(None, height, width, self.specs))


def build_encoded_dataset(args):
    """The training set of `args` for `--data_backend gpu`."""
    return EncodedImages(pretrain_images(args), view_specs(args, dataset_info(args.dataset)))


def collate_encoded(items):
    """EncodedBatch of a list of EncodedImage: sizes differ, so the data stay a list."""
    return EncodedBatch([item.data for item in items], [item.jpeg for item in items],
                        torch.stack([item.params for item in items]))


def decode(batch, device):
    """The batch's images as uint8 (3, H, W) tensors on `device`, in order: the JPEGs
    decoded together on `device`; one that fails there is decoded by PIL on the CPU
    (if even that fails, it takes a copy of the batch's first image, with a warning)."""
    jpegs = [i for i, plain in enumerate(batch.jpeg) if plain]
    images = [None if plain else data.to(device, non_blocking=True)
              for data, plain in zip(batch.data, batch.jpeg)]
    try:
        decoded = decode_jpeg([batch.data[i] for i in jpegs], mode=ImageReadMode.RGB,
                              device=device) if jpegs else []
    except RuntimeError:
        decoded = [decode_one(batch.data[i], device) for i in jpegs]
    for i, image in zip(jpegs, decoded):
        images[i] = image
    if any(image is None for image in images):
        readable = [image for image in images if image is not None]
        if not readable:
            raise UsageError("no image of a batch could be decoded, on the GPU or by PIL")
        get_logger().warning("an image that no decoder could read was replaced by another")
        images = [readable[0] if image is None else image for image in images]
    return images


def decode_one(data, device):
    """One JPEG on `device`, else with PIL on the CPU; None if neither decodes it."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                return rgb_tensor(img).to(device)
        except (OSError, SyntaxError, ValueError):
            return None


class GpuViews:
    """EncodedBatch -> the V view batches on `device` (decode, then the views outside
    autocast, so the augmentation's arithmetic is fp32 whatever --precision says)."""

    def __init__(self, args, device, memory_format=torch.contiguous_format):
        info = dataset_info(args.dataset)
        self.specs, self.mean, self.std = view_specs(args, info), info.mean, info.std
        self.device, self.memory_format = device, memory_format

    def __call__(self, batch):
        images = decode(batch, self.device)
        with torch.autocast(self.device.type, enabled=False):
            views = make_views(images, batch.params, self.specs, self.mean, self.std)
        return [view.contiguous(memory_format=self.memory_format) for view in views]
