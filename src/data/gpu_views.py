"""ReSA's pretraining views (SPEC §1) as batched tensor operations.

`MultiCropTransform` (src/data/transforms.py) makes the views with PIL, one image at a time, on
CPU workers. This module splits the same law in two:

* `draw_params` (CPU, per image, cheap enough for a DataLoader worker) draws every
  random choice of every view from a `torch.Generator` into one float64 row per view;
  the default collate stacks them to (B, V, N_PARAMS).
* `make_views` (CPU or CUDA) turns a batch of uint8 images and those rows into the V
  normalized view batches. Only crop+resize loops over samples (the images differ in
  size); every later op is batched, with per-sample factors broadcast and per-sample
  choices applied with `torch.where`. Nothing in it reads device values on the host
  (no `.item()`, `.tolist()`, `.nonzero()` or data-dependent shapes on the images'
  device), so on a GPU it only queues kernels.

The law is torchvision's, op by op (RandomResizedCrop.get_params, ColorJitter with a
random op order, RandomGrayscale, the PIL GaussianBlur of src/data/transforms.py, RandomSolarize,
RandomHorizontalFlip). The pixels differ from PIL's only by rounding: PIL works in
uint8 at every step and approximates the Gaussian with box blurs; this module works in
float32 throughout.
"""
import math

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------ params layout
# One float64 row per view. Flags are 0.0 / 1.0; the crop box is in pixels of the
# original image; ORDER + k holds the jitter op run at position k (torchvision's
# fn_idx: 0 brightness, 1 contrast, 2 saturation, 3 hue). Weak views keep the
# neutral values of NEUTRAL_COLOUR in every column from JITTER on.
TOP, LEFT, HEIGHT, WIDTH = 0, 1, 2, 3
FLIP = 4
JITTER = 5                                      # colour jitter applied (p = 0.8)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 6, 7, 8, 9
ORDER = 10                                      # columns 10..13
GRAY = 14                                       # grayscale (p = 0.2)
BLUR = 15                                       # Gaussian blur (p = blur_prob)
SIGMA = 16                                      # blur sigma ~ U[0.1, 2.0]
SOLARIZE = 17                                   # solarize (p = solarize_prob)
N_PARAMS = 18
NEUTRAL_COLOUR = (0., 1., 1., 1., 0., 0., 1., 2., 3., 0., 0., 0., 0.)   # JITTER..SOLARIZE

RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10                                   # RandomResizedCrop's tries before fallback
JITTER_P, GRAY_P, FLIP_P = 0.8, 0.2, 0.5
BRIGHTNESS_RANGE, CONTRAST_RANGE = (0.6, 1.4), (0.6, 1.4)
SATURATION_RANGE, HUE_RANGE = (0.8, 1.2), (-0.1, 0.1)
SIGMA_RANGE = (0.1, 2.0)
BLUR_RADIUS = math.ceil(3 * SIGMA_RANGE[1])     # one kernel size for the whole batch
SOLARIZE_THRESHOLD = 128 / 255
LUMA = (0.299, 0.587, 0.114)                    # ITU-R 601-2, as PIL's convert('L')
MAX_DOWNSCALE = 16                              # per antialiased resize (see _resized_crops)

# Columns of the uniforms drawn per view (all draws of a view in one generator call).
_U_AREA, _U_ASPECT = slice(0, ATTEMPTS), slice(ATTEMPTS, 2 * ATTEMPTS)
_U_TOP, _U_LEFT, _U_FLIP, _U_JITTER = 20, 21, 22, 23
_U_FACTORS, _U_ORDER = slice(24, 28), slice(28, 32)
_U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLARIZE = 32, 33, 34, 35
_N_UNIFORMS = 36


# ------------------------------------------------------------------ drawing (CPU)

def _fallback_box(height, width):
    """RandomResizedCrop's central crop after ten failed tries (ratio clamped)."""
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _crop_boxes(u, height, width, specs):
    """(V, 4) top, left, h, w with the law of `RandomResizedCrop.get_params`: the
    first of ten i.i.d. tries that fits, else the central fallback. Drawing all ten
    tries at once does not change the law of the accepted one."""
    lo = torch.tensor([s.scale[0] for s in specs], dtype=torch.float64)[:, None]
    hi = torch.tensor([s.scale[1] for s in specs], dtype=torch.float64)[:, None]
    area = height * width * (lo + (hi - lo) * u[:, _U_AREA])
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _U_ASPECT])
    w = torch.round(torch.sqrt(area * aspect))          # round half to even, like round()
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first fitting try
    found = fits.any(1)
    f_top, f_left, f_h, f_w = (float(n) for n in _fallback_box(height, width))
    h = torch.where(found, h.gather(1, first)[:, 0], f_h)
    w = torch.where(found, w.gather(1, first)[:, 0], f_w)
    top = torch.where(found, torch.floor(u[:, _U_TOP] * (height - h + 1)), f_top)
    left = torch.where(found, torch.floor(u[:, _U_LEFT] * (width - w + 1)), f_left)
    return torch.stack([top, left, h, w], 1)


def draw_params(generator, height, width, specs):
    """All random choices of the views of one height x width image, as a float64
    (len(specs), N_PARAMS) tensor (layout: the constants at the top of this module).

    Every draw comes from `generator` (one `torch.rand` call), so a worker seeded
    with its own generator reproduces its views exactly. A uniform u gives each
    choice: P(u < p) = p for the coin flips, lo + (hi - lo) u for the factors,
    floor(u n) for randint(0, n), the argsort of four uniforms for the jitter order.
    """
    u = torch.rand(len(specs), _N_UNIFORMS, generator=generator, dtype=torch.float64)
    strong = torch.tensor([s.strong for s in specs])
    blur_p = torch.tensor([s.blur_prob for s in specs], dtype=torch.float64)
    solarize_p = torch.tensor([s.solarize_prob for s in specs], dtype=torch.float64)
    ranges = torch.tensor([BRIGHTNESS_RANGE, CONTRAST_RANGE, SATURATION_RANGE, HUE_RANGE],
                          dtype=torch.float64)
    factors = ranges[:, 0] + (ranges[:, 1] - ranges[:, 0]) * u[:, _U_FACTORS]
    params = torch.empty(len(specs), N_PARAMS, dtype=torch.float64)
    params[:, TOP:WIDTH + 1] = _crop_boxes(u, height, width, specs)
    params[:, FLIP] = (u[:, _U_FLIP] < FLIP_P).double()
    params[:, JITTER] = (u[:, _U_JITTER] < JITTER_P).double()
    params[:, BRIGHTNESS:HUE + 1] = factors
    params[:, ORDER:ORDER + 4] = u[:, _U_ORDER].argsort(1).double()
    params[:, GRAY] = (u[:, _U_GRAY] < GRAY_P).double()
    params[:, BLUR] = (u[:, _U_BLUR] < blur_p).double()
    params[:, SIGMA] = SIGMA_RANGE[0] + (SIGMA_RANGE[1] - SIGMA_RANGE[0]) * u[:, _U_SIGMA]
    params[:, SOLARIZE] = (u[:, _U_SOLARIZE] < solarize_p).double()
    params[~strong, JITTER:] = torch.tensor(NEUTRAL_COLOUR, dtype=torch.float64)
    return params


# ------------------------------------------------------------------ pixel ops (batched)

def _gray(x):
    """(B, 1, H, W) luma of (B, 3, H, W) RGB in [0, 1]."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _brightness(x, f):
    return (x * f).clamp(0, 1)


def _contrast(x, f):
    """Blend with the mean of the image's grayscale, as torchvision."""
    return (f * x + (1 - f) * _gray(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)


def _saturation(x, f):
    return (f * x + (1 - f) * _gray(x)).clamp(0, 1)


def _hue(x, f):
    """Shift the HSV hue by f (a fraction of the colour circle), as torchvision."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    delta = v - x.amin(1)
    s = delta / torch.where(v > 0, v, torch.ones_like(v))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (v - r) / d, (v - g) / d, (v - b) / d
    h = torch.where(v == r, bc - gc, torch.where(v == g, 2 + rc - bc, 4 + gc - rc))
    h = torch.remainder(h / 6 + f[:, 0], 1.0)
    # HSV -> RGB: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6 h) mod 6.
    n = torch.arange(5., 0., -2., device=x.device).view(1, 3, 1, 1)        # 5, 3, 1
    k = torch.remainder(n + 6 * h.unsqueeze(1), 6)
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return v.unsqueeze(1) * (1 - s.unsqueeze(1) * ramp)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)   # torchvision's fn_idx order


def _jitter(x, q):
    """ColorJitter where q[:, JITTER] is set: at each of the four positions, every
    sample takes the op its own order names there (a mask per op)."""
    factors = q[:, BRIGHTNESS:HUE + 1].view(-1, 4, 1, 1, 1)
    on = q[:, JITTER] > 0.5
    for k in range(4):
        op = torch.where(on, q[:, ORDER + k], torch.full_like(q[:, ORDER + k], -1))
        out = x
        for j, fn in enumerate(_JITTER_OPS):
            out = torch.where((op == j).view(-1, 1, 1, 1), fn(x, factors[:, j]), out)
        x = out
    return x


def _blur(x, sigma, on):
    """Per-sample separable Gaussian (radius 3 * max sigma) as two grouped
    convolutions, B * 3 groups; samples without blur get a delta kernel. Edges are
    replicated, as PIL's box blurs do (reflection would differ from PIL at borders)."""
    b, c, height, width = x.shape
    r = BLUR_RADIUS
    offsets = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    kernel = torch.where(on[:, None], kernel, (offsets == 0).to(x.dtype))
    kernel = kernel.repeat_interleave(c, 0)                      # (B * 3, 2r + 1)
    y = F.pad(x.reshape(1, b * c, height, width), (r, r, 0, 0), mode='replicate')
    y = F.conv2d(y, kernel.view(b * c, 1, 1, -1), groups=b * c)
    y = F.pad(y, (0, 0, r, r), mode='replicate')
    y = F.conv2d(y, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, height, width)


def _pre_shrink(h, w, size):
    """(kh, kw): the integer average pool that brings an h x w box within
    MAX_DOWNSCALE of `size` on each axis, (1, 1) when it is already."""
    return (max(1, math.ceil(h / (size * MAX_DOWNSCALE))),
            max(1, math.ceil(w / (size * MAX_DOWNSCALE))))


def _resized_crops(images, boxes, spec):
    """(B, 3, size, size) float in [0, 1]: each image's box resized with antialiasing
    like PIL (bilinear for the weak view, bicubic clamped to [0, 1] for strong ones).
    A box over MAX_DOWNSCALE times the view's size is average-pooled by an integer
    factor first (at most k - 1 of its last rows or columns left out): the pool's
    small box filter hardly changes the result, and CUDA's antialiased kernels refuse
    downscales beyond ~47x (bicubic) or ~94x (bilinear)."""
    mode = 'bicubic' if spec.strong else 'bilinear'
    out = []
    for img, (top, left, h, w) in zip(images, boxes):
        crop = img[None, :, top:top + h, left:left + w].float()
        kernel = _pre_shrink(h, w, spec.size)
        if kernel != (1, 1):
            crop = F.avg_pool2d(crop, kernel)
        out.append(F.interpolate(crop / 255, size=(spec.size, spec.size), mode=mode,
                                 align_corners=False, antialias=True))
    x = torch.cat(out)
    return x.clamp(0, 1) if spec.strong else x


def _flag(q, column):
    return (q[:, column] > 0.5).view(-1, 1, 1, 1)


def make_views(images, params, specs, mean, std):
    """The V normalized float32 view batches (B, 3, size_v, size_v) of a batch.

    images: B uint8 (3, H_b, W_b) tensors on one device; params: (B, V, N_PARAMS)
    float64 on CPU from `draw_params` (crop boxes are read on the host from there,
    and the rest is copied to the device once, without waiting). No host sync on
    the images' device.
    """
    if params.device.type != 'cpu':
        raise ValueError('params must stay on the CPU (crop boxes are read on the host)')
    device = images[0].device
    # Host-to-device copies are non-blocking: a blocking one would wait for the GPU.
    q_all = params.to(device=device, dtype=torch.float32, non_blocking=True)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(device, non_blocking=True)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(device, non_blocking=True)
    boxes = params[:, :, TOP:WIDTH + 1].long().tolist()         # CPU, (B, V, 4)
    views = []
    for v, spec in enumerate(specs):
        q = q_all[:, v]
        x = _resized_crops(images, [box[v] for box in boxes], spec)
        if spec.strong:
            x = _jitter(x, q)
            x = torch.where(_flag(q, GRAY), _gray(x).expand_as(x), x)
            x = _blur(x, q[:, SIGMA], q[:, BLUR] > 0.5)
            x = torch.where(_flag(q, SOLARIZE) & (x >= SOLARIZE_THRESHOLD), 1 - x, x)
        x = torch.where(_flag(q, FLIP), x.flip(-1), x)
        views.append((x - mean) / std)
    return views
