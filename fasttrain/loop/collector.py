"""Python's garbage collector during the timed part of a run: kept cheap, and counted.

A full collection walks every object the process holds: after the trainer's imports about 325,000, 158 ms on this
project's CPUs (Python 3.11, torch 2.14; 133 ms under the GPU image's Python 3.12 and torch 2.11), a tenth of an
airbench run on a GPU, on one rank while the others wait at the next collective. `frozen_heap` collects once, then
freezes what is left when the run is set up (`gc.freeze`: later collections skip it; a full collection then took
under 0.01 ms), and unfreezes it when the run ends. The collection first frees what earlier runs of the process
left in reference cycles (a repeat's model), which freezing would otherwise keep for the whole run. `GcCounts` counts
the collections, by generation, inside the spans it is entered for (the epochs, the final evaluation): the
summary's `gc_collections`. It reads gc.get_stats() at each span's ends rather than timing each collection with a
gc callback: a signal arriving inside a callback raises there, and the collector swallows the exception (a second
Ctrl-C would be lost).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def collections_so_far() -> list[int]:
    """Collections of each generation since the process started (2: full collections)."""
    return [generation["collections"] for generation in gc.get_stats()]


class GcCounts:
    """Collections by generation while entered (`with counts: ...`), summed over every time it was entered."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self._at_entry = self.collections

    def __enter__(self) -> GcCounts:
        self._at_entry = collections_so_far()
        return self

    def __exit__(self, *exc: object) -> None:
        now = collections_so_far()
        self.collections = [total + n - at for total, n, at in zip(self.collections, now, self._at_entry)]


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Collect, then freeze every object that is left, until the block ends; then unfreeze. That also unfreezes what
    anything else froze before (Python 3.12 starts with a few hundred tuples frozen): a lost optimisation for them,
    never a leak, where keeping the run's objects frozen would be one."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
