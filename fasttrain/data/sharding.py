"""Which samples each rank reads, shared by both loader modes so that they read the same images in the same order.

Training (the order ffcv's RANDOM traversal uses, reproduced): one process reads
`numpy.random.default_rng(seed + epoch).permutation(N)`; with `world` processes every rank draws the same
`torch.randperm(N)` from a torch.Generator seeded with `seed + epoch`, pads it to a multiple of `world` by
repeating its head (torch's DistributedSampler, drop_last=False) and takes `perm[rank::world]`. Every rank then
has ceil(N / world) samples and the same number of batches (unequal counts would hang DDP); when `world` does not
divide N, up to world - 1 samples of that epoch are seen twice. Each rank then keeps whole batches if drop_last.

Evaluation: rank r reads `range(r, N, world)` in order; the ffcv mode additionally pads at the end (see
`eval_counts`) and marks the padding invalid.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def train_order(n: int, epoch: int, seed: int, rank: int = 0, world: int = 1, distributed: bool = False) -> np.ndarray:
    """Dataset indices that `rank` reads in `epoch`, before dropping the last partial batch."""
    if not distributed:
        return np.random.default_rng(seed + epoch).permutation(n)
    generator = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=generator).numpy()
    total = math.ceil(n / world) * world
    padded = np.resize(perm, total)  # np.resize repeats from the start: the head pads the tail
    return padded[rank:total:world]


def batches_per_epoch(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)


def eval_counts(n: int, rank: int, world: int) -> tuple[int, int]:
    """(real, padded) sample counts of `rank`'s evaluation shard: real = len(range(rank, n, world)), and
    padded = ceil(n / world), what ffcv's distributed SEQUENTIAL order yields, the padding last."""
    return len(range(rank, n, world)), math.ceil(n / world)
