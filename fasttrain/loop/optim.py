"""Optimisers and learning-rate schedules, both defined per optimizer step.

A run has one or more parameter groups. Without `param_groups` in the config every trainable parameter uses the
`train` section's optimiser (weight decay on conv/linear weights only, unless `train.wd_on_bn_and_bias`). A recipe's
`param_groups` entries pick parameters by fnmatch patterns on their names, each with its own optimiser, LR, weight
decay and schedule (airbench: Muon for conv filters, Nesterov SGD for BatchNorm biases, the whitening bias and the
head); parameters no entry matches stay with the `train` settings. Groups sharing an optimiser type share one torch
optimiser; every group has its own LR schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from fasttrain.config import ParamGroup, TrainSection
from fasttrain.errors import ConfigError

DEFAULT_GROUP = "default"


def scaled_lr(t: TrainSection, global_batch: int, lr: float | None = None) -> float:
    """The peak LR for `global_batch`: `lr` (default `t.lr`) is quoted for `t.lr_ref_batch` and scaled by
    `t.lr_scaling`."""
    ratio = global_batch / t.lr_ref_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[t.lr_scaling]
    return (t.lr if lr is None else lr) * factor


@dataclass(frozen=True)
class GroupSettings:
    """A parameter group's resolved settings: its entry's values, the `train` section's where it set none."""

    name: str
    optimizer: str
    lr: float  # peak, scaled to the global batch
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    lr_peak_epoch: float
    end_epoch: float  # the schedule reaches 0 here


def group_settings(t: TrainSection, groups: dict[str, ParamGroup], global_batch: int) -> list[GroupSettings]:
    """Settings of every named group, then the default group's (the `train` section)."""

    def pick(value, default):
        return default if value is None else value

    settings = [
        GroupSettings(
            name=name,
            optimizer=pick(g.optimizer, t.optimizer),
            lr=scaled_lr(t, global_batch, pick(g.lr, t.lr)),
            momentum=pick(g.momentum, t.momentum),
            nesterov=pick(g.nesterov, t.nesterov),
            weight_decay=pick(g.weight_decay, t.weight_decay),
            schedule=pick(g.schedule, t.schedule),
            lr_peak_epoch=pick(g.lr_peak_epoch, t.lr_peak_epoch),
            end_epoch=min(pick(g.end_epoch, t.epochs), t.epochs),
        )
        for name, g in groups.items()
    ]
    default = GroupSettings(
        DEFAULT_GROUP, t.optimizer, scaled_lr(t, global_batch), t.momentum, t.nesterov, t.weight_decay,
        t.schedule, t.lr_peak_epoch, t.epochs,
    )  # fmt: skip
    return [*settings, default]


def assign_params(model: nn.Module, groups: dict[str, ParamGroup]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by group name: the first entry whose pattern matches a name takes it, the rest go to
    the default group. A pattern that matches no trainable parameter is a ConfigError (a typo must not silently
    leave a group empty)."""
    assigned: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in [*groups, DEFAULT_GROUP]}
    used = {(name, pattern): False for name, g in groups.items() for pattern in g.params}
    for param_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = DEFAULT_GROUP
        for name, g in groups.items():
            hit = next((pattern for pattern in g.params if fnmatchcase(param_name, pattern)), None)
            if hit is not None:
                used[(name, hit)] = True
                owner = name
                break
        assigned[owner].append((param_name, p))
    unused = [f"param_groups.{name}: '{pattern}'" for (name, pattern), hit in used.items() if not hit]
    if unused:
        names = ", ".join(n for n, p in model.named_parameters() if p.requires_grad)
        raise ConfigError(f"{'; '.join(unused)} matches no trainable parameter. Parameters: {names}")
    return assigned


def _torch_groups(settings: GroupSettings, params: list[tuple[str, nn.Parameter]], t: TrainSection) -> list[dict]:
    """The default group splits into decayed and undecayed parts: decaying BN scales and biases only fights
    normalisation. A named group is exactly what its entry says."""
    common = {"group": settings.name, "lr": settings.lr}
    if settings.name != DEFAULT_GROUP:
        return [{**common, "params": [p for _, p in params], "weight_decay": settings.weight_decay}]
    decay = [p for _, p in params if p.ndim > 1 or t.wd_on_bn_and_bias]
    no_decay = [p for _, p in params if not (p.ndim > 1 or t.wd_on_bn_and_bias)]
    return [
        {**common, "params": decay, "weight_decay": settings.weight_decay},
        {**common, "params": no_decay, "weight_decay": 0.0},
    ]


def _make_optimizer(
    kind: str, groups: list[dict], s: GroupSettings, fused: bool, compiled: bool
) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov, fused=fused or None)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=s.lr, betas=(s.momentum, 0.999), fused=fused or None)
    from fasttrain.loop.muon import Muon

    return Muon(groups, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov, compile_newton_schulz=compiled)


def build_optimizers(
    model: nn.Module,
    t: TrainSection,
    groups: dict[str, ParamGroup],
    global_batch: int,
    fused: bool = False,
    compiled: bool = False,
) -> list[torch.optim.Optimizer]:
    """One optimiser per optimiser type in use, in the order the groups are listed; empty groups are dropped.
    `fused` asks torch for its fused SGD/AdamW kernels (CUDA): one launch per step, and no host sync under a
    GradScaler. `compiled` runs Muon's Newton-Schulz iteration through torch.compile (the run compiles its model)."""
    settings = {s.name: s for s in group_settings(t, groups, global_batch)}
    by_kind: dict[str, tuple[list[dict], GroupSettings]] = {}
    for name, params in assign_params(model, groups).items():
        s = settings[name]
        for g in _torch_groups(s, params, t):
            if not g["params"]:
                continue
            # Momentum may differ between groups of one optimiser: carry it per group (AdamW's is beta1).
            if s.optimizer == "adamw":
                g["betas"] = (s.momentum, 0.999)
            else:
                g.update(momentum=s.momentum, nesterov=s.nesterov)
            by_kind.setdefault(s.optimizer, ([], s))[0].append(g)
    if not by_kind:
        raise ConfigError("the model has no trainable parameters")
    return [_make_optimizer(kind, torch_groups, s, fused, compiled) for kind, (torch_groups, s) in by_kind.items()]


def lr_factor(step: int, total_steps: int, peak_step: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): 0 from `total_steps` on."""
    if step >= total_steps:
        return 0.0
    if schedule == "constant":
        return 1.0
    if step < peak_step:
        return (step + 1) / (peak_step + 1)  # linear warm-up; never exactly 0 so step 0 learns
    remaining = max(total_steps - peak_step, 1)
    progress = min((step - peak_step) / remaining, 1.0)
    if schedule == "triangular":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def build_schedulers(
    optimizers: list[torch.optim.Optimizer], t: TrainSection, groups: dict[str, ParamGroup], steps_per_epoch: int
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One LambdaLR per optimiser, with one schedule per parameter group (from that group's settings)."""
    settings = {s.name: s for s in group_settings(t, groups, global_batch=t.lr_ref_batch)}

    def schedule_of(group: dict):
        s = settings[group["group"]]
        total = round(s.end_epoch * steps_per_epoch)
        peak = min(round(s.lr_peak_epoch * steps_per_epoch), total)
        return lambda step: lr_factor(step, total, peak, s.schedule)

    return [torch.optim.lr_scheduler.LambdaLR(opt, [schedule_of(g) for g in opt.param_groups]) for opt in optimizers]


def peak_lrs(optimizers: list[torch.optim.Optimizer], t: TrainSection, groups: dict[str, ParamGroup], batch: int):
    """Each optimiser's per-group peak LRs from this run's config (what a resumed schedule must follow)."""
    settings = {s.name: s for s in group_settings(t, groups, batch)}
    return [[settings[g["group"]].lr for g in opt.param_groups] for opt in optimizers]


def follow_config(schedulers, optimizers, peaks: list[list[float]]) -> None:
    """After loading a checkpoint: the schedules' peaks come from this run's config (they differ only under
    --resume force), and each group's current LR is recomputed for the step the schedule stands at."""
    for scheduler, opt, group_peaks in zip(schedulers, optimizers, peaks):
        scheduler.base_lrs = list(group_peaks)
        for g, peak, fn in zip(opt.param_groups, group_peaks, scheduler.lr_lambdas):
            g["lr"] = peak * fn(scheduler.last_epoch)
            g["initial_lr"] = peak  # LambdaLR's own copy of the peak, kept consistent in the next checkpoint
