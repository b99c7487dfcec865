"""Durable, all-or-nothing file writes, how a failed write is recognised, and the one JSON policy every fasttrain
file follows.

JSON: non-finite floats are written as the strings "NaN", "Infinity" and "-Infinity" (the spelling wandb uses), so
every file is strict JSON that any tool can parse and a diverged loss is not confused with a missing value;
`from_json_safe` turns them back into floats. Numpy and torch scalars are written as plain numbers, paths as strings.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

_NON_FINITE_TO_TEXT = {math.inf: "Infinity", -math.inf: "-Infinity"}
_TEXT_TO_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def to_json_safe(value: Any) -> Any:
    """`value` with non-finite floats spelled as strings and array/tensor scalars unwrapped."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return _NON_FINITE_TO_TEXT.get(value, value)
    if isinstance(value, dict):
        return {str(key): to_json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(item) for item in value]
    if hasattr(value, "item"):  # numpy / torch scalars
        return to_json_safe(value.item())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} as JSON")


def from_json_safe(value: Any) -> Any:
    """The inverse of `to_json_safe` for what JSON parsing returns."""
    if isinstance(value, str):
        return _TEXT_TO_NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {key: from_json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json_safe(item) for item in value]
    return value


def dumps(value: Any, indent: int | None = None) -> str:
    """Strict JSON text of `value` under the policy above."""
    separators = None if indent else (",", ":")
    return json.dumps(to_json_safe(value), allow_nan=False, indent=indent, separators=separators)


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
    """Yield a temporary path beside `path`; once the block has written it, fsync it, move it over `path` and fsync
    the directory (so the rename itself survives a crash): readers and a crash see either the old or the new
    content, never half.

    The temporary file is created normally (not with mkstemp's 0600), so the result gets the usual permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temp
        if temp.exists():
            fsync_path(temp)
        os.replace(temp, path)
        fsync_path(path.parent)
    finally:
        with suppress(OSError):  # a read-only file system refuses this too: the write's own error is the one to see
            temp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` durably and all at once."""
    with replacing(path) as temp:
        temp.write_text(text, encoding="utf-8")


def read_json(path: Path) -> Any:
    """The JSON in `path` with the policy's non-finite spellings read back as floats (OSError, ValueError as
    `json.loads` and `read_bytes` raise them)."""
    return from_json_safe(json.loads(Path(path).read_bytes()))


def write_json(path: Path, value: Any, indent: int = 1) -> None:
    """Write `value` as strict JSON (see the module docstring) to `path`, durably and all at once."""
    write_text(path, dumps(value, indent=indent) + "\n")


def nearest_existing(path: Path) -> Path:
    """`path` itself or its nearest parent that exists (in the end `/` or `.`): where a directory at `path` would be
    made. os.path, not Path: on Python <= 3.12 Path.exists() raises where a parent cannot be searched."""
    return next((p for p in (path, *path.parents) if os.path.exists(p)), Path(path.anchor or "."))


# A full disk, as the writers below fasttrain report it: safetensors says "I/O error", torch's zip writer (torch.save)
# fails an internal check.
_TORCH_SAVE_FAILURE_TEXT = ("PytorchStreamWriter", "inline_container")
_WRITE_FAILURE_TEXT = ("I/O error", *_TORCH_SAVE_FAILURE_TEXT)


def is_write_failure(error: BaseException) -> bool:
    """Whether `error` is a file write that failed (a full disk, a read-only file system...), whoever raised it."""
    return isinstance(error, OSError) or any(text in str(error) for text in _WRITE_FAILURE_TEXT)


def os_error_text(error: OSError) -> str:
    """An OSError in a few words: "No space left on device (path)"."""
    if not error.strerror:
        return str(error) or type(error).__name__
    return f"{error.strerror} ({error.filename})" if error.filename else error.strerror


def write_failure_reason(error: BaseException) -> str:
    """What a failed write says, in a few words: "No space left on device (path)" for an OSError."""
    if isinstance(error, OSError) and error.strerror:
        return os_error_text(error)
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__  # later lines: a C++ stack, if any
    if any(marker in text for marker in _TORCH_SAVE_FAILURE_TEXT):
        return f"torch.save could not write its file, most likely for lack of space ({first_line})"
    return first_line
