"""`prepare_data`: make sure every node has the data set, then verify it. What the trainer calls before the loaders.

Each node's local main process (`accelerator.is_local_main_process`) converts `data.source` into the data directory
unless a manifest is already there, so nodes without a shared filesystem each get their own copy. It converts
under an exclusive lock on `.<dir name>.lock` beside the directory: on a shared filesystem the first node converts
while the others wait for the lock, then find the manifest and convert nothing. The lock file stays behind (removing
it could let a third process lock a file that a waiting one no longer sees); it is empty and harmless.

Conversion runs in a child process (`python -m fasttrain.data.convert`): ffcv's DatasetWriter forks, and a fork
taken while a Loader in this process compiles with numba hangs.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fasttrain.config import DataSection, default_data_dir
from fasttrain.data import betons, sources
from fasttrain.data.manifest import MANIFEST_NAME, convert_args, convert_command, same_source, verify
from fasttrain.errors import ConfigError, DatasetError, FasttrainError
from fasttrain.files import nearest_existing
from fasttrain.loop.distributed import any_rank

DEFAULT_SOURCE = DataSection.source


def data_dir_for(data: DataSection) -> Path:
    """`data.dir`, or data/<source name>; for existing .beton files data/<folder or train file name>-betons, a
    directory of fasttrain's own beside (never inside) the user's folder."""
    if data.dir:
        return Path(data.dir)
    if betons.names_betons(data.source):
        first = Path(data.source.split(",")[0].strip().rstrip("/"))
        name = first.name[: -len(betons.SUFFIX)] if first.name.lower().endswith(betons.SUFFIX) else first.name
        return Path("data") / f"{name}-betons"
    return default_data_dir(data.source, data.subset)


@contextmanager
def conversion_lock(data_dir: Path) -> Iterator[Path]:
    """Hold an exclusive fcntl lock on `.<name>.lock` beside `data_dir` (created, parents too, if missing)."""
    lock_path = data_dir.parent / f".{data_dir.name}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        existing = nearest_existing(lock_path.parent)
        if not os.path.isdir(existing):
            raise DatasetError(
                f"--data.dir {data_dir}: {existing} is a file, not a directory; choose another --data.dir"
            ) from None
        raise DatasetError(
            f"cannot create the conversion lock {lock_path} ({e.strerror}); choose a writable --data.dir"
        ) from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"fasttrain: {data_dir} is being converted by another process (lock {lock_path}); waiting")
            fcntl.lockf(fd, fcntl.LOCK_EX)
        yield lock_path
    finally:
        os.close(fd)  # releases the lock


def convert_once(data: DataSection, data_dir: Path) -> bool:
    """Convert `data.source` into `data_dir` unless it holds a manifest; under the lock. False if conversion failed."""
    if (data_dir / MANIFEST_NAME).exists():  # no lock needed (nor possible on a read-only data set)
        return True
    with conversion_lock(data_dir):
        if (data_dir / MANIFEST_NAME).exists():
            return True
        print(f"fasttrain: no dataset in {data_dir}; converting --data.source {data.source} (once)")
        # Through `python -m fasttrain convert`, which imports the converter inside its error handling: a Ctrl-C
        # while the child is still importing numpy and ffcv is one line there too, not a traceback.
        command = [sys.executable, "-m", "fasttrain", "convert", *convert_args(data.source, data_dir, data.subset)]
        return subprocess.run(command).returncode == 0


def prepare_data(data: DataSection, accelerator) -> tuple[Path, dict[str, Any]]:
    """(the data directory holding manifest.json, its verified manifest), the same on every rank.

    Converts on each node's local main process (see module doc); every rank then waits for all nodes and verifies.
    A failed conversion on any node fails every rank with a one-line message.
    """
    data_dir = data_dir_for(data)
    converted = convert_once(data, data_dir) if accelerator.is_local_main_process else True
    if any_rank(accelerator, not converted):  # also the barrier: no rank verifies before every node has converted
        if not converted:
            raise FasttrainError(f"converting --data.source {data.source} into {data_dir} failed (message above)")
        raise FasttrainError(
            f"converting --data.source {data.source} failed on another node (its message is in that node's output)"
        )
    manifest = verify(data_dir)
    if data.subset and manifest.get("subset") != data.subset:
        raise ConfigError(
            f"data.dir {data_dir} holds subset={manifest.get('subset')}, but data.subset={data.subset}: "
            f"choose another --data.dir, or rerun conversion with --force"
        )
    check_source(data, data_dir, manifest)
    return data_dir, manifest


def check_source(data: DataSection, data_dir: Path, manifest: dict[str, Any]) -> None:
    """A data directory converted from another source than `data.source` is refused, not trained on: two sources can
    share a directory (data/<name>-betons for .beton pairs of the same file names, or a --data.dir given to both).
    The default source, `cifar10`, takes whatever the directory holds: `--data.dir DIR` alone names a data set, and
    so does a source that has gone since it was converted (a deleted archive: the conversion holds every image)."""
    if data.source == DEFAULT_SOURCE:
        return
    try:
        ref = sources.resolve(data.source)
    except DatasetError:
        return
    if same_source(manifest, ref.kind, ref.identity, manifest.get("subset")):
        return
    held = manifest.get("source", {}).get("given")
    again = convert_command(data.source, data_dir, data.subset, force=True)
    raise ConfigError(
        f"data.dir {data_dir} holds a data set converted from {held!r}, not from data.source {data.source!r}: "
        f"choose another --data.dir, or convert into it again: `{again}`"
    )
