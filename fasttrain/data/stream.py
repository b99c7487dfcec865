"""Mode "stream": loaders built from ffcv's Loader; augmentation runs in ffcv's numba-compiled CPU ops.

Image pipeline: SimpleRGBImageDecoder -> RandomHorizontalFlip -> RandomTranslate(fill) -> Cutout(fill) -> ToTensor
-> ToDevice (CUDA only: on CPU it would only add a copy) -> ToTorchImage (a channels-last view of the uint8 NHWC
buffer), then Normalizer converts to float32 and normalises with torch ops on the device. Labels: IntDecoder ->
ToTensor -> Squeeze -> ToDevice (CUDA only).

ffcv reuses its output buffers between batches: the normalised images are fresh tensors, but labels may be
overwritten by later batches, so consumers must clone anything they keep past the next step. The evaluation loader
pads its last batch to the full batch size (fresh tensors), so that every evaluation batch has one shape.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch

from fasttrain.data.augment import FILL_COLOURS, Augmentation
from fasttrain.data.ffcv_compat import (
    Cutout,
    IntDecoder,
    Loader,
    OrderOption,
    RandomHorizontalFlip,
    RandomTranslate,
    SimpleRGBImageDecoder,
    Squeeze,
    ToDevice,
    ToTensor,
    ToTorchImage,
    torch_threads_kept,
)
from fasttrain.data.normalize import Normalizer
from fasttrain.data.resident import check_sample_count, read_beton, standard_fields
from fasttrain.data.sharding import eval_counts


def _device_context(device: torch.device):
    # The epoch iterator captures torch.cuda.current_stream() when created: make it the stream of our device.
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _to_device(device: torch.device) -> list:
    # A blocking copy. ffcv refills a batch slot's pinned host buffer without waiting for that slot's previous copy
    # to the device, which its stream runs only once the GPU catches up; fasttrain's steps read nothing back, so the
    # host can run that far ahead, and a non_blocking copy could then carry a later batch's pixels (ffcv issue #37).
    # Only ffcv's loader thread waits for the copy, and the wait keeps it within its slots of the GPU.
    return [ToDevice(device, non_blocking=False)] if device.type != "cpu" else []


def check_process_group(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "mode 'stream' with distributed=True needs torch.distributed's default process group: "
            "create it (e.g. Accelerator()) before build_loaders"
        )
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise RuntimeError(
            f"rank/world_size {rank}/{world_size} disagree with the process group's "
            f"{dist.get_rank()}/{dist.get_world_size()}; ffcv shards with the process group"
        )


class _FfcvLoader:
    def __init__(
        self,
        path: Path,
        *,
        image_ops: list,
        batch_size: int,
        workers: int,
        device: torch.device,
        order: OrderOption,
        seed: int,
        distributed: bool,
        channels_last: bool,
        drop_last: bool,
        fields: Callable[[list, list], tuple[dict, bool]] = standard_fields,
    ):
        self.path, self.workers, self.fields = path, workers, fields
        self.device = device
        self.batch_size = batch_size
        self._normalize = Normalizer(device, channels_last)
        pipelines, self._image_first = fields(
            [SimpleRGBImageDecoder(), *image_ops, ToTensor(), *_to_device(device), ToTorchImage(channels_last=True)],
            [IntDecoder(), ToTensor(), Squeeze(1), *_to_device(device)],
        )
        with torch_threads_kept():
            self._loader = Loader(
                str(path),
                batch_size=batch_size,
                num_workers=workers,
                order=order,
                distributed=distributed,
                seed=seed,
                drop_last=drop_last,
                pipelines=pipelines,
                os_cache=True,
            )
        self.dataset_size = int(self._loader.reader.num_samples)

    def __len__(self) -> int:
        return len(self._loader)

    def _epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Starts ffcv's epoch (advancing its epoch counter) now, not at the first next()."""
        with torch_threads_kept(), _device_context(self.device):
            batches = iter(self._loader)
        return self._drain(batches)

    def _drain(self, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        finished = False
        try:
            for first, second in batches:
                yield (first, second) if self._image_first else (second, first)
            finished = True
        finally:
            if not finished:
                batches.close()  # stops ffcv's worker thread when the consumer leaves the epoch early


def _image_ops(augmentation: Augmentation) -> list:
    if augmentation.flip not in (None, "random") or augmentation.translate_fill == "reflect":
        raise ValueError(f"ffcv cannot apply {augmentation}")
    ops = []
    if augmentation.flip:
        ops.append(RandomHorizontalFlip(0.5))
    if augmentation.translate:
        ops.append(RandomTranslate(padding=augmentation.translate, fill=FILL_COLOURS[augmentation.translate_fill]))
    if augmentation.cutout:
        ops.append(Cutout(augmentation.cutout, fill=FILL_COLOURS[augmentation.cutout_fill]))
    return ops


class StreamTrainLoader(_FfcvLoader):
    """(images, labels) in random order (ffcv RANDOM, seed + epoch: see fasttrain.data.sharding), augmented."""

    def __init__(
        self,
        path: Path,
        *,
        batch_size: int,
        workers: int,
        device: torch.device,
        augmentation: Augmentation,
        seed: int,
        distributed: bool,
        world_size: int,
        channels_last: bool,
        drop_last: bool,
        fields: Callable[[list, list], tuple[dict, bool]] = standard_fields,
    ):
        super().__init__(
            path,
            fields=fields,
            image_ops=_image_ops(augmentation),
            batch_size=batch_size,
            workers=workers,
            device=device,
            order=OrderOption.RANDOM,
            seed=seed,
            distributed=distributed,
            channels_last=channels_last,
            drop_last=drop_last,
        )
        per_rank = math.ceil(self.dataset_size / world_size) if distributed else self.dataset_size
        self.num_samples = len(self) * batch_size if drop_last else per_rank

    @property
    def epoch(self) -> int:
        """The epoch the next iteration yields; set it to resume."""
        return self._loader.next_epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._loader.next_epoch = int(value)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._epoch_batches()
        return ((self._normalize(images), labels) for images, labels in batches)

    def warm_up(self) -> float:
        """Runs ffcv's pipeline (numba compiles it on the first batch) for one batch, then puts the epoch counter
        back; returns the seconds it took, to be reported apart from training time."""
        start, epoch = time.perf_counter(), self.epoch
        batches = self._epoch_batches()
        next(batches, None)
        batches.close()
        self.epoch = epoch
        return time.perf_counter() - start

    def first_samples(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n training samples in file order, unaugmented: uint8 [n,3,H,W] and int64 [n] on the device,
        read from the file by every rank alike."""
        check_sample_count(n, self.dataset_size)
        images, labels = read_beton(self.path, self.workers, limit=n, fields=self.fields)
        return images.to(self.device), labels.to(self.device)

    def sample_images(self, n: int) -> torch.Tensor:
        """The first n training images in file order, unaugmented and normalised (float32 [n,3,H,W] on the device)."""
        return self._normalize(self.first_samples(n)[0])


class StreamEvalLoader(_FfcvLoader):
    """Sequential, unaugmented, (images, labels, valid); ffcv's distributed padding and the padding of the last
    batch to the full batch size are marked invalid."""

    def __init__(
        self,
        path: Path,
        *,
        batch_size: int,
        workers: int,
        device: torch.device,
        distributed: bool,
        rank: int,
        world_size: int,
        channels_last: bool,
        fields: Callable[[list, list], tuple[dict, bool]] = standard_fields,
    ):
        super().__init__(
            path,
            fields=fields,
            image_ops=[],
            batch_size=batch_size,
            workers=workers,
            device=device,
            order=OrderOption.SEQUENTIAL,
            seed=0,
            distributed=distributed,
            channels_last=channels_last,
            drop_last=False,
        )
        if distributed:
            self.num_samples, from_ffcv = eval_counts(self.dataset_size, rank, world_size)
        else:
            self.num_samples = from_ffcv = self.dataset_size
        self.batch_size = max(1, min(batch_size, from_ffcv))  # ffcv yields batches of at most this size
        self.num_yielded = len(self) * self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = self._epoch_batches()
        return self._padded(batches)

    def _padded(self, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        start = 0
        for images, labels in batches:
            n = labels.shape[0]
            if n < self.batch_size:  # the last batch: pad with black images of label 0
                images = torch.cat([images, images.new_zeros((self.batch_size - n, *images.shape[1:]))])
                labels = torch.cat([labels, labels.new_zeros(self.batch_size - n)])
            valid = torch.arange(start, start + self.batch_size, device=self.device) < self.num_samples
            start += self.batch_size
            yield self._normalize(images), labels, valid
