"""Optimizers and the mixed-precision step that drives them (SPEC §4)."""
import torch

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def build_optimizer(model, optim, lr, fused=False, foreach=None):
    """SGD (momentum 0.9) or AdamW as config.Optim `optim` says, weight decay on all
    parameters, at the (batch-scaled) `lr`, which the schedule sets per step. `fused`:
    one fused kernel per step instead of one per tensor; without it torch picks its
    loop (`foreach` None: multi-tensor on CUDA, per-tensor on CPU)."""
    params = model.parameters()  # as the authors: the optimizer state matches their files
    kernel = dict(fused=fused or None, foreach=foreach)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=optim.wd, **kernel)
    return torch.optim.AdamW(params, lr=lr, weight_decay=optim.wd, **kernel)


KERNEL_FLAGS = ("fused", "foreach")  # which of torch's kernels steps: this run's choice


def load_optimizer_state(optimizer, state):
    """Load a saved optimizer `state` and keep this run's kernel (--fused, and torch's
    foreach or per-tensor loop). The flags go into the saved groups before loading,
    since torch places each state tensor by the flags of the groups it loads: a fused
    kernel wants AdamW's `step` tensors as float32 on the parameters' device, the
    other loops leave them on the CPU where they were saved."""
    groups = state["param_groups"]
    if len(groups) == len(optimizer.param_groups):  # else load_state_dict says why not
        groups = [{**saved, **{k: group.get(k) for k in KERNEL_FLAGS}}
                  for saved, group in zip(groups, optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


class AmpOptimizer:
    """An optimizer stepped under `precision`: fp16 = float16 autocast with loss scaling
    (CUDA), bf16 = bfloat16 autocast without scaling, fp32 = no autocast."""

    def __init__(self, optimizer, device, precision="fp32"):
        self.optimizer, self.device = optimizer, device
        self.device_type = device.type
        self.dtype = AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    def step(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
