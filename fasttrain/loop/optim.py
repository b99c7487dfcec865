"""Optimiser and learning-rate schedule, both defined per optimizer step."""

from __future__ import annotations

import math

import torch
from torch import nn

from fasttrain.config import TrainSection


def scaled_lr(t: TrainSection, global_batch: int) -> float:
    """The peak LR for `global_batch`: `t.lr` is quoted for `t.lr_ref_batch` and scaled by `t.lr_scaling`."""
    ratio = global_batch / t.lr_ref_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[t.lr_scaling]
    return t.lr * factor


def param_groups(model: nn.Module, weight_decay: float, wd_on_bn_and_bias: bool) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying BN scales and biases only fights normalisation."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 or wd_on_bn_and_bias else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, t: TrainSection, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, t.weight_decay, t.wd_on_bn_and_bias)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=t.momentum, nesterov=t.nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=(t.momentum, 0.999))


def lr_factor(step: int, total_steps: int, peak_step: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    if schedule == "constant":
        return 1.0
    if step < peak_step:
        return (step + 1) / (peak_step + 1)  # linear warm-up; never exactly 0 so step 0 learns
    remaining = max(total_steps - peak_step, 1)
    progress = min((step - peak_step) / remaining, 1.0)
    if schedule == "triangular":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainSection, steps_per_epoch: int):
    total = t.epochs * steps_per_epoch
    peak = round(t.lr_peak_epoch * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, peak, t.schedule))
