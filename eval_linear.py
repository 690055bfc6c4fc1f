"""Linear probe (`--weights freeze`) and fine-tuning (`--weights finetune`) of a
pretrained encoder with a linear head (SPEC §5).

A frozen encoder stays in eval mode, so its weights and batch-norm statistics cannot
change; this is checked bit for bit at the end of the run. `--train_percent 1|10`
trains on the standard ImageNet subsets. Top-1/top-5 on val are measured every epoch;
`checkpoint.pth.tar` (resumed automatically) and `best.pth.tar` go to --dump_path.
"""
import functools
import os

import torch
import torch.nn.functional as F

import args
from src.data.datasets import eval_datasets
from src.data.loader import train_loader
from src.data.subsets import low_shot
from src.distributed import is_main_process, run_distributed, wrap_ddp
from src.errors import script_entry
from src.eval.features import Extraction
from src.eval.linear import (Classifier, probe_optimizer, resumed_reference, snapshot,
                             validate, verify_frozen)
from src.eval.pretrained import broadcast_from_rank0, load_pretrained_encoder
from src.logger import save_results
from src.models import build_encoder, input_format, speed_up
from src.train.loop import TrainLoop
from src.train.optim import AmpOptimizer
from src.train.preemption import StopSignals
from src.train.resume import ResumeRules
from src.train.session import Training
from src.train.startup import start_run

CHECKPOINT = "checkpoint.pth.tar"
BEST = "best.pth.tar"
RESULTS = "linear_results.json"
SCORES = ("best_acc", "best_acc5", "best_epoch", "last_acc", "last_acc5")


def probe_data(config, log):
    """(train, val) of the probe: augmented train images (the 1%/10% subset when
    asked), and val as the linear probe measures it."""
    data, probe = config.data, config.probe
    train, val = eval_datasets(data, probe.crops_size[0], probe.num_classes, "train_aug", "val")
    train = low_shot(train, probe.train_percent, probe.train_files)
    if probe.train_percent != 100:
        log.info(f"training on the {probe.train_percent}% subset: {len(train)} images")
    log.info(f"{len(train)} train and {len(val)} val images of {len(train.classes)} classes")
    return train, val


def classifier(config, device):
    """(the pretrained encoder with its linear head on `device`, a snapshot of the
    encoder if it is frozen, else None)."""
    probe = config.probe
    encoder, feature_dim = build_encoder(config.encoder)
    load_pretrained_encoder(encoder.to(device), probe.pretrained)
    frozen = probe.weights == "freeze"
    loaded = snapshot(encoder) if frozen else None
    model = Classifier(encoder, feature_dim, probe.num_classes, frozen).to(device)
    return speed_up(model, config.run.channels_last), loaded


def record(scores, top1, top5, epoch):
    """Add an epoch's validation to `scores` (best and last); whether it is the best."""
    is_best = "best_acc" not in scores or top1 > scores["best_acc"]
    if is_best:
        scores.update(best_acc=top1, best_acc5=top5, best_epoch=epoch)
    scores.update(last_acc=top1, last_acc5=top5)
    return is_best


def linear_eval(config, processes, signals=None):
    run, data, probe = config.run, config.data, config.probe
    total_batch = (data.batch_size * processes.world_size, processes.world_size)
    rules = ResumeRules(CHECKPOINT, "eval_linear", ("epoch", "optimizer", "scheduler"),
                        (data, config.encoder, probe, run), total_batch)
    started = start_run(run, processes, rules, data.workers)
    log, device = started.log, processes.device
    model, loaded = classifier(config, device)
    frozen = loaded is not None
    train, val = probe_data(config, log)
    memory_format = input_format(run.channels_last)
    optimizer, scheduler = probe_optimizer(model, probe, total_batch[0], run.fused)
    for group in optimizer.param_groups:
        log.info(f"{group['name']} lr {group['lr']:.6g} (batch-scaled), {probe.scheduler} "
                 f"schedule")
    amp = AmpOptimizer(optimizer, device, run.precision)
    trained = wrap_ddp(model, processes)
    torch.backends.cudnn.benchmark = True

    def forward(batch):
        images, target = batch
        logits = trained(images.to(device, non_blocking=True, memory_format=memory_format))
        return F.cross_entropy(logits, target.to(device, non_blocking=True))

    scores = {}

    def save(position, best=False):
        started.checkpoint_file.save(position, model, amp,
                                     {"scheduler": scheduler.state_dict(), **scores},
                                     copies=[os.path.join(run.dump_path, BEST)] if best else [])

    def restore(checkpoint):
        nonlocal loaded
        scheduler.load_state_dict(checkpoint["scheduler"])
        scores.update({k: checkpoint[k] for k in SCORES if k in checkpoint})
        if frozen:
            loaded = resumed_reference(model.encoder, loaded, probe.pretrained,
                                       checkpoint["source"])

    # every training image is used each epoch, as the authors do (SPEC §5)
    loader = train_loader(train, data.batch_size, data.workers, started.seed, drop_last=False)
    loop = TrainLoop(loader, forward, amp, config.loop, save,
                     lambda _: {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
                     signals)
    training = Training(started, loop, model, amp, run, restore)
    trained.train()
    for loss in training.epochs():
        scheduler.step()
        if not frozen:  # every shard is scored with rank 0's batch-norm statistics
            broadcast_from_rank0(model)
        top1, top5 = validate(model, val, Extraction(data.batch_size, data.workers), amp,
                              memory_format)
        is_best = record(scores, top1, top5, loop.epoch)
        training.writer.add(loop.step, "val/", top1=top1, top5=top5)
        training.writer.add(loop.step, "epoch/", loss=loss)
        save(loop.position(), best=is_best)
        log.info(f"epoch {loop.epoch}/{probe.epochs}: loss {loss:.4f}, val top-1 "
                 f"{top1:.2f} top-5 {top5:.2f} (best top-1 {scores['best_acc']:.2f})")
    return finish(model, loaded, scores, run, log)


def finish(model, loaded, scores, run, log):
    """Verify a frozen encoder, write the results, log the best and last scores."""
    if loaded is not None:
        verify_frozen(model.encoder, loaded, log)
    if is_main_process():
        save_results(run.dump_path, RESULTS, scores)
    if "best_acc" in scores:
        log.info(f"best top-1 {scores['best_acc']:.2f} top-5 {scores['best_acc5']:.2f} "
                 f"(epoch {scores['best_epoch']}); last top-1 {scores['last_acc']:.2f} "
                 f"top-5 {scores['last_acc5']:.2f}")
    return scores


@script_entry
def main(argv=None):
    with StopSignals() as signals:  # first thing: a stop while the data loads counts too
        config = args.probe(args.get_args(argv, "eval_linear"))
        run_distributed(functools.partial(linear_eval, signals=signals), config)


if __name__ == "__main__":
    main()
