"""Existing ffcv .beton files (for example those FFCV's CIFAR example writes) as a data source, read in place.

A `--source` names them in one of two ways:
- `TRAIN.beton,TEST.beton`: the two files, training set first;
- a folder holding exactly two .beton files at its top level, one whose name has the word `train` and one whose name
  has `test`, `val`, `valid` or `validation`. Words are the file name without `.beton`, split at every character that
  is not a letter or digit, case ignored: `cifar_train.beton` and `cifar_test.beton` (FFCV's example), `train.beton`,
  `val-32px.beton` qualify; `training.beton` and `pretrain.beton` do not.

Each file must hold one ffcv RGBImageField of 32x32 images and one IntField of labels in 0..9 (CIFAR-10's classes in
their usual order), whatever the fields are called; other fields are ignored. When a file has several fields of a
kind, the one named `image` (or `label`) is taken. The files are only read: fasttrain records their names, sizes and
sha256 in a manifest inside its own data directory and trains on them where they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasttrain.errors import DatasetError

SUFFIX = ".beton"
TRAIN_WORDS = frozenset({"train"})
TEST_WORDS = frozenset({"test", "val", "valid", "validation"})
# torchvision's CIFAR10 (which FFCV's example writes from) numbers the classes in this order, which is also sorted.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SIZE = (32, 32)
NAME_RULE = (
    "one .beton whose name has the word `train` and one whose name has `test`, `val`, `valid` or `validation` "
    "(e.g. cifar_train.beton and cifar_test.beton)"
)


@dataclass(frozen=True)
class BetonSplit:
    """What fasttrain checked in one user file."""

    path: Path
    fields: list[str]  # every field of the file, in the file's order (the order ffcv's Loader yields them in)
    image_field: str
    label_field: str
    count: int
    per_class: dict[str, int]


def _is_beton(path: Path | str) -> bool:
    return str(path).lower().endswith(SUFFIX)


def names_betons(source: str) -> bool:
    """Whether `source` is meant as existing .beton files: a .beton path, a comma-joined pair, or a folder of them."""
    path = Path(source).expanduser()
    if path.is_dir():
        return any(_is_beton(p) and p.is_file() for p in path.iterdir())
    if path.exists():
        return _is_beton(path)
    return _is_beton(source) or ("," in source and any(_is_beton(part.strip()) for part in source.split(",")))


def find_pair(source: str) -> dict[str, Path]:
    """{"train": path, "test": path}, absolute, for a source that `names_betons`; raises DatasetError otherwise."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _pair_in_folder(path.resolve())
    if path.exists():
        raise DatasetError(
            f"--source {source} is one .beton file; pass the training and test files together as "
            f"TRAIN.beton,TEST.beton, or a folder holding {NAME_RULE}"
        )
    parts = [part.strip() for part in source.split(",")]
    if len(parts) != 2 or not all(_is_beton(part) for part in parts):
        raise DatasetError(
            f"--source {source!r}: give exactly two .beton files as TRAIN.beton,TEST.beton (training set first)"
        )
    pair = {}
    for split, part in zip(("train", "test"), parts):
        file = Path(part).expanduser()
        if not file.is_file():
            raise DatasetError(f"--source {source!r}: the {split} file {part} does not exist; check the path")
        pair[split] = file.resolve()
    if pair["train"] == pair["test"]:
        raise DatasetError(f"--source {source!r} names the same file twice; give the training file, then the test file")
    return pair


def _words(path: Path) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", path.name.lower()[: -len(SUFFIX)]))


def _pair_in_folder(folder: Path) -> dict[str, Path]:
    found = sorted(p for p in folder.iterdir() if _is_beton(p) and p.is_file())
    train = [p for p in found if _words(p) & TRAIN_WORDS and not _words(p) & TEST_WORDS]
    test = [p for p in found if _words(p) & TEST_WORDS and not _words(p) & TRAIN_WORDS]
    if len(found) != 2 or len(train) != 1 or len(test) != 1:
        names = ", ".join(p.name for p in found)
        raise DatasetError(
            f"{folder} holds {len(found)} .beton file(s) ({names}); a folder source needs exactly {NAME_RULE}. "
            f"Otherwise name the two files: --source TRAIN.beton,TEST.beton"
        )
    return {"train": train[0], "test": test[0]}


def _pick_field(reader, wanted: str, field_type: type, path: Path) -> str:
    """The name of the one field of `field_type` (the one called `wanted` if there are several)."""
    candidates = [name for name, handler in reader.handlers.items() if type(handler) is field_type]
    if len(candidates) == 1:
        return candidates[0]
    if wanted in candidates:
        return wanted
    fields = ", ".join(f"{name} ({type(h).__name__})" for name, h in reader.handlers.items()) or "none"
    role = "image" if wanted == "image" else "integer label"
    if not candidates:
        raise DatasetError(
            f"{path} has no {role} field (an ffcv {field_type.__name__}); its fields: {fields}. "
            f"Write it with an RGBImageField for the images and an IntField for the labels"
        )
    raise DatasetError(
        f"{path} has {len(candidates)} {field_type.__name__} fields ({', '.join(candidates)}) and none is named "
        f"`{wanted}`, so fasttrain cannot tell which holds the {role}s; rename that field to `{wanted}`"
    )


def inspect(path: Path, num_classes: int = len(CIFAR10_CLASSES)) -> BetonSplit:
    """Check one user .beton with ffcv's Reader (header and per-sample metadata only; no image is decoded)."""
    from fasttrain.data.ffcv_compat import IntField, Reader, RGBImageField

    try:
        reader = Reader(str(path))
    except Exception as e:  # a foreign file fails anywhere in the header parse: AssertionError, IndexError, ...
        raise DatasetError(
            f"{path} is not a readable ffcv .beton file ({type(e).__name__}: {e}); "
            f"pass files written by ffcv's DatasetWriter"
        ) from None
    image_field = _pick_field(reader, "image", RGBImageField, path)
    label_field = _pick_field(reader, "label", IntField, path)
    count = int(reader.num_samples)
    if count == 0:
        raise DatasetError(f"{path} holds no samples; write the data set again")

    columns = {name: f"f{i}" for i, name in enumerate(reader.handlers)}  # ffcv's metadata record is unnamed
    images = reader.metadata[columns[image_field]]
    wrong_size = np.flatnonzero((images["height"] != IMAGE_SIZE[0]) | (images["width"] != IMAGE_SIZE[1]))
    if wrong_size.size:
        first = int(wrong_size[0])
        raise DatasetError(
            f"{path}: image field `{image_field}` holds {int(images['height'][first])}x{int(images['width'][first])} "
            f"images ({wrong_size.size} of {count} are not 32x32, first at index {first}); fasttrain trains on "
            f"32x32 CIFAR-10 images and does not resize: write the .beton from 32x32 images"
        )
    labels = np.asarray(reader.metadata[columns[label_field]], dtype=np.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DatasetError(
            f"{path}: label field `{label_field}` holds values {low}..{high}, outside 0..{num_classes - 1} "
            f"(the {num_classes} CIFAR-10 classes); write the labels as class indices 0..{num_classes - 1}"
        )
    counts = np.bincount(labels, minlength=num_classes)
    per_class = {name: int(n) for name, n in zip(CIFAR10_CLASSES, counts)}
    return BetonSplit(path, list(reader.handlers), image_field, label_field, count, per_class)
