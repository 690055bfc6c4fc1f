"""The pretraining data of --data_backend, from files to the view batches on the
device: `pil` makes the views with PIL in the loader workers (the authors' pipeline);
`gpu` has the workers read the bytes and draw each sample's view parameters, and makes
the views on the device (src/data/encoded.py). Both draw from the same per-sample
seeds, so the choice is made here alone."""
import torch
from torch.utils.data import default_collate

from src.data.datasets import pretrain_dataset, pretrain_images
from src.data.encoded import EncodedImages, GpuViews, collate_encoded
from src.data.loader import check_batch_fits, train_loader


class PretrainingData:
    """The training set of config.Data `data` with the views of config.Views `views`."""

    def __init__(self, data, views):
        self.data, self.views = data, views
        self.on_device = data.data_backend == "gpu"
        self.dataset = (EncodedImages(pretrain_images(data), views.specs()) if self.on_device
                        else pretrain_dataset(data, views))
        check_batch_fits(len(self.dataset), data.batch_size)

    def summary(self):
        """A log line: how many images, and what the reader says of them (what it
        skipped, where they are)."""
        images = self.dataset.images if self.on_device else self.dataset.dataset
        note = getattr(images, "note", "")
        return f"{len(self.dataset)} training images" + (f" ({note})" if note else "")

    def loader(self, seed):
        """The training loader (src/data/loader.train_loader) of seed `seed`."""
        return train_loader(self.dataset, self.data.batch_size, self.data.workers, seed,
                            collate=collate_encoded if self.on_device else default_collate)

    def to_device(self, device, memory_format=torch.contiguous_format):
        """The function batch.data -> list of view batches on `device` (GpuViews or
        MovedViews; both log their decode fallbacks with `log_fallbacks(epoch)`)."""
        return (GpuViews if self.on_device else MovedViews)(self.views, device, memory_format)


class MovedViews:
    """The views made by PIL in the workers, moved to the device."""

    def __init__(self, _views, device, memory_format=torch.contiguous_format):
        self.device, self.memory_format = device, memory_format

    def __call__(self, data):
        return [x.to(self.device, non_blocking=True, memory_format=self.memory_format)
                for x in data]

    def log_fallbacks(self, epoch):
        """Nothing to log: PIL decodes in the workers, an unreadable file is replaced there."""
