"""Linear probe (`--weights freeze`) and fine-tuning (`--weights finetune`) of a
pretrained encoder with a linear head (SPEC §5).

A frozen encoder stays in eval mode, so its weights and batch-norm statistics cannot
change; this is checked bit for bit at the end of the run. `--train_percent 1|10`
trains on the standard ImageNet subsets. Top-1/top-5 on val are measured every epoch;
`checkpoint.pth.tar` (resumed automatically) and `best.pth.tar` go to --dump_path.
"""
import functools
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR

from args import get_args
from src.distributed import (all_reduce_sum, is_main_process, main_process_first,
                             run_distributed, wrap_ddp)
from src.engine import progress
from src.errors import UsageError, script_entry
from src.eval_data import eval_datasets
from src.loader import eval_loader, train_loader
from src.logger import ScalarWriter, save_results
from src.metrics import percent, topk_correct
from src.models import build_encoder, input_format, speed_up
from src.optim import AmpOptimizer
from src.preemption import StopSignals
from src.pretrained import broadcast_from_rank0, load_pretrained_encoder
from src.runtime import start_run
from src.schedules import scaled_lr
from src.subsets import select_subset, subset_names
from src.train_loop import TrainLoop

CHECKPOINT = "checkpoint.pth.tar"
BEST = "best.pth.tar"
RESULTS = "linear_results.json"
SCORES = ("best_acc", "best_acc5", "best_epoch", "last_acc", "last_acc5")
STEP_MILESTONES = (60, 80)  # --scheduler step: x0.1 at these epochs


class Classifier(nn.Module):
    """Encoder + linear head; keys `encoder.*` and `fc.*` as in the authors' files."""

    def __init__(self, encoder, feature_dim, num_classes, frozen):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(feature_dim, num_classes)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.frozen = frozen
        if frozen:
            self.encoder.requires_grad_(False)

    def forward(self, images):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = self.encoder(images)
        return self.fc(features)

    def train(self, mode=True):
        """A frozen encoder stays in eval mode: batch-norm statistics never move."""
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self


def build_optimizer(model, args):
    """SGD, momentum 0.9, no weight decay; base lrs scaled by the total batch / 256."""
    def lr(base):
        return scaled_lr(base, args.batch_size, args.world_size)

    groups = [{"params": list(model.fc.parameters()), "lr": lr(args.lr_classifier),
               "name": "classifier"}]
    if not model.frozen:
        groups.append({"params": list(model.encoder.parameters()),
                       "lr": lr(args.lr_encoder), "name": "encoder"})
    optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, weight_decay=0,
                                fused=args.fused or None)
    if args.scheduler == "step":
        scheduler = MultiStepLR(optimizer, milestones=list(STEP_MILESTONES), gamma=0.1)
    else:
        scheduler = CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=0)
    return optimizer, scheduler


def train_dataset(args, train, log):
    """The training set, restricted to the 1%/10% subset when asked."""
    if args.train_percent != 100:
        if not hasattr(train, "samples"):
            raise UsageError(f"--train_percent {args.train_percent} needs an ImageFolder "
                             f"training set (--dataset imagenet)")
        names = main_process_first(lambda: subset_names(args.train_percent, args.train_files))
        select_subset(train, names)
        log.info(f"training on the {args.train_percent}% subset: {len(train)} images")
    return train


@torch.no_grad()
def validate(model, dataset, args, amp):
    """(top-1, top-5) in percent on `dataset`; each process scores its own shard.

    Runs the unwrapped model: shards may differ in length, and a DDP forward would
    wait for the other processes.
    """
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=args.device)
    with eval_loader(dataset, args.batch_size, args.workers) as loader:
        for _, images, target in progress(loader, len(loader), "val"):
            with amp.autocast():
                logits = model(images.to(args.device, non_blocking=True,
                                         memory_format=input_format(args.channels_last)))
            target = target.to(args.device, non_blocking=True)
            counts[:2] += topk_correct(logits.float(), target, (1, 5))
            counts[2] += target.shape[0]
    all_reduce_sum(counts)
    return percent(counts[0], counts[2]), percent(counts[1], counts[2])


def snapshot(module):
    """A CPU copy of every tensor of `module.state_dict()`, buffers included."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def changed_tensors(module, reference):
    """Names of the state-dict entries of `module` that are not bit-identical to `reference`."""
    return [k for k, v in module.state_dict().items() if not torch.equal(v.cpu(), reference[k])]


def resumed_reference(encoder, loaded, args, path):
    """What a resumed frozen encoder must equal: the --pretrained weights (a checkpoint
    holding others belongs to another run), or, for a random encoder, the one resumed."""
    if not changed_tensors(encoder, loaded):
        return loaded
    if args.pretrained:
        raise UsageError(f"{path} holds another encoder than --pretrained {args.pretrained}; "
                         f"use another --dump_path")
    return snapshot(encoder)


def verify_frozen(encoder, reference, log):
    """Exit with an error unless every tensor of the frozen encoder is bit-identical to
    the loaded one (eval mode keeps even the batch-norm statistics fixed)."""
    changed = changed_tensors(encoder, reference)
    if changed:
        message = (f"the frozen encoder changed during the linear probe: {len(changed)} "
                   f"tensors differ from the loaded weights, e.g. {', '.join(changed[:3])}")
        log.error(message)
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {message}")
    log.info(f"frozen encoder verified: all {len(reference)} tensors bit-identical to the "
             f"loaded weights")


def linear_eval(args, signals=None):
    log, run, checkpoint = start_run(args, CHECKPOINT, required=("epoch", "optimizer",
                                                                 "scheduler"))
    encoder, feature_dim = build_encoder(args.arch, args.stem == "cifar")
    load_pretrained_encoder(encoder.to(args.device), args.pretrained)
    train, val = eval_datasets(args, "train_aug", val_kind="val")
    train = train_dataset(args, train, log)
    log.info(f"{len(train)} train and {len(val)} val images of {len(train.classes)} classes")

    frozen = args.weights == "freeze"
    loaded = snapshot(encoder) if frozen else None
    model = Classifier(encoder, feature_dim, args.num_classes, frozen).to(args.device)
    speed_up(model, args.channels_last)
    memory_format = input_format(args.channels_last)
    optimizer, scheduler = build_optimizer(model, args)
    for group in optimizer.param_groups:
        log.info(f"{group['name']} lr {group['lr']:.6g} (batch-scaled), {args.scheduler} "
                 f"schedule")
    amp = AmpOptimizer(optimizer, args.device, args.precision)
    trained = wrap_ddp(model, args)
    torch.backends.cudnn.benchmark = True
    # every training image is used each epoch, as the authors do (SPEC §5)
    loader = train_loader(train, args.batch_size, args.workers, args.seed, drop_last=False)

    def forward(batch):
        images, target = batch
        logits = trained(images.to(args.device, non_blocking=True, memory_format=memory_format))
        return F.cross_entropy(logits, target.to(args.device, non_blocking=True))

    def learning_rates(_iteration):
        return {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}

    scores = {}

    def save(position, best=False):
        extra = {"scheduler": scheduler.state_dict(), **scores}
        run.save(position, model, amp, extra,
                 copies=[os.path.join(args.dump_path, BEST)] if best else [])

    loop = TrainLoop(loader, forward, amp, epochs=args.epochs, device=args.device, save=save,
                     before_step=learning_rates, checkpoint_minutes=args.checkpoint_minutes,
                     checkpoint_iters=args.checkpoint_iters, log_every=args.log_every,
                     signals=signals)
    if checkpoint:
        run.restore(checkpoint, model, amp)
        scheduler.load_state_dict(checkpoint["scheduler"])
        scores.update({k: checkpoint[k] for k in SCORES if k in checkpoint})
        loop.load_position(checkpoint)
        log.info(f"resumed from {checkpoint['source']} at epoch {loop.epoch + 1}, "
                 f"iteration {loop.iteration}")
        if frozen:
            loaded = resumed_reference(model.encoder, loaded, args, checkpoint["source"])
    loop.writer = writer = ScalarWriter(os.path.join(args.dump_path, "tb"),
                                        is_main_process(), purge_step=loop.step, args=args)
    try:
        with loop:
            while loop.epoch < args.epochs:
                trained.train()
                loss = loop.run_epoch()
                scheduler.step()
                if not frozen:  # every shard is scored with rank 0's batch-norm statistics
                    broadcast_from_rank0(model)
                top1, top5 = validate(model, val, args, amp)
                is_best = "best_acc" not in scores or top1 > scores["best_acc"]
                if is_best:
                    scores.update(best_acc=top1, best_acc5=top5, best_epoch=loop.epoch)
                scores.update(last_acc=top1, last_acc5=top5)
                writer.add(loop.step, "val/", top1=top1, top5=top5)
                writer.add(loop.step, "epoch/", loss=loss)
                save(loop.position(), best=is_best)
                log.info(f"epoch {loop.epoch}/{args.epochs}: loss {loss:.4f}, val top-1 "
                         f"{top1:.2f} top-5 {top5:.2f} (best top-1 {scores['best_acc']:.2f})")
                loop.stop_if_requested()
    finally:
        writer.close()

    if frozen:
        verify_frozen(model.encoder, loaded, log)
    if is_main_process():
        save_results(args.dump_path, RESULTS, scores)
    if "best_acc" in scores:
        log.info(f"best top-1 {scores['best_acc']:.2f} top-5 {scores['best_acc5']:.2f} "
                 f"(epoch {scores['best_epoch']}); last top-1 {scores['last_acc']:.2f} "
                 f"top-5 {scores['last_acc5']:.2f}")
    return scores


@script_entry
def main(argv=None):
    with StopSignals() as signals:  # first thing: a stop while the data loads counts too
        run_distributed(functools.partial(linear_eval, signals=signals),
                        get_args(argv, "eval_linear"))


if __name__ == "__main__":
    main()
