"""Validation: loss and accuracy over exactly the test set, however many ranks share it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttrain.loop.distributed import sum_across_ranks


@torch.no_grad()
def evaluate(forward, loader, accelerator, tta: bool = False) -> dict[str, float]:
    """Mean loss and accuracy of `forward` over `loader`; with `tta`, logits of the image and its mirror averaged.

    The loader marks padding samples invalid (`valid`), so each test image counts once across ranks.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss, correct, count
    for images, labels, valid in loader:
        with accelerator.autocast():
            logits = forward(images)
            if tta:
                logits = 0.5 * (logits + forward(torch.flip(images, dims=[3])))
        logits = logits.float()
        loss = F.cross_entropy(logits, labels, reduction="none")
        correct = logits.argmax(dim=1) == labels
        valid = valid.to(torch.float64)
        sums += torch.stack([(loss * valid).sum(), (correct * valid).sum(), valid.sum()])
    loss_sum, correct, count = sum_across_ranks(accelerator, sums)
    if count == 0:
        raise RuntimeError("the evaluation loader yielded no images")
    return {"loss": loss_sum / count, "acc": correct / count, "count": int(count)}
