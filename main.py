"""Self-supervised pretraining (SPEC §4), ReSA by default (--method): `python main.py
...` runs one process, `torchrun ... main.py ...` many.

CPU runs in fp32 with gloo; CUDA runs with float16 autocast (fp32 on the CIFAR recipe),
NCCL and SyncBatchNorm. A run resumes from `dump_path/checkpoint.pth.tar` when it exists,
exactly where it stopped (inside an epoch too); SIGTERM, SIGINT and SIGUSR1 stop it with
a checkpoint (exit code 75; the other codes: src/errors.py).
"""
import functools
import os

import torch

import args
from method import build_model
from src.checkpoint import save_atomic
from src.data.datasets import dataset_spec
from src.data.pipeline import PretrainingData
from src.distributed import (is_main_process, main_process_first, run_distributed,
                             sync_batchnorm, wrap_ddp)
from src.errors import UsageError, script_entry
from src.eval.monitor import OnlineMonitor
from src.models import RESNETS, input_format, speed_up
from src.train.loop import TrainLoop
from src.train.optim import AmpOptimizer, build_optimizer, set_weight_decay
from src.train.preemption import StopSignals
from src.train.resume import ResumeRules
from src.schedules import lr_schedule, scaled_lr, wd_schedule
from src.train.session import Training
from src.train.startup import start_run

CHECKPOINT = "checkpoint.pth.tar"
ENCODER_EXPORT = "encoder.pth"


def trainable_model(config, processes):
    """(the method, the module that trains: itself or its DDP wrapper), on the device."""
    method = build_model(config.method, config.heads, config.encoder).to(processes.device)
    method = speed_up(sync_batchnorm(method, processes), config.run.channels_last,
                      config.run.compile)
    return method, wrap_ddp(method, processes)


def start(config, processes):
    """(the training images, the monitor or None, train.startup.Started): the data is
    checked before anything is written to --dump_path, then the run starts (or resumes)."""
    optim, data = config.optim, config.data
    if optim.warmup_epochs > optim.epochs:
        raise UsageError(f"--warmup_epochs {optim.warmup_epochs} exceeds --epochs {optim.epochs}")
    monitor = (OnlineMonitor(data, config.monitor, config.views.crops_size[0], processes.device)
               if config.monitor.eval_every > 0 and dataset_spec(data.dataset).monitored else None)
    images = main_process_first(lambda: PretrainingData(data, config.views))
    summary = images.summary()
    total_batch = (data.batch_size * processes.world_size, processes.world_size)
    rules = ResumeRules(CHECKPOINT, "main", ("epoch",),
                        (data, config.views, config.encoder, config.heads, config.method,
                         optim, config.run), total_batch)
    started = start_run(config.run, processes, rules, data.workers)
    started.log.info(summary)
    return images, monitor, started


def optimizer(config, method, processes, iters_per_epoch):
    """(the AmpOptimizer, the `before_step` that sets this step's lr, weight decay and
    the method's own schedules and returns them to log)."""
    optim, run = config.optim, config.run
    lr = scaled_lr(optim.lr, config.data.batch_size, processes.world_size)
    amp = AmpOptimizer(build_optimizer(method, optim, lr, run.fused), processes.device,
                       run.precision, optim.clip_grad)
    lrs, wds = lr_schedule(optim, lr, iters_per_epoch), wd_schedule(optim, iters_per_epoch)
    method.prepare(optim.epochs, iters_per_epoch)

    def before_step(iteration):
        lr_now, wd_now = float(lrs[iteration]), float(wds[iteration])
        for group in amp.optimizer.param_groups:
            group["lr"] = lr_now
        set_weight_decay(amp.optimizer, wd_now)
        return {"lr": lr_now, "wd": wd_now, **method.before_step(iteration)}

    return amp, before_step


def pretrain(config, processes, signals=None):
    images, monitor, started = start(config, processes)
    run, log = config.run, started.log
    loader = images.loader(started.seed)
    method, trained = trainable_model(config, processes)
    torch.backends.cudnn.benchmark = True
    log.info(f"networks: {config.method.method}, {config.encoder.arch}, batch norm "
             f"synchronised across processes "
             f"{any(isinstance(m, torch.nn.SyncBatchNorm) for m in method.modules())}, "
             f"channels_last {run.channels_last}, fused optimizer {run.fused}, "
             f"compile {run.compile}")
    amp, before_step = optimizer(config, method, processes, len(loader))
    views = images.to_device(processes.device, input_format(run.channels_last))
    extra = {"evaluated_encoder": method.evaluated_prefix()}
    loop = TrainLoop(loader, lambda batch: trained(views(batch)), amp, config.loop,
                     lambda position: started.checkpoint_file.save(position, method, amp, extra),
                     before_step, signals)
    training = Training(started, loop, method, amp, run)

    def measure(epoch):
        scores = monitor.evaluate(method.evaluated_encoder(), method.evaluated_projector(),
                                  started.seed, check_stop=loop.stop_if_requested)
        training.writer.add(loop.step, "monitor/", **scores)
        log.info(f"monitor after epoch {epoch}: "
                 + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    def epoch_end(loss):
        losses = {} if loss is None else {"loss": loss}  # None: a checkpoint without it
        training.writer.add(loop.step, "epoch/", **losses, train_minutes=loop.seconds / 60)
        if monitor and config.monitor.due(loop.epoch, config.optim.epochs):
            measure(loop.epoch)  # on every rank

    method.train()
    if monitor and config.monitor.eval_at_start and loop.step == 0:
        measure(0)
    if loop.iteration == 0 and loop.epoch > 0:  # resumed where an epoch ended:
        epoch_end(loop.epoch_loss)  # its scalars again (the restart purged them from
        # TensorBoard), and its monitor point, which a stop may have cut short
    for loss in training.epochs():
        loop.save()
        log.info(f"epoch {loop.epoch}/{config.optim.epochs} done: mean loss {loss:.4f}, "
                 f"checkpoint {started.checkpoint_file.path}")
        views.log_fallbacks(loop.epoch)
        epoch_end(loss)
    if is_main_process():
        export = os.path.join(run.dump_path, ENCODER_EXPORT)
        save_atomic(method.evaluated_encoder().state_dict(), export)
        layout = ("torchvision layout (no fc)" if config.encoder.arch in RESNETS
                  else "timm layout (timm.create_model(arch, num_classes=0))")
        log.info(f"the evaluated encoder ({method.evaluated_prefix()}*) saved in {layout} "
                 f"to {export}")


@script_entry
def main(argv=None):
    with StopSignals() as signals:  # first thing: a stop while the data loads counts too
        config = args.pretraining(args.get_args(argv))
        run_distributed(functools.partial(pretrain, signals=signals), config)


if __name__ == "__main__":
    main()
