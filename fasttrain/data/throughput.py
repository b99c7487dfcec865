"""`measure_loader`: images per second a loader delivers, apart from its first-epoch warm-up (ffcv's numba JIT)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from fasttrain.profiling import synchronize


def measure_loader(loader: Iterable, epochs: int = 3) -> dict[str, Any]:
    """Iterate `epochs` full epochs (>= 2) of a training or evaluation loader, touching nothing but batch sizes.

    Epoch 1 is the warm-up (`warmup_s`, JIT compilation included); `images_per_s` counts the later epochs only.
    CUDA work queued by a loader is synchronised at the end of each epoch, so asynchronous copies are counted.
    """
    if epochs < 2:
        raise ValueError("measure_loader needs epochs >= 2: the first one is warm-up")
    seconds, images = [], []
    for _ in range(epochs):
        count, device = 0, None
        start = time.perf_counter()
        for batch in loader:
            count += batch[0].shape[0]
            device = batch[0].device
        if device is not None:
            synchronize(device)
        seconds.append(time.perf_counter() - start)
        images.append(count)
    return {
        "images_per_s": sum(images[1:]) / sum(seconds[1:]),
        "warmup_s": seconds[0],
        "epoch_s": seconds,
        "images_per_epoch": images[-1],
        "epochs": epochs,
    }
