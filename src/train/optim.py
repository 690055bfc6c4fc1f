"""Optimizers and the mixed-precision step that drives them (SPEC §4)."""
import torch

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


def build_optimizer(model, optim, lr, fused=False, foreach=None):
    """SGD (momentum 0.9) or AdamW as config.Optim `optim` says, at the (batch-scaled)
    `lr`, which the schedule sets per step, as it sets the weight decay of the first
    parameter group (`set_weight_decay`). Weight decay on all parameters (one group, as
    the authors: the optimizer state matches their files), or with `wd_norms_biases`
    False on all but the norms and biases (`decay_groups`). `fused`: one fused kernel
    per step instead of one per tensor; without it torch picks its loop (`foreach`
    None: multi-tensor on CUDA, per-tensor on CPU)."""
    params = model.parameters() if optim.wd_norms_biases else decay_groups(model, optim.wd)
    kernel = dict(fused=fused or None, foreach=foreach)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=optim.wd, **kernel)
    return torch.optim.AdamW(params, lr=lr, weight_decay=optim.wd, **kernel)


def is_norm_or_bias(name, parameter):
    """A bias or a 1-D tensor (the norms' scales): no weight decay for ViTs (DINO's rule)."""
    return name.endswith(".bias") or parameter.ndim <= 1


def decay_groups(model, wd):
    """[the parameters with weight decay `wd`, the norms and biases without], in
    `model.parameters()` order within each group."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not is_norm_or_bias(n, p)], "weight_decay": wd},
            {"params": [p for n, p in named if is_norm_or_bias(n, p)], "weight_decay": 0.0}]


def set_weight_decay(optimizer, wd):
    """This step's weight decay, on the first parameter group: all parameters, or those
    with weight decay (`decay_groups`: the second has none)."""
    optimizer.param_groups[0]["weight_decay"] = wd


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
    (CUDA), bf16 = bfloat16 autocast without scaling, fp32 = no autocast. With
    `clip_grad` > 0 the gradients' total norm (over every parameter, as torch's
    clip_grad_norm_) is clipped to it before each step, the loss scale taken out first."""

    def __init__(self, optimizer, device, precision="fp32", clip_grad=0.0):
        self.optimizer, self.device, self.clip_grad = optimizer, device, clip_grad
        self.device_type = device.type
        self.dtype = AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    def step(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)  # a no-op without loss scaling
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
