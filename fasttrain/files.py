"""Durable, all-or-nothing file writes: what every writer in fasttrain (data, checkpoints, metrics) relies on."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a directory after a rename inside it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file below `path`, then `path` itself."""
    for root, _, files in os.walk(path):
        for name in files:
            fsync_path(Path(root) / name)
    fsync_path(path)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block has written it, move it over `path`, so readers (and a
    crash) see either the old or the new content, never half.

    The temporary file is created normally (not with mkstemp's 0600), so the result gets the usual permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
