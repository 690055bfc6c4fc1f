"""Per-iteration schedules as arrays, indexed by the global iteration (SPEC §4): the
learning rate and weight decay of the trainers and the EMA coefficient of the momentum
methods."""
import numpy as np


def scaled_lr(base, batch_size, world_size):
    """The linear scaling rule of every script: base lr x total batch / 256."""
    return base * batch_size * world_size / 256


def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """Linear warm-up from `warmup_start` to `base`, then a half-cosine from `base` to `final`.

    After warm-up: final + (base - final)/2 * (1 + cos(pi * i / I)), i = 0..I-1.
    """
    warmup_iters = warmup_epochs * iters_per_epoch
    warmup = np.linspace(warmup_start, base, warmup_iters)
    i = np.arange(epochs * iters_per_epoch - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / max(len(i), 1)))
    return np.concatenate((warmup, cosine))


def lr_schedule(optim, lr, iters_per_epoch):
    """Learning rate per iteration of config.Optim `optim` for the batch-scaled `lr`;
    --final_lr defaults to lr/10."""
    final = 0.1 * lr if optim.final_lr is None else optim.final_lr
    return cosine_schedule(lr, final, optim.epochs, iters_per_epoch, optim.warmup_epochs)


def wd_schedule(optim, iters_per_epoch):
    """Weight decay per iteration of config.Optim `optim`: a half-cosine from --wd to
    --weight_decay_end without warm-up (DINO's); constant, exactly --wd, when they agree."""
    return cosine_schedule(optim.wd, optim.weight_decay_end, optim.epochs, iters_per_epoch)
