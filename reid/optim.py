"""The optimizer and its schedule: parameter groups (no decay on biases and norms; centres and a pretrained backbone
at their own rates), AdamW / SGD / AdaBound, warmup then cosine or step decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ReidError


def param_groups(model: nn.Module, head: nn.Module, lr: float, weight_decay: float, head_lr_mult: float,
                 backbone_lr_mult: float = 1.0, backbone: nn.Module | None = None) -> list:
    """No weight decay on biases, norm layers and GeM's p (all 1-d); the class centres get their own rate, and so
    do the parameters of `backbone` (pretrained weights fine-tuned slower than the new layers above them)."""
    slow = {id(p) for p in backbone.parameters()} if backbone is not None and backbone_lr_mult != 1.0 else set()
    groups: dict[tuple[bool, bool], list] = {(s, d): [] for s in (False, True) for d in (True, False)}
    for p in model.parameters():
        if p.requires_grad:
            groups[(id(p) in slow, p.ndim > 1)].append(p)
    out = [{"params": ps, "lr": lr * (backbone_lr_mult if s else 1.0), "weight_decay": weight_decay if d else 0.0}
           for (s, d), ps in groups.items() if ps or not s]
    return [*out, {"params": list(head.parameters()), "lr": lr * head_lr_mult, "weight_decay": weight_decay}]


def build_optimizer(cfg, body: nn.Module, heads: nn.Module, backbone: nn.Module, batch_size: int):
    """The configured optimizer over `body` (backbone, pools, necks) and `heads` (class centres), the rate scaled by
    batch_size / train.lr_reference_batch when that is set (the linear scaling rule)."""
    t = cfg.train
    lr = t.lr * (batch_size / t.lr_reference_batch if t.lr_reference_batch else 1.0)
    groups = param_groups(body, heads, lr, t.weight_decay, cfg.loss.head_lr_mult, t.backbone_lr_mult, backbone)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if t.optimizer == "adabound":
        try:
            import adabound
        except ImportError as err:
            raise ReidError("train.optimizer=adabound needs the adabound package: pip install adabound") from err
        return adabound.AdaBound(groups, lr=lr, final_lr=lr * 30)
    return torch.optim.AdamW(groups, lr=lr)


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str, progress=None):
    """Linear warmup, then cosine to zero or steps of x0.1 at 60 % and 85 % of training. `progress()`, when
    given, says how much of training is done (for a wall-time budget) instead of the step count."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = progress() if progress else (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "step":
            return 0.1 ** ((done >= 0.6) + (done >= 0.85))
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return factor
