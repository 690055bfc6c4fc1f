"""A small synthetic dataset the project makes itself, so that every script can run
end to end without downloading anything.

It is an ImageFolder of JPEG files (`root/{train,val}/<class>/*.jpg`), so the demo
goes through the same decode path as ImageNet. The class of an image is the HUE of its
foreground; everything a randomly initialised network responds to first (which of ten
shapes is drawn, its size, place and tilt, the dark ground, the noise) varies freely
within every class. A random encoder therefore groups images by shape and separates
the classes poorly (about 60% k-NN top-1), while ReSA learns what the two views of an
image share after crops, flips and shape changes of scale: their colour, up to the
strong view's jitter. (The previous demo had shape classes; a random encoder already
reached 86% on it, so it could not show what pretraining adds.)
"""
import colorsys
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from src.errors import UsageError

CLASSES = ('red', 'orange', 'yellow', 'chartreuse', 'green',
           'cyan', 'azure', 'violet', 'purple', 'rose')   # hue = label / 10 of the circle
SHAPES = ('circle', 'ring', 'square', 'triangle', 'cross',
          'hstripes', 'vstripes', 'dstripes', 'checker', 'dots')   # the nuisance
NUM_CLASSES = len(CLASSES)
HUE_SPREAD = 0.02       # hue varies by +-0.02 of the circle within a class (classes: 0.1 apart)
IMAGE_SIZE = 32
TRAIN_PER_CLASS = 200
VAL_PER_CLASS = 50
SEED = 0
MARKER = '.demo_v2_complete'
OLD_MARKERS = ('.demo_complete',)   # earlier versions of the demo, replaced when met
SUPERSAMPLE = 4        # shapes are drawn on a 4x finer grid, then averaged: anti-aliasing
JPEG_QUALITY = 95


def class_folder(label):
    """Folder name of a class, e.g. `00_red`: sorted order is label order."""
    return f'{label:02d}_{CLASSES[label]}'


def _mask(shape, rng, size):
    """Coverage in [0, 1] of one randomly placed, scaled and rotated shape (size x size)."""
    s = size * SUPERSAMPLE
    is_texture = shape >= 5
    half = rng.uniform(0.30, 0.46) if is_texture else rng.uniform(0.22, 0.36)
    room = max(0.47 - half, 0.0)                      # keep the shape mostly inside
    cx, cy = 0.5 + rng.uniform(-room, room), 0.5 + rng.uniform(-room, room)
    angle = np.deg2rad(rng.uniform(-15.0, 15.0))
    period = rng.uniform(0.09, 0.16)                  # texture period, fraction of image
    phase_u, phase_v = rng.uniform(0.0, period, size=2)

    # Pixel-centre coordinates in image units, rotated into the shape's frame.
    grid = (np.arange(s) + 0.5) / s
    x, y = grid[None, :] - cx, grid[:, None] - cy
    u = np.cos(angle) * x + np.sin(angle) * y
    v = -np.sin(angle) * x + np.cos(angle) * y
    inside = np.maximum(abs(u), abs(v)) <= half       # square region of textures
    r2 = u * u + v * v
    width = 0.3 * half                                # stroke width of outlines

    if shape == 0:      # filled circle
        m = r2 <= half ** 2
    elif shape == 1:    # ring
        m = (r2 <= half ** 2) & (r2 >= (half - width) ** 2)
    elif shape == 2:    # square outline
        m = inside & (np.maximum(abs(u), abs(v)) >= half - width)
    elif shape == 3:    # filled triangle: three half-planes at inradius half/2
        m = np.ones_like(inside)
        for a in np.deg2rad([90.0, 210.0, 330.0]):
            m &= u * np.cos(a) + v * np.sin(a) <= half / 2
    elif shape == 4:    # plus / cross
        t = 0.35 * half
        m = ((abs(u) <= t) & (abs(v) <= half)) | ((abs(v) <= t) & (abs(u) <= half))
    elif shape == 5:    # horizontal stripes
        m = inside & (np.floor((v + phase_v) / period * 2) % 2 == 0)
    elif shape == 6:    # vertical stripes
        m = inside & (np.floor((u + phase_u) / period * 2) % 2 == 0)
    elif shape == 7:    # diagonal stripes
        m = inside & (np.floor((u + v + phase_u) / period * 2 / np.sqrt(2)) % 2 == 0)
    elif shape == 8:    # checkerboard
        cells = np.floor((u + phase_u) / period) + np.floor((v + phase_v) / period)
        m = inside & (cells % 2 == 0)
    else:               # grid of dots
        du = (u + phase_u) % period - period / 2
        dv = (v + phase_v) % period - period / 2
        m = inside & (du * du + dv * dv <= (0.28 * period) ** 2)
    return m.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def make_image(label, rng, size=IMAGE_SIZE):
    """One RGB image of class `label`, drawn with `rng` (a numpy Generator): a random
    shape in the class's hue (random saturation and brightness) on a dark ground."""
    m = _mask(int(rng.integers(len(SHAPES))), rng, size)[..., None]
    hue = (label / NUM_CLASSES + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) % 1.0
    fg = 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)))
    bg = rng.uniform(0, 40, size=3)
    pixels = bg * (1 - m) + fg * m + rng.normal(0.0, 6.0, size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def generate_demo_dataset(root, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS,
                          seed=SEED):
    """Write the whole dataset under `root` (which must not hold one already)."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for label in range(NUM_CLASSES):
            folder = Path(root) / split / class_folder(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_image(label, rng).save(folder / f'{i:04d}.jpg', quality=JPEG_QUALITY)


def ensure_demo_dataset(root):
    """Make the demo dataset at `root` unless a complete one is already there.

    It is generated in a temporary folder next to `root` holding the marker file,
    then renamed into place in one step, so an interrupted run never leaves a partial
    dataset that looks complete, and concurrent processes cannot mix their files.
    """
    root = Path(root).expanduser()
    if (root / MARKER).is_file():
        return
    if any((root / old).is_file() for old in OLD_MARKERS):
        shutil.rmtree(root)     # an earlier version of this dataset, made here: replace it
    if root.exists():
        if not root.is_dir() or any(root.iterdir()):
            raise UsageError(f'--data_path {root} exists but holds no complete demo dataset '
                             f'(no {MARKER} file); give an empty or new folder for --dataset demo')
        root.rmdir()            # an empty folder: replaced by the generated one
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.tmp-', dir=root.parent))
    try:
        tmp.chmod(0o755)        # mkdtemp makes it private; the dataset is not
        generate_demo_dataset(tmp)
        (tmp / MARKER).write_text(f'{NUM_CLASSES} classes, {TRAIN_PER_CLASS} train + '
                                  f'{VAL_PER_CLASS} val per class, seed {SEED}\n')
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / MARKER).is_file():   # someone else finished first: fine
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_jpegs(root, count, size, seed=0, first=0):
    """`count` JPEGs of the demo's images (`size` pixels, numbered from `first`) in 10
    ImageNet-like class folders under `root`: data for benchmarks and checks."""
    rng = np.random.default_rng(seed)
    for i in range(first, first + count):
        path = Path(root) / f'n0100000{i % 10}' / f'{i}.JPEG'
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(i % 10, rng, size=size).save(path, quality=90)
