"""The one place fasttrain imports ffcv, with two fixes for what ffcv does to every process that imports it.

Threads: ffcv 1.0.2 calls `torch.set_num_threads(1)` when imported, and `torch.set_num_threads(num_workers)`
whenever a Loader is built or iterated (ffcv.pipeline.compiler.Compiler.set_num_threads). The trainer's own CPU ops
would then run on as many threads as the loader has workers; `torch_threads_kept` restores the caller's setting.

Compile time: ffcv compiles with numba in every process, and numba keeps nothing between processes unless asked.
Importing ffcv builds a numba typed Dict (about 3.5 s of compiling on a 2-core VM) and each Loader compiles its
decoders and augmentations (about 10 s there). `keep_numba_compiles` turns on numba's on-disk cache for them, so a
process after the first loads that machine code in under a second (see its docstring for what keys an entry).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # not POSIX: numba's cache stays off (see cache_lock)
    fcntl = None


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@contextmanager
def cache_lock(cache_dir: str, exclusive: bool) -> Iterator[None]:
    """A lock on one numba cache directory, across processes. numba's save reads the index, takes the next free
    data-file number, then writes index and data, unlocked: two processes saving other settings of one function at
    once can pair one's key with the other's code. Saves therefore hold the lock alone, loads share it."""
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, "fasttrain.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield  # closing the file releases the lock


def cache_on_disk(dispatcher: Any) -> bool:
    """Turn on numba's on-disk cache for one jitted function; returns whether it is on.

    numba keys an entry by the function's bytecode, the values its closure holds (an augmentation's settings; for
    ffcv's parallel operations also `range` or `prange`, so workers=1 and workers>1 get their own entries), the
    argument types, the CPU and numba's version, and drops the entries when the source file changes. It does not
    key target options or global variables: ffcv's are constants, and its `parallel` flag follows the closure's
    `prange`. numba refuses to save code that holds a process's pointers: ffcv's JPEG decoder calls C through one,
    so it, and the pipeline stage ffcv builds with exec, compile in every process.

    numba looks for a writable place in NUMBA_CACHE_DIR, then beside the source, then in the user's cache
    (~/.cache/numba); with none, or without fcntl, the cache stays off. A cache that cannot be read or written
    (a damaged file, a full disk) costs the compile, never the run; a damaged index is started afresh."""
    py_func = getattr(dispatcher, "py_func", None)
    if fcntl is None or py_func is None or not py_func.__code__.co_filename:
        return False
    try:
        dispatcher.enable_caching()
        cache = dispatcher._cache
        cache_dir = cache.cache_path
    except (RuntimeError, OSError, AttributeError):  # "no locator available", an unreadable source, an older numba
        return False
    load, save = cache.load_overload, cache.save_overload

    def load_or_compile(*args: Any) -> Any:
        try:
            with cache_lock(cache_dir, exclusive=False):
                return load(*args)
        except OSError:  # unreadable now (a permission, too many open files): compile; None means "not cached"
            return None
        except Exception:  # a damaged entry: start this function's index afresh, and compile
            with contextlib.suppress(Exception), cache_lock(cache_dir, exclusive=True):
                cache.flush()
            return None

    def save_or_skip(*args: Any) -> None:
        with contextlib.suppress(Exception), cache_lock(cache_dir, exclusive=True):
            save(*args)  # failing (a full disk, a damaged index), the code runs; it is only not kept

    cache.load_overload, cache.save_overload = load_or_compile, save_or_skip
    return True


def keep_numba_compiles() -> None:
    """numba's typed Dict functions (compiled by ffcv's import, ffcv.fields.rgb_image.IMAGE_MODES) and everything
    ffcv compiles through its Compiler, cached on disk (`cache_on_disk`). Call before ffcv is first imported."""
    from numba.core.errors import NumbaWarning
    from numba.typed import typeddict

    # numba's note, in every process, that it will not cache ffcv's JPEG decoder (a C pointer): nothing to act on
    warnings.filterwarnings("ignore", "Cannot cache compiled function", NumbaWarning, module=r".*ffcv")
    for name in ("_make_dict", "_setitem", "_getitem"):
        cache_on_disk(getattr(typeddict, name, None))
    from ffcv.pipeline.compiler import Compiler

    compile_uncached: Callable = Compiler.compile.__func__
    if getattr(compile_uncached, "keeps_numba_compiles", False):
        return

    @functools.wraps(compile_uncached)
    def compile_cached(cls, code, signature=None):
        compiled = compile_uncached(cls, code)  # lazy, so the cache is on before the first compile
        if cache_on_disk(compiled) and signature is not None:
            compiled.compile(signature)  # what numba's njit(signature) does: that signature now, no other later
            compiled.disable_compile()
        elif signature is not None:
            compiled = compile_uncached(cls, code, signature)
        return compiled

    compile_cached.keeps_numba_compiles = True
    Compiler.compile = classmethod(compile_cached)


with torch_threads_kept():
    keep_numba_compiles()
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
    "cache_on_disk",
    "keep_numba_compiles",
    "torch_threads_kept",
]
