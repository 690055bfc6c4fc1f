"""ReSA pretraining (SPEC §4): `python main.py ...` runs one process, `torchrun ...` many.

CPU runs in fp32 with gloo; CUDA runs with float16 autocast (fp32 on the CIFAR recipe),
NCCL and SyncBatchNorm. A run resumes from `dump_path/checkpoint.pth.tar` when it exists.
"""
import os
import sys

import torch

from args import get_args
from method import get_method
from src.checkpoint import plain_args, restore, save_atomic, with_module_prefix
from src.data import build_pretrain_dataset
from src.distributed import distribute, is_main_process, main_process_first, run_distributed
from src.engine import train_epoch
from src.errors import NonFiniteLoss, UsageError, exit_on_usage_error
from src.loader import train_loader
from src.logger import ScalarWriter
from src.models import pretraining_encoder
from src.monitor import OnlineMonitor
from src.optim import AmpOptimizer, build_optimizer
from src.runtime import start_run
from src.schedules import lr_schedule, momentum_schedule, scaled_lr

CHECKPOINT = "checkpoint.pth.tar"
ENCODER_EXPORT = "encoder.pth"


def resume(path, model, amp, log):
    """Restore a run from `path` if it exists; return the epoch to start from."""
    checkpoint = restore(path, model, amp, ("epoch",), "pretraining")
    if checkpoint is None:
        return 0
    log.info(f"resumed from {path} after epoch {checkpoint['epoch']}")
    return checkpoint["epoch"]


def pretrain(args):
    if args.warmup_epochs > args.epochs:
        raise UsageError(f"--warmup_epochs {args.warmup_epochs} exceeds --epochs {args.epochs}")
    # the data is checked before anything is written to --dump_path
    dataset = main_process_first(lambda: build_pretrain_dataset(args))
    loader = train_loader(dataset, args.batch_size, args.workers, seed=args.seed or 0)
    monitored = args.eval_every > 0 and args.dataset != "imagenet"
    monitor = OnlineMonitor(args) if monitored else None
    log = start_run(args)
    log.info(f"{len(dataset)} training images")

    model = get_method(args, *pretraining_encoder(args.arch, args.dataset)).to(args.device)
    model, trained = distribute(model, args, sync_batchnorm=True)
    torch.backends.cudnn.benchmark = True

    lr = scaled_lr(args.lr, args.batch_size, args.world_size)
    amp = AmpOptimizer(build_optimizer(model, lr, args), args.device, args.precision)
    iters = len(loader)
    lrs, momentums = lr_schedule(args, lr, iters), momentum_schedule(args, iters)
    checkpoint_path = os.path.join(args.dump_path, CHECKPOINT)
    start_epoch = resume(checkpoint_path, model, amp, log)
    writer = ScalarWriter(os.path.join(args.dump_path, "tb"), is_main_process())

    def before_step(iteration):
        lr_now, momentum_now = float(lrs[iteration]), float(momentums[iteration])
        for group in amp.optimizer.param_groups:
            group["lr"] = lr_now
        model.momentum = momentum_now
        return {"lr": lr_now, "ema_momentum": momentum_now}

    model.train()
    try:
        for epoch in range(start_epoch, args.epochs):
            loader.sampler.set_epoch(epoch)
            loss = train_epoch(loader, trained, amp, epoch=epoch, epochs=args.epochs,
                               before_step=before_step, writer=writer)
            if is_main_process():
                save_atomic({"epoch": epoch + 1,
                             "state_dict": with_module_prefix(model.state_dict()),
                             "optimizer": amp.optimizer.state_dict(),
                             "scaler": amp.scaler.state_dict(),
                             "args": plain_args(args)}, checkpoint_path)
            writer.add(epoch + 1, "epoch/", loss=loss)
            log.info(f"epoch {epoch + 1}/{args.epochs} done: mean loss {loss:.4f}, "
                     f"checkpoint {checkpoint_path}")
            if monitor and (epoch == 0 or (epoch + 1) % args.eval_every == 0
                            or epoch + 1 == args.epochs):
                scores = monitor.evaluate(model.momentum_encoder)  # on every rank
                writer.add(epoch + 1, "monitor/", **scores)
                log.info(f"monitor after epoch {epoch + 1}: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    except NonFiniteLoss as err:
        kept = (f"the last good checkpoint {checkpoint_path} is intact"
                if os.path.isfile(checkpoint_path) else "no checkpoint was written")
        log.error(f"stopping: {err}; {kept}")
        sys.exit(1)
    finally:
        writer.close()

    if is_main_process():
        export = os.path.join(args.dump_path, ENCODER_EXPORT)
        save_atomic(model.momentum_encoder.state_dict(), export)
        log.info(f"momentum encoder saved in torchvision layout (no fc) to {export}")


@exit_on_usage_error
def main(argv=None):
    run_distributed(pretrain, get_args(argv))


if __name__ == "__main__":
    main()
