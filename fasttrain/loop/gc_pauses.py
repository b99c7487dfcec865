"""Python's garbage collector during the timed part of a run: kept cheap, and counted.

A full collection walks every object the process holds: after the trainer's imports about 325,000, 158 ms on this
project's CPUs (Python 3.11, torch 2.14; 133 ms under the GPU image's Python 3.12 and torch 2.11), a tenth of an
airbench run on a GPU, on one rank while the others wait at the next collective. `frozen_heap` freezes what exists once
the run is set up (`gc.freeze`: later collections skip it; a full collection then took under 0.01 ms) and unfreezes it
when the run ends, so that what a finished run leaves in reference cycles (a repeat's model, say) can still be
collected. `GcPauses` counts the collections inside the spans it is entered for (the epochs, the final evaluation), by
generation, and their seconds: the summary's `gc_collections`, `gc_pause_s`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager


class GcPauses:
    """Collections and their seconds while entered (`with pauses: ...`); collections outside are ignored."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]  # by generation: 2 is a full collection
        self.seconds = 0.0
        self._counting = False
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        self._counting = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._counting = False

    def callback(self, phase: str, info: dict) -> None:
        """For `gc.callbacks`: a collection's start and stop."""
        if phase == "start":
            self._started = time.perf_counter()
        elif self._counting:
            self.collections[info["generation"]] += 1
            self.seconds += time.perf_counter() - self._started


@contextmanager
def frozen_heap(pauses: GcPauses) -> Iterator[GcPauses]:
    """Freeze every object that exists now and let `pauses` see each collection until the block ends; then
    unfreeze. That also unfreezes what anything else froze before (Python 3.12 starts with a few hundred tuples
    frozen): a lost optimisation for them, never a leak, where keeping the run's objects frozen would be one."""
    gc.freeze()
    gc.callbacks.append(pauses.callback)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(pauses.callback)
        gc.unfreeze()
