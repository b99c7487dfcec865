"""The one place fasttrain imports ffcv, and a guard for the torch thread count ffcv changes behind our back.

ffcv 1.0.2 calls `torch.set_num_threads(1)` when imported, and `torch.set_num_threads(num_workers)` whenever a
Loader is built or iterated (ffcv.pipeline.compiler.Compiler.set_num_threads). The trainer's own CPU ops would
then run on as many threads as the loader has workers; `torch_threads_kept` restores the caller's setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


with torch_threads_kept():
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader
    from ffcv.transforms import Cutout, RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor, ToTorchImage
    from ffcv.writer import DatasetWriter

__all__ = [
    "Cutout",
    "DatasetWriter",
    "IntDecoder",
    "IntField",
    "Loader",
    "OrderOption",
    "RGBImageField",
    "RandomHorizontalFlip",
    "RandomTranslate",
    "Reader",
    "SimpleRGBImageDecoder",
    "Squeeze",
    "ToDevice",
    "ToTensor",
    "ToTorchImage",
    "torch_threads_kept",
]
