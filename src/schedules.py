"""Per-iteration schedules as arrays, indexed by the global iteration (SPEC §4)."""
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


def lr_schedule(args, lr, iters_per_epoch):
    """Learning rate per iteration for the batch-scaled `lr`; `--final_lr` defaults to lr/10."""
    final = 0.1 * lr if args.final_lr is None else args.final_lr
    return cosine_schedule(lr, final, args.epochs, iters_per_epoch, args.warmup_epochs)


def momentum_schedule(args, iters_per_epoch):
    """EMA coefficient per iteration: half-cosine from args.momentum up to 1, no warm-up."""
    return cosine_schedule(args.momentum, 1.0, args.epochs, iters_per_epoch)
