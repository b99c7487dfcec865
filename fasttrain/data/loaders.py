"""`build_loaders`: the training and evaluation loaders the trainer iterates, in either of two modes.

Both modes read the same converted directory (train.beton, test.beton) and promise the same things:

Training loader, `for images, labels in loader`:
- images: float32 [B,3,32,32] on `device`, normalised with the CIFAR-10 mean/std (fasttrain.data.normalize),
  channels-last if asked; labels: int64 [B] on `device`.
- order: a fresh random order each epoch, identical in both modes for the same seed (fasttrain.data.sharding);
  distributed, each rank reads a disjoint shard (padded to equal length); drop_last drops each rank's partial batch.
- augmentation (augment=True), in this order: horizontal flip with p=0.5 (flip=True), translation by up to
  `translate` px per axis with zero (black) fill, one `cutout` x `cutout` black square wholly inside the image;
  0 disables a step. Both modes draw these with ffcv's distributions (see fasttrain.data.augment).
- `epoch`: the epoch the next `iter()` yields; each `iter()` takes that epoch's order and then increments it,
  as ffcv's Loader.next_epoch does. Set it to resume. `len(loader)`: batches per epoch on this rank;
  `num_samples`: samples per epoch on this rank; `dataset_size`: samples in the split.

Evaluation loader, `for images, labels, valid in loader`: the test split in order, unaugmented, same image format.
`valid` (bool [B]) marks real samples: mode "ffcv" pads each rank's shard as torch's DistributedSampler does and
marks that padding invalid, mode "gpu" does not pad. Summed over ranks, valid counts each test image exactly once.
`num_samples`: real samples on this rank; `num_yielded`: samples this rank yields, padding included.

Batches may live in buffers that the loader reuses: clone anything kept beyond the current step.

Mode "ffcv" (fasttrain.data.ffcv_stream) streams from the .beton files and augments in ffcv's compiled CPU code;
with distributed=True ffcv shards with torch.distributed's default process group, which must exist first.
Mode "gpu" (fasttrain.data.gpu_resident) holds the data set on the device and augments there: the fast path on GPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from fasttrain.data.manifest import beton_paths
from fasttrain.errors import ConfigError

MODES = ("ffcv", "gpu")


class TrainLoader(Protocol):
    epoch: int
    batch_size: int
    num_samples: int
    dataset_size: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class EvalLoader(Protocol):
    batch_size: int
    num_samples: int
    num_yielded: int
    dataset_size: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...


def _check_arguments(
    mode: str,
    batch_size: int,
    eval_batch_size: int,
    workers: int,
    translate: int,
    cutout: int,
    distributed: bool,
    rank: int,
    world_size: int,
) -> None:
    if mode not in MODES:
        raise ConfigError(f"data mode {mode!r} is unknown; choose one of {', '.join(MODES)}")
    if batch_size < 1 or eval_batch_size < 1 or workers < 1:
        raise ConfigError(f"batch sizes and workers must be >= 1 (got {batch_size}, {eval_batch_size}, {workers})")
    if translate < 0 or not 0 <= cutout <= 32:
        raise ConfigError(f"translate must be >= 0 and cutout in [0, 32] (got {translate}, {cutout})")
    if not 0 <= rank < world_size or (not distributed and world_size != 1):
        raise ConfigError(f"rank {rank} / world_size {world_size} is impossible with distributed={distributed}")


def build_loaders(
    data_dir: Path | str,
    *,
    mode: str = "ffcv",
    batch_size: int,
    eval_batch_size: int,
    workers: int,
    device: torch.device | str,
    flip: bool = True,
    translate: int = 2,
    cutout: int = 8,
    seed: int = 0,
    distributed: bool = False,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = True,
    drop_last: bool = True,
    augment: bool = True,
) -> tuple[TrainLoader, EvalLoader]:
    """The (training, evaluation) loaders over `data_dir`; see the module docstring for what they yield.

    `workers`: ffcv's CPU threads (mode "gpu" uses them only for the one-time read). `augment=False` turns off
    flip, translate and cutout together. `seed` must be the same on every rank.
    """
    _check_arguments(mode, batch_size, eval_batch_size, workers, translate, cutout, distributed, rank, world_size)
    paths = beton_paths(data_dir)
    device = torch.device(device)
    if not augment:
        flip, translate, cutout = False, 0, 0

    if mode == "ffcv":
        from fasttrain.data.ffcv_stream import FfcvEvalLoader, FfcvTrainLoader, check_process_group

        if distributed:
            check_process_group(rank, world_size)
        train = FfcvTrainLoader(
            paths["train"],
            batch_size=batch_size,
            workers=workers,
            device=device,
            flip=flip,
            translate=translate,
            cutout=cutout,
            seed=seed,
            distributed=distributed,
            world_size=world_size,
            channels_last=channels_last,
            drop_last=drop_last,
        )
        evaluation = FfcvEvalLoader(
            paths["test"],
            batch_size=eval_batch_size,
            workers=workers,
            device=device,
            distributed=distributed,
            rank=rank,
            world_size=world_size,
            channels_last=channels_last,
        )
        return train, evaluation

    from fasttrain.data.gpu_resident import GpuEvalLoader, GpuTrainLoader, read_beton

    def on_device(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = read_beton(paths[split], workers)
        return images.to(device), labels.to(device)

    train = GpuTrainLoader(
        *on_device("train"),
        batch_size=batch_size,
        device=device,
        flip=flip,
        translate=translate,
        cutout=cutout,
        seed=seed,
        distributed=distributed,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
        drop_last=drop_last,
    )
    evaluation = GpuEvalLoader(
        *on_device("test"),
        batch_size=eval_batch_size,
        device=device,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
    )
    return train, evaluation
