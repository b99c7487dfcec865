"""Mode "gpu": the whole data set read once through ffcv and kept on the device; batches are gathered and augmented
there with batched torch ops (fasttrain.data.augment), so no CPU work or host-to-device copy remains per step.

Each rank holds every image (uint8 [N,3,32,32]: 150 MB for CIFAR-10's training set) and reads only its shard of
each epoch's order (fasttrain.data.sharding, the same order as mode "ffcv"). Augmentation parameters come from a
generator on the device seeded with (seed, epoch, rank), so an epoch's augmentations are reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fasttrain.data import augment as aug
from fasttrain.data.ffcv_compat import (
    IntDecoder,
    Loader,
    OrderOption,
    SimpleRGBImageDecoder,
    Squeeze,
    ToTensor,
    torch_threads_kept,
)
from fasttrain.data.normalize import Normalizer
from fasttrain.data.sharding import batches_per_epoch, train_order


def read_beton(path: Path | str, workers: int = 1, batch_size: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of a .beton in file order, through a sequential, unaugmented ffcv Loader:
    images uint8 [N,3,H,W] (contiguous, CPU) and labels int64 [N]."""
    pipelines = {"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor(), Squeeze(1)]}
    with torch_threads_kept():
        loader = Loader(
            str(path),
            batch_size=batch_size,
            num_workers=workers,
            order=OrderOption.SEQUENTIAL,
            drop_last=False,
            pipelines=pipelines,
        )
        n = int(loader.reader.num_samples)
        images: torch.Tensor | None = None
        labels = torch.empty(n, dtype=torch.int64)
        start = 0
        for batch_images, batch_labels in loader:  # NHWC uint8 views of ffcv's reused buffers: copy out
            if images is None:
                images = torch.empty((n, *batch_images.shape[1:]), dtype=torch.uint8)
            end = start + batch_images.shape[0]
            images[start:end] = batch_images
            labels[start:end] = batch_labels
            start = end
    if images is None:
        raise ValueError(f"{path} holds no samples")
    return images.permute(0, 3, 1, 2).contiguous(), labels


def _augment_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class GpuTrainLoader:
    """Random order (as mode "ffcv"), augmented on the device, (images, labels)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        device: torch.device,
        flip: bool,
        translate: int,
        cutout: int,
        seed: int,
        distributed: bool,
        rank: int,
        world_size: int,
        channels_last: bool,
        drop_last: bool,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.flip_p, self.translate, self.cutout = (0.5 if flip else 0.0), translate, cutout
        self.distributed, self.rank, self.world_size = distributed, rank, world_size
        self.drop_last = drop_last
        self.dataset_size = images.shape[0]
        self._normalize = Normalizer(device, channels_last)
        self.epoch = 0
        per_rank = len(train_order(self.dataset_size, 0, seed, rank, world_size, distributed))
        self._batches = batches_per_epoch(per_rank, batch_size, drop_last)
        self.num_samples = self._batches * batch_size if drop_last else per_rank

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        order = train_order(self.dataset_size, epoch, self.seed, self.rank, self.world_size, self.distributed)
        order = torch.from_numpy(order[: self.num_samples]).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(_augment_seed(self.seed, epoch, self.rank))
        self.epoch += 1
        return self._epoch(order, generator)

    def _epoch(self, order: torch.Tensor, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, order.shape[0], self.batch_size):
            index = order[start : start + self.batch_size]
            images = aug.augment(
                self.images.index_select(0, index),
                flip_p=self.flip_p,
                translate_px=self.translate,
                cutout_px=self.cutout,
                generator=generator,
            )
            yield self._normalize(images), self.labels.index_select(0, index)


class GpuEvalLoader:
    """Rank r reads range(r, N, world) in order, unpadded: (images, labels, valid) with valid all True."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        device: torch.device,
        rank: int,
        world_size: int,
        channels_last: bool,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.device = batch_size, device
        self.dataset_size = images.shape[0]
        self._index = torch.arange(rank, self.dataset_size, world_size, device=device)
        self.num_samples = self.num_yielded = int(self._index.shape[0])
        self._normalize = Normalizer(device, channels_last)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, drop_last=False)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_samples, self.batch_size):
            index = self._index[start : start + self.batch_size]
            valid = torch.ones(index.shape[0], dtype=torch.bool, device=self.device)
            yield self._normalize(self.images.index_select(0, index)), self.labels.index_select(0, index), valid
