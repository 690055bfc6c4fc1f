"""The linear probe and low-shot fine-tuning of eval_linear.py (SPEC §5): the encoder
with its linear head, the head's optimizer and schedule, validation, and the proof
that a frozen encoder did not change."""
import os
import sys

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR

from src.data.loader import eval_loader
from src.distributed import all_reduce_sum
from src.errors import UsageError
from src.eval.features import evaluating
from src.eval.metrics import percent, topk_correct
from src.logger import progress
from src.schedules import scaled_lr

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


def probe_optimizer(model, probe, total_batch, fused=False):
    """(SGD, lr scheduler) of config.Probe `probe`: momentum 0.9, no weight decay, the
    head's (and when fine-tuning the encoder's) base lr scaled by `total_batch` / 256
    (--batch_size x processes)."""
    def lr(base):
        return scaled_lr(base, total_batch, 1)

    groups = [{"params": list(model.fc.parameters()), "lr": lr(probe.lr_classifier),
               "name": "classifier"}]
    if not model.frozen:
        groups.append({"params": list(model.encoder.parameters()),
                       "lr": lr(probe.lr_encoder), "name": "encoder"})
    optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, weight_decay=0,
                                fused=fused or None)
    if probe.scheduler == "step":
        scheduler = MultiStepLR(optimizer, milestones=list(STEP_MILESTONES), gamma=0.1)
    else:
        scheduler = CosineAnnealingLR(optimizer, T_max=probe.epochs, eta_min=0)
    return optimizer, scheduler


@torch.no_grad()
def validate(model, dataset, how, amp, memory_format=torch.contiguous_format):
    """(top-1, top-5) in percent on `dataset`, loaded as eval.features.Extraction `how`
    says; each process scores its own shard.

    Runs the unwrapped model: shards may differ in length, and a DDP forward would
    wait for the other processes.
    """
    device = next(model.parameters()).device
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    with evaluating(model), eval_loader(dataset, how.batch_size, how.workers) as loader:
        for _, images, target in progress(loader, len(loader), "val"):
            with amp.autocast():
                logits = model(images.to(device, non_blocking=True, memory_format=memory_format))
            target = target.to(device, non_blocking=True)
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


def resumed_reference(encoder, loaded, pretrained, path):
    """What a resumed frozen encoder must equal: the --pretrained weights (a checkpoint
    holding others belongs to another run), or, for a random encoder (`pretrained`
    empty), the one resumed."""
    if not changed_tensors(encoder, loaded):
        return loaded
    if pretrained:
        raise UsageError(f"{path} holds another encoder than --pretrained {pretrained}; "
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
