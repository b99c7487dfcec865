"""Mode "ffcv": streaming loaders built from ffcv's Loader; augmentation runs in ffcv's numba-compiled CPU ops.

Image pipeline: SimpleRGBImageDecoder -> RandomHorizontalFlip -> RandomTranslate -> Cutout -> ToTensor
-> ToDevice (CUDA only: on CPU it would only add a copy) -> ToTorchImage (a channels-last view of the uint8 NHWC
buffer), then Normalizer converts to float32 and normalises with torch ops on the device. Labels: IntDecoder ->
ToTensor -> Squeeze -> ToDevice (CUDA only).

ffcv reuses its output buffers between batches: the normalised images are fresh tensors, but labels may be
overwritten by later batches, so consumers must clone anything they keep past the next step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch

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
from fasttrain.data.sharding import eval_counts


def _device_context(device: torch.device):
    # The epoch iterator captures torch.cuda.current_stream() when created: make it the stream of our device.
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _to_device(device: torch.device) -> list:
    return [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []


def check_process_group(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "mode 'ffcv' with distributed=True needs torch.distributed's default process group: "
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
    ):
        self.device = device
        self.batch_size = batch_size
        self._normalize = Normalizer(device, channels_last)
        pipelines = {
            "image": [
                SimpleRGBImageDecoder(),
                *image_ops,
                ToTensor(),
                *_to_device(device),
                ToTorchImage(channels_last=True),
            ],
            "label": [IntDecoder(), ToTensor(), Squeeze(1), *_to_device(device)],
        }
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

    @staticmethod
    def _drain(batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        finished = False
        try:
            yield from batches
            finished = True
        finally:
            if not finished:
                batches.close()  # stops ffcv's worker thread when the consumer leaves the epoch early


class FfcvTrainLoader(_FfcvLoader):
    """(images, labels) in random order (ffcv RANDOM, seed + epoch: see fasttrain.data.sharding), augmented."""

    def __init__(
        self,
        path: Path,
        *,
        batch_size: int,
        workers: int,
        device: torch.device,
        flip: bool,
        translate: int,
        cutout: int,
        seed: int,
        distributed: bool,
        world_size: int,
        channels_last: bool,
        drop_last: bool,
    ):
        ops = [
            op
            for op, wanted in (
                (RandomHorizontalFlip(0.5), flip),
                (RandomTranslate(padding=translate), translate),
                (Cutout(cutout), cutout),
            )
            if wanted
        ]
        super().__init__(
            path,
            image_ops=ops,
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


class FfcvEvalLoader(_FfcvLoader):
    """Sequential, unaugmented, (images, labels, valid); ffcv's distributed padding is marked invalid."""

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
    ):
        super().__init__(
            path,
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
            self.num_samples, self.num_yielded = eval_counts(self.dataset_size, rank, world_size)
        else:
            self.num_samples = self.num_yielded = self.dataset_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = self._epoch_batches()
        return self._with_valid(batches)

    def _with_valid(self, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        start = 0
        for images, labels in batches:
            n = labels.shape[0]
            valid = torch.arange(start, start + n, device=self.device) < self.num_samples
            start += n
            yield self._normalize(images), labels, valid
