"""`build_loaders`: the training and evaluation loaders the trainer iterates, in either of two modes.

Both modes read the same converted directory (train.beton, test.beton) and promise the same things:

Training loader, `for images, labels in loader`:
- images: float32 [B,3,32,32] on `device`, normalised with the CIFAR-10 mean/std (fasttrain.data.normalize),
  channels-last if asked; labels: int64 [B] on `device`.
- order: a fresh random order each epoch, identical in both modes for the same seed (fasttrain.data.sharding);
  distributed, each rank reads a disjoint shard (padded to equal length); drop_last drops each rank's partial batch.
- augmentation (augment=True), in this order: horizontal flip (flip=True; flip_mode "random": p=0.5 per image and
  epoch, "alternating": see below), translation by up to `translate` px per axis with the uncovered border filled
  (translate_fill "zero": black, "mean": the CIFAR-10 mean colour, "reflect": the image mirrored at its edge), one
  `cutout` x `cutout` square wholly inside the image (cutout_fill "zero" or "mean"); 0 disables a step. Both modes
  draw these with ffcv's distributions (see fasttrain.data.augment). Alternating flip (airbench's) mirrors each
  image in every other epoch, and together with reflect fill exists in mode "resident" only.
- `epoch`: the epoch the next `iter()` yields; each `iter()` takes that epoch's order and then increments it,
  as ffcv's Loader.next_epoch does. Set it to resume. `len(loader)`: batches per epoch on this rank;
  `num_samples`: samples per epoch on this rank; `dataset_size`: samples in the split.
- `warm_up() -> float`: prepares the first epoch's machinery outside timing (mode "stream": ffcv's numba JIT on
  one batch; the epoch counter is restored; mode "resident": one batch augmented, so CUDA has loaded its
  kernels) and returns the seconds spent.
- `sample_images(n) -> Tensor`: the first n training images in file order, unaugmented, normalised float32
  [n,3,32,32] on `device` (format as the batches), the same on every rank: for data-dependent initialisation.
  `first_samples(n) -> (images, labels)`: the same images as uint8 with their labels, for `build_train_eval_loader`.

Evaluation loader, `for images, labels, valid in loader`: the test split in order, unaugmented, same image format.
Every batch has `batch_size` = min(eval_batch_size, samples this rank reads) samples, the last one padded, so a
compiled model sees one shape. `valid` (bool [B]) marks real samples: the last batch's padding is invalid, and mode
"stream" also pads each rank's shard as torch's DistributedSampler does and marks that invalid. Summed over
ranks, valid counts each test image exactly once. `num_samples`: real samples on this rank; `num_yielded`: samples
this rank yields, all padding included (len(loader) * batch_size).

Batches may live in buffers that the loader reuses: clone anything kept beyond the current step.

Mode "stream" (fasttrain.data.stream) streams from the .beton files and augments in ffcv's compiled CPU code;
with distributed=True ffcv shards with torch.distributed's default process group, which must exist first.
Mode "resident" (fasttrain.data.resident) holds the data set on the device and augments each epoch there at once:
the fast path on GPUs, also used on CPUs by the CPU recipe. "ffcv" and "gpu" are their former names, still accepted.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Protocol

import torch

from fasttrain.data.augment import CUTOUT_FILLS, FLIP_MODES, TRANSLATE_FILLS, Augmentation
from fasttrain.data.manifest import beton_paths, loader_pipelines
from fasttrain.errors import ConfigError

MODES = ("resident", "stream")
MODE_ALIASES = {"gpu": "resident", "ffcv": "stream"}  # former names; the one definition (config and bench import it)


class TrainLoader(Protocol):
    epoch: int
    batch_size: int
    num_samples: int
    dataset_size: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def warm_up(self) -> float: ...

    def sample_images(self, n: int) -> torch.Tensor: ...

    def first_samples(self, n: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class EvalLoader(Protocol):
    batch_size: int
    num_samples: int
    num_yielded: int
    dataset_size: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...


def canonical_mode(name: str) -> str:
    """ "resident" or "stream" for a mode name, its former names "gpu" and "ffcv" included."""
    mode = MODE_ALIASES.get(name, name)
    if mode not in MODES:
        choices = ", ".join([*MODES, *MODE_ALIASES])
        raise ConfigError(f"data.mode {name!r} is unknown; choose one of {choices}")
    return mode


def _check_arguments(
    batch_size: int,
    eval_batch_size: int,
    workers: int,
    translate: int,
    cutout: int,
    distributed: bool,
    rank: int,
    world_size: int,
) -> None:
    if batch_size < 1 or eval_batch_size < 1 or workers < 1:
        raise ConfigError(f"batch sizes and workers must be >= 1 (got {batch_size}, {eval_batch_size}, {workers})")
    if translate < 0 or not 0 <= cutout <= 32:
        raise ConfigError(f"translate must be >= 0 and cutout in [0, 32] (got {translate}, {cutout})")
    if not 0 <= rank < world_size or (not distributed and world_size != 1):
        raise ConfigError(f"rank {rank} / world_size {world_size} is impossible with distributed={distributed}")


def refuse_resident_only(mode: str, flip: bool, flip_mode: str, translate: int, translate_fill: str) -> None:
    """A ConfigError for the stream mode asked for what only the resident loader does (alternating flips, reflect
    padding) where it would take effect (flips on, translate > 0)."""
    if canonical_mode(mode) != "stream":
        return
    for key, value, wanted in (("flip_mode", flip_mode, flip), ("translate_fill", translate_fill, translate)):
        if value in ("alternating", "reflect") and wanted:
            raise ConfigError(
                f"data.{key} {value} exists only in the device-resident loader: use --data.mode resident "
                f"(or data.{key} {FLIP_MODES[0] if key == 'flip_mode' else 'zero'})"
            )


def _augmentation(
    mode: str, flip: bool, flip_mode: str, translate: int, translate_fill: str, cutout: int, cutout_fill: str
) -> Augmentation:
    for key, value, choices in (
        ("flip_mode", flip_mode, FLIP_MODES),
        ("translate_fill", translate_fill, TRANSLATE_FILLS),
        ("cutout_fill", cutout_fill, CUTOUT_FILLS),
    ):
        if value not in choices:
            raise ConfigError(f"data.{key} {value!r} is unknown; choose one of {', '.join(choices)}")
    refuse_resident_only(mode, flip, flip_mode, translate, translate_fill)
    if translate_fill == "reflect" and translate >= 32:
        raise ConfigError(f"data.translate {translate} is too large for reflect fill: use at most 31")
    return Augmentation(
        flip=flip_mode if flip else None,
        translate=translate,
        translate_fill=translate_fill,
        cutout=cutout,
        cutout_fill=cutout_fill,
    )


def build_train_eval_loader(
    train: TrainLoader, count: int, *, batch_size: int, rank: int, world_size: int, channels_last: bool
) -> EvalLoader:
    """An evaluation loader over the first `count` training images, unaugmented, in either mode: evaluated in eval
    mode like the test set, their accuracy is the train accuracy that overfitting shows in (the running accuracy of
    the training steps sees augmented images and dropout). Each rank reads its share; padding is marked invalid."""
    from fasttrain.data.resident import ResidentEvalLoader

    images, labels = train.first_samples(count)
    return ResidentEvalLoader(
        images, labels, batch_size=batch_size, device=images.device, rank=rank, world_size=world_size,
        channels_last=channels_last,
    )  # fmt: skip


def build_loaders(
    data_dir: Path | str,
    *,
    mode: str = "stream",
    batch_size: int,
    eval_batch_size: int,
    workers: int,
    device: torch.device | str,
    flip: bool = True,
    flip_mode: str = "random",
    translate: int = 2,
    translate_fill: str = "zero",
    cutout: int = 8,
    cutout_fill: str = "zero",
    seed: int = 0,
    distributed: bool = False,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = True,
    drop_last: bool = True,
    augment: bool = True,
) -> tuple[TrainLoader, EvalLoader]:
    """The (training, evaluation) loaders over `data_dir`; see the module docstring for what they yield.

    `mode`: "resident" or "stream" (or their former names "gpu", "ffcv"). `workers`: ffcv's CPU threads (mode
    "resident" uses them only for the one-time read). `augment=False` turns off flip, translate and cutout together.
    `seed` must be the same on every rank.
    """
    mode = canonical_mode(mode)
    _check_arguments(batch_size, eval_batch_size, workers, translate, cutout, distributed, rank, world_size)
    if not augment:
        flip, translate, cutout = False, 0, 0
    augmentation = _augmentation(mode, flip, flip_mode, translate, translate_fill, cutout, cutout_fill)
    paths = beton_paths(data_dir)
    device = torch.device(device)

    if mode == "stream":
        from fasttrain.data.stream import StreamEvalLoader, StreamTrainLoader, check_process_group

        if distributed:
            check_process_group(rank, world_size)
        train = StreamTrainLoader(
            paths["train"],
            fields=partial(loader_pipelines, data_dir, "train"),
            batch_size=batch_size,
            workers=workers,
            device=device,
            augmentation=augmentation,
            seed=seed,
            distributed=distributed,
            world_size=world_size,
            channels_last=channels_last,
            drop_last=drop_last,
        )
        evaluation = StreamEvalLoader(
            paths["test"],
            fields=partial(loader_pipelines, data_dir, "test"),
            batch_size=eval_batch_size,
            workers=workers,
            device=device,
            distributed=distributed,
            rank=rank,
            world_size=world_size,
            channels_last=channels_last,
        )
        return refuse_empty_epochs(train, batch_size, world_size), evaluation

    from fasttrain.data.decoded import read_split
    from fasttrain.data.resident import ResidentEvalLoader, ResidentTrainLoader, read_beton

    def on_device(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        fields = partial(loader_pipelines, data_dir, split)
        images, labels = read_split(data_dir, split, lambda: read_beton(paths[split], workers, fields=fields))
        return images.to(device), labels.to(device)

    train = ResidentTrainLoader(
        *on_device("train"),
        batch_size=batch_size,
        device=device,
        augmentation=augmentation,
        seed=seed,
        distributed=distributed,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
        drop_last=drop_last,
    )
    evaluation = ResidentEvalLoader(
        *on_device("test"),
        batch_size=eval_batch_size,
        device=device,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
    )
    return refuse_empty_epochs(train, batch_size, world_size), evaluation


def refuse_empty_epochs(train: TrainLoader, batch_size: int, world_size: int) -> TrainLoader:
    """`train`, unless an epoch of it has no batch: a loop over it would never step."""
    if len(train) == 0:
        per_process = -(-train.dataset_size // world_size)  # each rank's shard, padded to the same length
        split = f"{train.dataset_size} in the training split"
        if world_size > 1:
            split += f", over {world_size} processes; the batch size is global: {batch_size * world_size}"
        raise ConfigError(
            f"batch size {batch_size} per process is larger than the {per_process} training images each process "
            f"gets ({split}); lower the batch size or use more data"
        )
    return train
