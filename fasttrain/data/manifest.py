"""manifest.json: what a data directory holds, how it is written (`write_manifest`) and read, `verify`, the check
the trainer runs before using it, and where the loaders find the files (`beton_paths`) and their fields
(`field_names`).

Layout of a data directory converted by fasttrain: train.beton, test.beton, manifest.json. For existing .beton files
given as the source (fasttrain.data.betons) it holds manifest.json only, and the manifest names the user's files by
absolute path. The manifest records the source, the subset, the classes, the image shape, the field names, per-split
and per-class counts, and each .beton's file, size and sha256.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Any

from fasttrain.errors import DatasetError
from fasttrain.files import read_json, write_json

MANIFEST_NAME = "manifest.json"
BETON_NAMES = {"train": "train.beton", "test": "test.beton"}
DEFAULT_FIELD_NAMES = {"image": "image", "label": "label"}
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


def write_manifest(data_dir: Path, manifest: dict[str, Any]) -> None:
    """Write `data_dir`/manifest.json durably and all at once (fasttrain.files' JSON policy)."""
    write_json(Path(data_dir) / MANIFEST_NAME, manifest, indent=2)


def read_manifest(data_dir: Path) -> dict[str, Any]:
    path = data_dir / MANIFEST_NAME
    try:
        manifest = read_json(path)
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
    if not _has_manifest_shape(manifest):
        raise DatasetError(
            f"{path} is not a fasttrain manifest; reconvert with "
            f"`{convert_command('cifar10', data_dir, force=True)}` (or --source PATH for a local copy)"
        )
    return manifest


def _has_manifest_shape(manifest: Any) -> bool:
    """An object whose parts the readers below look into are objects too (a hand edit may break that)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        return False
    parts = [*manifest["splits"].values(), manifest.get("source", {}), manifest.get("field_names", {})]
    return all(isinstance(part, dict) for part in parts)


def _recreate_command(data_dir: Path, manifest: dict[str, Any]) -> str:
    source = manifest.get("source", {})
    # Existing .beton files are named by their absolute paths, so the command works from any directory.
    given = source.get("path") if source.get("kind") == "beton" else source.get("given", "cifar10")
    return convert_command(given or "cifar10", data_dir, manifest.get("subset"), force=True)


def _split_file(data_dir: Path, manifest: dict[str, Any], split: str) -> Path:
    """A split's .beton: the manifest's `file`, relative to `data_dir` unless absolute (the user's own files)."""
    return data_dir / manifest["splits"].get(split, {}).get("file", BETON_NAMES[split])


def beton_paths(data_dir: Path | str) -> dict[str, Path]:
    """{"train": path, "test": path}: the .beton files the loaders read, through the manifest when there is one."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir) if (data_dir / MANIFEST_NAME).exists() else None
    paths = {
        split: _split_file(data_dir, manifest, split) if manifest else data_dir / name
        for split, name in BETON_NAMES.items()
    }
    for path in paths.values():
        if not path.is_file():
            if manifest:
                fix = f"`{_recreate_command(data_dir, manifest)}`"
            else:
                fix = f"`{convert_command('cifar10', data_dir)}` (or --source PATH for a local copy)"
            raise DatasetError(f"{path} is missing; convert the data set with {fix}")
    return paths


def field_names(data_dir: Path | str) -> dict[str, str]:
    """{"image": name, "label": name}: the .beton fields holding the images and the labels (the user's names for
    existing files; `image` and `label` in files fasttrain wrote, and when there is no manifest)."""
    data_dir = Path(data_dir)
    if not (data_dir / MANIFEST_NAME).exists():
        return dict(DEFAULT_FIELD_NAMES)
    return {**DEFAULT_FIELD_NAMES, **read_manifest(data_dir).get("field_names", {})}


def loader_pipelines(
    data_dir: Path | str, split: str, image_ops: list, label_ops: list
) -> tuple[dict[str, list | None], bool]:
    """(`pipelines` for ffcv's Loader over `split`, image_first). The pipelines decode the image field with
    `image_ops` and the label field with `label_ops` under the file's own field names, and disable every other field
    (ffcv would otherwise yield it too). ffcv yields fields in the file's order: image_first is False when the
    Loader yields (labels, images)."""
    data_dir = Path(data_dir)
    names = field_names(data_dir)
    fields = list(DEFAULT_FIELD_NAMES.values())
    if (data_dir / MANIFEST_NAME).exists():
        fields = read_manifest(data_dir)["splits"].get(split, {}).get("fields", fields)
    pipelines: dict[str, list | None] = {name: None for name in fields}
    pipelines |= {names["image"]: image_ops, names["label"]: label_ops}
    return pipelines, fields.index(names["image"]) < fields.index(names["label"])


def verify(data_dir: Path | str) -> dict[str, Any]:
    """Check that `data_dir` holds a complete data set: manifest present, each .beton's size and sha256 as recorded.

    Returns the manifest. Raises DatasetError naming the bad file and the exact command that recreates the directory
    (for the user's own .beton files: that records them again).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(
            f"no data set at {data_dir}: set --data.source (cifar10, or a local CIFAR-10 archive/folder) so the "
            f"trainer converts it, or run `{convert_command('cifar10', data_dir)}` (--source PATH for a local copy)"
        )
    manifest = read_manifest(data_dir)
    rerun = _recreate_command(data_dir, manifest)
    for split in BETON_NAMES:
        path = _split_file(data_dir, manifest, split)
        expected = manifest["splits"].get(split, {})
        external = Path(expected.get("file", "")).is_absolute()
        if not path.is_file():
            where = f" (recorded in {data_dir / MANIFEST_NAME})" if external else ""
            raise DatasetError(f"{path} is missing{where}; recreate the data set with `{rerun}`")
        size = path.stat().st_size
        if external:  # a user's own file, read in place: changed, not damaged
            if size != expected.get("bytes") or sha256_file(path) != expected.get("sha256"):
                raise DatasetError(
                    f"{path} has changed since {data_dir / MANIFEST_NAME} recorded it (size or sha256 differ); "
                    f"if you replaced it on purpose, record it again with `{rerun}`"
                )
            continue
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
