"""The step engine: one optimizer step (forward, loss, backward, every optimiser, every schedule) with its
statistics kept on the device.

Between log steps the engine makes no host<->device synchronisation: the loss, the correct count and a non-finite
flag accumulate in one device tensor, and image counts are host integers. `take_window()` reads that tensor (the
one sync) and starts a new window. A non-finite loss is therefore noticed at the next log step or epoch end, and
named by the window of steps it happened in. Only `nonfinite="skip"` reads the loss every step, because it must
decide before the optimiser steps, and fp16: torch's GradScaler reads its inf flag for a single non-fused
optimiser, and with several the engine reads once instead, so that all step or none (a single fused one reads
nothing).

    engine = StepEngine(model, optimizers, schedulers, accelerator, label_smoothing=0.1)
    for images, labels in loader:
        engine.step(images, labels)
    stats = engine.take_window()   # WindowStats(images=..., loss=..., acc=..., ...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from fasttrain.errors import NonFiniteLoss
from fasttrain.loop.distributed import any_rank

# Slots of the device-side statistics tensor.
SMOOTHED_LOSS, LOSS, CORRECT, NONFINITE = range(4)


@dataclass(frozen=True)
class WindowStats:
    """What the steps since the last `take_window()` did, on this rank."""

    steps: int
    images: int
    loss: float  # mean plain cross-entropy (comparable with validation loss)
    loss_smoothed: float  # mean training objective (with label smoothing)
    acc: float
    nonfinite_steps: int
    skipped_steps: int

    @staticmethod
    def combine(parts: list[WindowStats]) -> WindowStats:
        """Windows of one epoch added up (empty windows, e.g. one taken right after a log step, add nothing)."""
        parts = [p for p in parts if p.images] or parts[:1]
        images = sum(p.images for p in parts)

        def mean(key: str) -> float:
            return sum(getattr(p, key) * p.images for p in parts) / images if images else float("nan")

        return WindowStats(
            steps=sum(p.steps for p in parts),
            images=images,
            loss=mean("loss"),
            loss_smoothed=mean("loss_smoothed"),
            acc=mean("acc"),
            nonfinite_steps=sum(p.nonfinite_steps for p in parts),
            skipped_steps=sum(p.skipped_steps for p in parts),
        )


def prepare_for_engine(
    accelerator, model: nn.Module, optimizers: list, schedulers: list
) -> tuple[nn.Module, list, list]:
    """`accelerator.prepare` for a StepEngine: the model (DDP-wrapped with several processes), its optimisers and
    schedules, in that order.

    Under bf16/fp16, Accelerate also replaces the model's forward by one that runs under an autocast object made for
    that model. torch.compile guards on the object's identity, so each model a process prepares (every repeat of a
    run) was compiled again, and past Dynamo's recompile limit (8: the 5th repeat's train and eval graphs) ran
    uncompiled. The model's own forward is put back: StepEngine.step and evaluate enter `accelerator.autocast()`
    themselves and read the logits in fp32, as the wrapper did."""
    prepared = accelerator.prepare(model, *optimizers, *schedulers)
    model, *prepared = prepared if optimizers or schedulers else (prepared,)  # one object comes back bare
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # in place, on the module inside any DDP wrapper
    return model, prepared[: len(optimizers)], prepared[len(optimizers) :]


class StepEngine:
    """Runs training steps on prepared (Accelerate) model, optimisers and schedulers.

    `forward`: what computes the logits, e.g. the compiled model (default: `model`). `loss_reduction`: "mean", or
    "sum" over the batch (airbench). `nonfinite`: "stop" lets the caller stop at the next window; "skip" drops a
    step whose loss is NaN/Inf on any rank (restoring BatchNorm statistics, so the dropped step leaves no trace).

    A summed loss is multiplied by the number of processes before backward: DDP averages gradients over ranks, so
    the gradient is then the sum over the global batch, as one process on that batch would compute it. A mean loss
    needs nothing (the mean of per-rank means is the global mean). Reported losses are never scaled.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: list[torch.optim.Optimizer],
        schedulers: list,
        accelerator,
        *,
        forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
        label_smoothing: float = 0.0,
        loss_reduction: str = "mean",
        grad_clip: float | None = None,
        nonfinite: str = "stop",
    ):
        self.model, self.optimizers, self.schedulers, self.accelerator = model, optimizers, schedulers, accelerator
        # Except for fp16 with one optimiser, steps call torch's optimisers, not Accelerate's wrappers: with no XLA
        # and no gradient accumulation a wrapper adds only its cost, two package look-ups per step()
        # (`is_lomo_available`) and an inspect.signature per zero_grad(): 110 us against torch's 32 us for an SGD
        # step and 22 us against 10 for zero_grad on this project's CPU, per optimiser and step.
        self._torch_optimizers = [o.optimizer if isinstance(o, AcceleratedOptimizer) else o for o in optimizers]
        self.forward = forward if forward is not None else model  # (a compiled nn.Sequential has no truth value)
        self.label_smoothing, self.loss_reduction, self.grad_clip = label_smoothing, loss_reduction, grad_clip
        self.nonfinite = nonfinite
        self._backward_scale = accelerator.num_processes if loss_reduction == "sum" else 1
        self._stats = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
        self._images = self._steps = self._skipped = 0

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """One optimizer step on this batch. Returns False if the step was skipped (nonfinite="skip" only)."""
        saved_buffers = [b.clone() for b in self.model.buffers()] if self.nonfinite == "skip" else None
        with self.accelerator.autocast():
            logits = self.forward(images)
        logits = logits.float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing, reduction=self.loss_reduction)
        self.accelerator.backward(loss * self._backward_scale if self._backward_scale != 1 else loss)
        if saved_buffers is not None and any_rank(self.accelerator, not bool(torch.isfinite(loss))):
            self._drop_step(saved_buffers)
            return False
        stepped = self._step_optimizers()
        for optimizer in self._torch_optimizers:
            optimizer.zero_grad(set_to_none=True)
        if stepped:
            for scheduler in self.schedulers:
                scheduler.step()
        self._record(loss.detach(), logits.detach(), labels)
        return True

    def _step_optimizers(self) -> bool:
        """Clip (train.grad_clip), then every optimiser's step. Returns False when fp16's GradScaler skipped the step
        (an inf/NaN gradient): the schedules then wait too, so a skipped step does not advance the LR (a single
        fused optimiser skips on the device, unseen: True)."""
        scaler = self.accelerator.scaler
        if scaler is not None and len(self.optimizers) > 1:
            return self._step_at_one_scale(scaler)
        if self.grad_clip is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if scaler is not None:
            # fp16, one optimiser: Accelerate's wrapper does scaler.step, then scaler.update. A fused optimiser
            # (CUDA) reads nothing back; as the wrapper cannot see its skips, its schedules then never wait.
            self.optimizers[0].step()
            return not self.optimizers[0].step_was_skipped
        for optimizer in self._torch_optimizers:
            optimizer.step()
        return True

    def _step_at_one_scale(self, scaler: torch.amp.GradScaler) -> bool:
        """fp16 with several optimisers (airbench's Muon + SGD). Accelerate's wrapper updates the scale after each
        optimiser's step, so the next one would be unscaled by a changed scale (twice, after clipping), and each
        would skip on its own gradients alone. Here every gradient is unscaled at one scale, all optimisers step or
        none does (one host read a step), and the scale is updated once."""
        for optimizer in self._torch_optimizers:
            scaler.unscale_(optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        finite = bool(torch.isfinite(norm))  # a host read: every optimiser or none
        if finite:
            if self.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
            # The gradients are unscaled and known finite: scaler.step would only read its inf flags once more.
            for optimizer in self._torch_optimizers:
                optimizer.step()
        scaler.update()  # from the flags unscale_ recorded: backs off when one found inf/NaN
        return finite

    def _record(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        smoothed_sum = loss * n if self.loss_reduction == "mean" else loss
        with torch.no_grad():
            plain_sum = F.cross_entropy(logits, labels, reduction="sum")
            correct = (logits.argmax(dim=1) == labels).sum()
            self._stats += torch.stack([smoothed_sum.double(), plain_sum.double(), correct.double(),
                                        (~torch.isfinite(loss)).double()])  # fmt: skip
        self._images += n
        self._steps += 1

    def _drop_step(self, saved_buffers: list[torch.Tensor]) -> None:
        for optimizer in self._torch_optimizers:
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), saved_buffers):
                buffer.copy_(saved)
        self._skipped += 1

    def take_window(self) -> WindowStats:
        """The statistics since the last call (one device->host read), and a fresh window."""
        smoothed, plain, correct, nonfinite = self._stats.tolist()
        n = self._images
        stats = WindowStats(
            steps=self._steps,
            images=n,
            loss=plain / n if n else float("nan"),
            loss_smoothed=smoothed / n if n else float("nan"),
            acc=correct / n if n else float("nan"),
            nonfinite_steps=int(nonfinite),
            skipped_steps=self._skipped,
        )
        self._stats.zero_()
        self._images = self._steps = self._skipped = 0
        return stats

    def lr(self) -> float:
        """The current LR of the first parameter group (the one metrics rows report)."""
        return self.schedulers[0].get_last_lr()[0] if self.schedulers else self.optimizers[0].param_groups[0]["lr"]


def raise_if_nonfinite(nonfinite_per_rank: list[int], first_step: int, last_step: int, hint: str) -> None:
    """NonFiniteLoss naming the window of optimizer steps (1-based) where the loss became NaN/Inf, and with several
    processes the ranks that saw it. `nonfinite_per_rank`: each rank's count of non-finite steps in the window, the
    same list on every rank (fasttrain.loop.distributed.per_rank), so every rank raises the same error together."""
    counts = [int(n) for n in nonfinite_per_rank]
    if not any(counts):
        return
    ranks = ""
    if len(counts) > 1:
        seen = [str(rank) for rank, n in enumerate(counts) if n]
        ranks = f" on rank{'s' if len(seen) > 1 else ''} {', '.join(seen)} of {len(counts)} processes"
    raise NonFiniteLoss(
        f"the loss became NaN/Inf in {max(counts)} of optimizer steps {first_step + 1}-{last_step}{ranks}. " + hint
    )
