"""ReSA pretraining (SPEC §4): `python main.py ...` runs one process, `torchrun ...` many.

CPU runs in fp32 with gloo; CUDA runs with float16 autocast (fp32 on the CIFAR recipe),
NCCL and SyncBatchNorm. A run resumes from `dump_path/checkpoint.pth.tar` when it exists,
exactly where it stopped (inside an epoch too); SIGTERM, SIGINT and SIGUSR1 stop it with
a checkpoint (exit code 75; the other codes: src/errors.py).
"""
import functools
import os
import sys

import torch
from torch.utils.data import default_collate

from args import get_args
from method import get_method
from src.checkpoint import save_atomic
from src.data import build_pretrain_dataset
from src.distributed import (is_main_process, main_process_first, run_distributed,
                             sync_batchnorm, wrap_ddp)
from src.errors import NonFiniteLoss, UsageError, script_entry
from src.gpu_data import GpuViews, build_encoded_dataset, collate_encoded
from src.loader import check_batch_fits, train_loader
from src.logger import ScalarWriter
from src.models import input_format, pretraining_encoder, speed_up
from src.monitor import OnlineMonitor
from src.optim import AmpOptimizer, build_optimizer
from src.preemption import StopSignals
from src.runtime import start_run
from src.schedules import lr_schedule, momentum_schedule, scaled_lr
from src.train_loop import TrainLoop

CHECKPOINT = "checkpoint.pth.tar"
ENCODER_EXPORT = "encoder.pth"


def pretrain(args, signals=None):
    if args.warmup_epochs > args.epochs:
        raise UsageError(f"--warmup_epochs {args.warmup_epochs} exceeds --epochs {args.epochs}")
    # the data is checked before anything is written to --dump_path
    gpu_backend = args.data_backend == "gpu"
    build = build_encoded_dataset if gpu_backend else build_pretrain_dataset
    dataset = main_process_first(lambda: build(args))
    check_batch_fits(len(dataset), args.batch_size)
    monitored = args.eval_every > 0 and args.dataset != "imagenet"
    monitor = OnlineMonitor(args) if monitored else None
    log, run, checkpoint = start_run(args, CHECKPOINT, required=("epoch",))
    log.info(f"{len(dataset)} training images")

    loader = train_loader(dataset, args.batch_size, args.workers, args.seed,
                          collate=collate_encoded if gpu_backend else default_collate)
    model = get_method(args, *pretraining_encoder(args.arch, args.dataset, args.stem))
    model.to(args.device)
    model = speed_up(sync_batchnorm(model, args), args.channels_last, args.compile)
    trained = wrap_ddp(model, args)
    torch.backends.cudnn.benchmark = True
    memory_format = input_format(args.channels_last)
    log.info(f"networks: {args.arch}, batch norm synchronised across processes "
             f"{any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())}, "
             f"channels_last {args.channels_last}, fused optimizer {args.fused}, "
             f"compile {args.compile}")
    lr = scaled_lr(args.lr, args.batch_size, args.world_size)
    amp = AmpOptimizer(build_optimizer(model, lr, args), args.device, args.precision)
    lrs, momentums = lr_schedule(args, lr, len(loader)), momentum_schedule(args, len(loader))

    def before_step(iteration):
        lr_now, momentum_now = float(lrs[iteration]), float(momentums[iteration])
        for group in amp.optimizer.param_groups:
            group["lr"] = lr_now
        model.momentum = momentum_now
        return {"lr": lr_now, "ema_momentum": momentum_now}

    gpu_views = GpuViews(args, args.device, memory_format) if gpu_backend else None

    def forward(data):
        if gpu_views:  # decode and augment on the device
            return trained(gpu_views(data))
        return trained([x.to(args.device, non_blocking=True, memory_format=memory_format)
                        for x in data])

    loop = TrainLoop(loader, forward, amp, epochs=args.epochs, device=args.device,
                     save=lambda position: run.save(position, model, amp, {}),
                     before_step=before_step, checkpoint_minutes=args.checkpoint_minutes,
                     checkpoint_iters=args.checkpoint_iters, log_every=args.log_every,
                     signals=signals)
    if checkpoint:
        run.restore(checkpoint, model, amp)
        loop.load_position(checkpoint)
        log.info(f"resumed from {checkpoint['source']} at epoch {loop.epoch + 1}, "
                 f"iteration {loop.iteration}")
    loop.writer = writer = ScalarWriter(os.path.join(args.dump_path, "tb"),
                                        is_main_process(), purge_step=loop.step, args=args)
    model.train()
    try:
        with loop:
            while loop.epoch < args.epochs:
                loss = loop.run_epoch()
                loop.save()
                writer.add(loop.step, "epoch/", loss=loss, train_minutes=loop.seconds / 60)
                log.info(f"epoch {loop.epoch}/{args.epochs} done: mean loss {loss:.4f}, "
                         f"checkpoint {run.path}")
                if gpu_views:
                    gpu_views.log_fallbacks(loop.epoch)
                epoch = loop.epoch
                if monitor and (epoch == 1 or epoch % args.eval_every == 0
                                or epoch == args.epochs):
                    scores = monitor.evaluate(model.momentum_encoder,  # on every rank
                                              model.momentum_projector,
                                              check_stop=loop.stop_if_requested)
                    writer.add(loop.step, "monitor/", **scores)
                    log.info(f"monitor after epoch {epoch}: "
                             + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
                loop.stop_if_requested()
    except NonFiniteLoss as err:
        kept = (f"the last good checkpoint {run.path} is intact"
                if os.path.isfile(run.path) else "no checkpoint was written")
        log.error(f"stopping: {err}; {kept}")
        sys.exit(1)
    finally:
        writer.close()

    if is_main_process():
        export = os.path.join(args.dump_path, ENCODER_EXPORT)
        save_atomic(model.momentum_encoder.state_dict(), export)
        log.info(f"momentum encoder saved in torchvision layout (no fc) to {export}")


@script_entry
def main(argv=None):
    with StopSignals() as signals:  # first thing: a stop while the data loads counts too
        run_distributed(functools.partial(pretrain, signals=signals), get_args(argv))


if __name__ == "__main__":
    main()
