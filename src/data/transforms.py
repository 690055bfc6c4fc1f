"""Image transforms: the views of pretraining made with PIL in the loader workers
(SPEC §1), and the plain or augmented transforms of evaluation (SPEC §5-§7)."""
import torch
from PIL import ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from src.data.images import ToRGB, as_rgb

EVAL_KINDS = ('plain', 'val', 'train_aug', 'monitor')


class GaussianBlur:
    """PIL Gaussian blur with sigma ~ U[0.1, 2.0], applied with probability p.

    Written out because torchvision's version takes a kernel size, while the
    reference blurs with PIL's radius = sigma.
    """

    def __init__(self, p, sigma=(0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        if torch.rand(()).item() >= self.p:
            return img
        sigma = torch.empty(()).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self):
        return f'{type(self).__name__}(p={self.p}, sigma={self.sigma})'


def view_transform(spec, mean, std):
    """PIL image -> tensor of one view (a config.ViewSpec): the weak view is a
    bilinear RandomResizedCrop and a flip; a strong view adds colour jitter, grayscale,
    blur and solarize after a bicubic crop (SPEC §1)."""
    finish = [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    if not spec.strong:
        return T.Compose([T.RandomResizedCrop(spec.size, scale=spec.scale,
                                              interpolation=InterpolationMode.BILINEAR),
                          *finish])
    return T.Compose([
        T.RandomResizedCrop(spec.size, scale=spec.scale, interpolation=InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        GaussianBlur(p=spec.blur_prob),
        T.RandomSolarize(threshold=128, p=spec.solarize_prob),
        *finish])


class MultiCropTransform:
    """PIL image -> list of V view tensors, in the order of `views.specs()` (a
    config.Views): the weak view, then the strong views of every crop group."""

    def __init__(self, views):
        specs = views.specs()
        made = {spec: view_transform(spec, views.mean, views.std) for spec in set(specs)}
        self.views = [made[spec] for spec in specs]

    def __call__(self, img):
        img = as_rgb(img) if img.mode != 'RGB' else img
        return [view(img) for view in self.views]

    def __len__(self):
        return len(self.views)


def eval_transform(dataset, crop, kind, mean=None, std=None):
    """Image -> normalised tensor for evaluating on `dataset` (its DatasetSpec):
    'plain' (no randomness, bicubic resize: k-NN and feature extraction, SPEC §6), 'val'
    (plain with the bilinear resize of the linear probe's validation, SPEC §5),
    'train_aug' (linear probe training) or 'monitor' (plain, normalised as resa_cifar's
    monitor does, SPEC §7). `mean` and `std` (--mean/--std) replace the dataset's
    statistics; the monitor keeps its own unless they differ from the dataset's."""
    if kind not in EVAL_KINDS:
        raise ValueError(f'kind must be one of {", ".join(EVAL_KINDS)}, not {kind!r}')
    own = (dataset.mean, dataset.std)
    mean, std = tuple(mean or own[0]), tuple(std or own[1])
    if kind == 'monitor':
        kind = 'plain'
        if (mean, std) == own and dataset.monitor_norm:
            mean, std = dataset.monitor_norm
    if dataset.small_images:
        # Resize/CenterCrop leave an image that already has the crop size unchanged
        # (CIFAR 32 -> 32); they only act on other sizes (fashion_mnist 28 -> 32).
        ops = [T.Resize(crop, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(crop)]
        if kind == 'train_aug':
            ops += [T.RandomCrop(crop, padding=4), T.RandomHorizontalFlip()]
    elif kind in ('plain', 'val'):
        resample = InterpolationMode.BICUBIC if kind == 'plain' else InterpolationMode.BILINEAR
        ops = [T.Resize(round(crop * 256 / 224), interpolation=resample), T.CenterCrop(crop)]
    else:
        ops = [T.RandomResizedCrop(crop), T.RandomHorizontalFlip()]
    return T.Compose([ToRGB(), *ops, T.ToTensor(), T.Normalize(mean, std)])
