"""manifest.json: what a converted data directory holds, and `verify`, the check the trainer runs before using it.

Layout of a data directory: train.beton, test.beton, manifest.json. The manifest records the source, the subset,
the classes, the image shape, per-split and per-class counts, and each .beton's size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

from fasttrain.errors import DatasetError

MANIFEST_NAME = "manifest.json"
BETON_NAMES = {"train": "train.beton", "test": "test.beton"}
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def convert_args(source: str, data_dir: Path | str, subset: int | None = None, force: bool = False) -> list[str]:
    """The arguments of `python -m fasttrain.data.convert` that (re)create `data_dir` from `source`."""
    args = ["--source", str(source), "--out", str(data_dir)]
    if subset is not None:
        args += ["--subset", str(subset)]
    if force:
        args.append("--force")
    return args


def convert_command(source: str, data_dir: Path | str, subset: int | None = None, force: bool = False) -> str:
    """The shell command that (re)creates `data_dir` from `source`."""
    return shlex.join(["python", "-m", "fasttrain.data.convert", *convert_args(source, data_dir, subset, force)])


def same_source(manifest: dict[str, Any], kind: str, path: str | None, subset: int | None) -> bool:
    """Whether `manifest` was made from this source (torchvision's download, or the same resolved path) and subset."""
    source = manifest.get("source", {})
    if manifest.get("subset") != subset:
        return False
    if kind == "torchvision":
        return source.get("kind") == "torchvision"
    return source.get("kind") != "torchvision" and source.get("path") == path


def read_manifest(data_dir: Path) -> dict[str, Any]:
    path = data_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(
            f"{path} is missing, so {data_dir} is not a converted data set; convert into it with "
            f"`{convert_command('cifar10', data_dir, force=True)}` (or --source PATH for a local copy)"
        ) from None
    except (OSError, ValueError) as e:
        raise DatasetError(
            f"{path} is unreadable ({e}); reconvert with "
            f"`{convert_command('cifar10', data_dir, force=True)}` (or --source PATH for a local copy)"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DatasetError(
            f"{path} is not a fasttrain manifest; reconvert with "
            f"`{convert_command('cifar10', data_dir, force=True)}` (or --source PATH for a local copy)"
        )
    return manifest


def verify(data_dir: Path | str) -> dict[str, Any]:
    """Check that `data_dir` holds a complete conversion: manifest present, each .beton's size and sha256 as recorded.

    Returns the manifest. Raises DatasetError naming the bad file and the exact command that recreates the directory.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(
            f"no data set at {data_dir}: set --data.source (cifar10, or a local CIFAR-10 archive/folder) so the "
            f"trainer converts it, or run `{convert_command('cifar10', data_dir)}` (--source PATH for a local copy)"
        )
    manifest = read_manifest(data_dir)
    source = manifest.get("source", {}).get("given", "cifar10")
    rerun = convert_command(source, data_dir, manifest.get("subset"), force=True)
    for split, name in BETON_NAMES.items():
        path = data_dir / name
        expected = manifest["splits"].get(split, {})
        if not path.is_file():
            raise DatasetError(f"{path} is missing; recreate the data set with `{rerun}`")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise DatasetError(
                f"{path} has {size} bytes but its manifest records {expected.get('bytes')} (truncated or replaced); "
                f"recreate the data set with `{rerun}`"
            )
        if sha256_file(path) != expected.get("sha256"):
            raise DatasetError(
                f"{path} does not match the sha256 in its manifest (corrupted); recreate the data set with `{rerun}`"
            )
    return manifest
