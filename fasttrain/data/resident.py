"""Mode "resident": the whole data set read once through ffcv (or its decoded copy, fasttrain.data.decoded) and kept
on the device (a GPU's, or the CPU's RAM).

Each rank holds every training image (uint8, 150 MB for CIFAR-10; 194 MB as the augmenter's pixel table padded by
2 px for translation, see fasttrain.data.augment) and reads only its shard of each epoch's order
(fasttrain.data.sharding, the same order as mode "stream"). When an epoch starts (`iter()`),
the loader gathers the shard in that order and augments all of it at once (fasttrain.data.augment, in chunks of
`CHUNK_IMAGES` to bound temporary memory); each step then only slices the next contiguous batch and normalises it,
with no host-device synchronisation. Augmentation parameters come from a generator on the device seeded with
(seed, epoch, rank), so an epoch's augmentations are reproducible; alternating flips depend on the seed alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from fasttrain.data.augment import Augmentation, Augmenter, alternating_flip_bits, alternating_mirrored
from fasttrain.data.normalize import Normalizer
from fasttrain.data.sharding import batches_per_epoch, train_order
from fasttrain.errors import ConfigError
from fasttrain.profiling import synchronize

CHUNK_IMAGES = 8192  # images augmented per chunk at an epoch's start: bounds the gather's temporaries


def standard_fields(image_ops: list, label_ops: list) -> tuple[dict, bool]:
    """ffcv pipelines for a file whose fields are fasttrain's own: "image" then "label"."""
    return {"image": image_ops, "label": label_ops}, True


def read_beton(
    path: Path | str,
    workers: int = 1,
    batch_size: int = 5000,
    limit: int | None = None,
    fields: Callable[[list, list], tuple[dict, bool]] = standard_fields,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of a .beton in file order (the first `limit` if given), through a sequential, unaugmented ffcv
    Loader: images uint8 [N,3,H,W] (CPU, channels-last memory, as ffcv decodes them) and labels int64 [N].
    `fields(image_ops, label_ops)` gives the pipelines under the file's field names and whether images come first
    (fasttrain.data.manifest.loader_pipelines for files written by other tools)."""
    from fasttrain.data.ffcv_compat import (  # here: importing ffcv takes seconds a decoded copy can spare
        IntDecoder,
        Loader,
        OrderOption,
        SimpleRGBImageDecoder,
        Squeeze,
        ToTensor,
        torch_threads_kept,
    )

    pipelines, image_first = fields([SimpleRGBImageDecoder(), ToTensor()], [IntDecoder(), ToTensor(), Squeeze(1)])
    with torch_threads_kept():
        loader = Loader(
            str(path),
            batch_size=batch_size if limit is None else max(1, min(batch_size, limit)),
            num_workers=workers,
            order=OrderOption.SEQUENTIAL,
            indices=None if limit is None else np.arange(limit),
            drop_last=False,
            pipelines=pipelines,
        )
        n = int(loader.reader.num_samples) if limit is None else limit
        images: torch.Tensor | None = None
        labels = torch.empty(n, dtype=torch.int64)
        start = 0
        for first, second in loader:  # NHWC uint8 views of ffcv's reused buffers: copy out
            batch_images, batch_labels = (first, second) if image_first else (second, first)
            if images is None:
                images = torch.empty((n, *batch_images.shape[1:]), dtype=torch.uint8)
            end = start + batch_images.shape[0]
            images[start:end] = batch_images
            labels[start:end] = batch_labels
            start = end
    if images is None:
        raise ValueError(f"{path} holds no samples")
    return images.permute(0, 3, 1, 2), labels


def _augment_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`; on CUDA through pinned memory, so the copy does not block the host."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class ResidentTrainLoader:
    """Random order (as mode "stream"), the epoch's shard augmented at once on the device, (images, labels)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        device: torch.device,
        augmentation: Augmentation,
        seed: int,
        distributed: bool,
        rank: int,
        world_size: int,
        channels_last: bool,
        drop_last: bool,
    ):
        self.labels = labels
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.augmenter = Augmenter(augmentation, images)  # holds the images, padded for translation
        self.distributed, self.rank, self.world_size = distributed, rank, world_size
        self.drop_last = drop_last
        self.dataset_size = images.shape[0]
        self._normalize = Normalizer(device, channels_last)
        self._flip_bits = None
        if augmentation.flip == "alternating":
            self._flip_bits = alternating_flip_bits(self.dataset_size, seed).to(device)
        self.epoch = 0
        per_rank = len(train_order(self.dataset_size, 0, seed, rank, world_size, distributed))
        self._batches = batches_per_epoch(per_rank, batch_size, drop_last)
        self.num_samples = self._batches * batch_size if drop_last else per_rank

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Augments the whole epoch now, then yields batches that are slices of it."""
        images, labels = self.augmented_epoch(self.epoch)
        self.epoch += 1
        return self._batches_of(images, labels)

    def augmented_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's samples of `epoch` in order, augmented: uint8 [num_samples,3,H,W] (channels-last memory) and
        int64 [num_samples]."""
        order = train_order(self.dataset_size, epoch, self.seed, self.rank, self.world_size, self.distributed)
        order = _to_device(order[: self.num_samples], self.device)
        return self._augmented(order, epoch, _augment_seed(self.seed, epoch, self.rank))

    def _augmented(self, order: torch.Tensor, epoch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator(device=self.device).manual_seed(seed)
        mirrored = None
        if self._flip_bits is not None:
            mirrored = alternating_mirrored(self._flip_bits.index_select(0, order), epoch)
        draws = self.augmenter.draw(order.shape[0], generator, mirrored)
        size = self.augmenter.aug.image_size
        nhwc = torch.empty((order.shape[0], size, size, self.augmenter.channels), dtype=torch.uint8, device=self.device)
        for start in range(0, order.shape[0], CHUNK_IMAGES):
            end = start + CHUNK_IMAGES
            self.augmenter.apply(order[start:end], draws.slice(start, end), out=nhwc[start:end])
        return nhwc.permute(0, 3, 1, 2), self.labels.index_select(0, order)

    def _batches_of(self, images: torch.Tensor, labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, labels.shape[0], self.batch_size):
            end = start + self.batch_size
            yield self._normalize(images[start:end]), labels[start:end]

    def warm_up(self) -> float:
        """One batch augmented and normalised as an epoch's are, outside the epochs' random streams and counter:
        CUDA loads each kernel at its first call, which would otherwise fall in the first timed epoch. Returns the
        seconds it took."""
        start = time.perf_counter()
        order = torch.arange(min(self.batch_size, self.dataset_size), device=self.device)
        images, _ = self._augmented(order, epoch=0, seed=0)
        self._normalize(images)
        synchronize(self.device)
        return time.perf_counter() - start

    def first_samples(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n training samples in file order, unaugmented: uint8 [n,3,H,W] and int64 [n] on the device."""
        check_sample_count(n, self.dataset_size)
        return self.augmenter.images(n), self.labels[:n]

    def sample_images(self, n: int) -> torch.Tensor:
        """The first n training images in file order, unaugmented and normalised (float32 [n,3,H,W] on the device)."""
        return self._normalize(self.first_samples(n)[0])


def check_sample_count(n: int, dataset_size: int) -> None:
    if not 1 <= n <= dataset_size:
        raise ConfigError(f"asked for {n} sample images; the training split holds {dataset_size}: ask for 1 to that")


class ResidentEvalLoader:
    """Rank r reads range(r, N, world) in order as (images, labels, valid); the last batch is padded to the full
    batch size with copies of the shard's first sample, marked invalid."""

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
        self.device = device
        self.dataset_size = images.shape[0]
        self.num_samples = len(range(rank, self.dataset_size, world_size))
        self.batch_size = max(1, min(batch_size, self.num_samples))
        self._batches = batches_per_epoch(self.num_samples, self.batch_size, drop_last=False)
        self.num_yielded = self._batches * self.batch_size
        index = torch.arange(rank, self.dataset_size, world_size, device=device)
        padded = torch.cat([index, index[:1].expand(self.num_yielded - self.num_samples)])
        self._images = images.index_select(0, padded).contiguous(memory_format=torch.channels_last)
        self._labels = labels.index_select(0, padded)
        self._valid = torch.arange(self.num_yielded, device=device) < self.num_samples
        self._normalize = Normalizer(device, channels_last)

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_yielded, self.batch_size):
            end = start + self.batch_size
            yield self._normalize(self._images[start:end]), self._labels[start:end], self._valid[start:end]
