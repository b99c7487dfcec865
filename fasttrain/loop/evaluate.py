"""Validation: loss and accuracy over exactly the test set, however many ranks share it, with test-time
augmentation levels as airbench defines them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fasttrain.loop.distributed import sum_across_ranks

TTA_LEVELS = {0: "none", 1: "mirror", 2: "mirror + one-pixel shifts"}


def _logits(forward: Callable, images: torch.Tensor) -> torch.Tensor:
    # A copy in fp32: under CUDA graphs (compile modes reduce-overhead, max-autotune) the next call of the same
    # graph overwrites its output, so a result kept across calls must be cloned.
    return forward(images).to(torch.float32, copy=True)


def _mirrored(forward: Callable, images: torch.Tensor) -> torch.Tensor:
    return 0.5 * (_logits(forward, images) + _logits(forward, images.flip(3)))


def _shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The images moved by (dy, dx) pixels, borders filled by reflection."""
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    h, w = images.shape[2:]
    return padded[:, :, 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w].contiguous(memory_format=_format_of(images))


def _format_of(images: torch.Tensor) -> torch.memory_format:
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def tta_logits(forward: Callable, images: torch.Tensor, level: int) -> torch.Tensor:
    """Level 0: the plain forward. 1: the mean over the image and its mirror. 2: half of level 1 plus half the mean
    of level 1 on the image shifted one pixel up-left and one pixel down-right (reflect padding)."""
    if level == 0:
        return _logits(forward, images)
    mirrored = _mirrored(forward, images)
    if level == 1:
        return mirrored
    shifted = 0.5 * (_mirrored(forward, _shifted(images, 1, 1)) + _mirrored(forward, _shifted(images, -1, -1)))
    return 0.5 * mirrored + 0.5 * shifted


@torch.no_grad()
def evaluate(forward: Callable, loader, accelerator, tta_level: int = 0) -> dict[str, float]:
    """Mean loss and accuracy of `forward` over `loader` at a TTA level.

    The loader marks padding samples invalid (`valid`), so each test image counts once across ranks. Statistics
    stay on the device until the one read at the end.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss, correct, count
    for images, labels, valid in loader:
        with accelerator.autocast():
            logits = tta_logits(forward, images, tta_level)
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        correct = logits.argmax(dim=1) == labels
        valid = valid.to(torch.float64)
        sums += torch.stack([(loss * valid).sum(), (correct * valid).sum(), valid.sum()])
    loss_sum, correct, count = sum_across_ranks(accelerator, sums)
    if count == 0:
        raise RuntimeError("the evaluation loader yielded no images")
    return {"loss": loss_sum / count, "acc": correct / count, "count": int(count)}
