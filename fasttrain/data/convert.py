"""Convert CIFAR-10 from any supported source into ffcv .beton files plus a manifest, once.

    fasttrain convert --source SRC --out DIR [--subset N] [--force] [--cache-dir D]
    python -m fasttrain.data.convert ...   (the same; what the trainer runs in its child process)

SRC: `cifar10` (torchvision download), a cifar-10-batches-py folder or cifar-10-python.tar.gz, or an ImageFolder
tree train/<class>/*, test/<class>/* as a folder or .tar/.tar.gz/.tgz archive (see fasttrain.data.sources, which
also defines --subset exactly). DIR receives train.beton and test.beton (ffcv's DatasetWriter: field `image`, an
RGBImageField stored raw, i.e. lossless; field `label`, an IntField) and manifest.json (fasttrain.data.manifest).

SRC may also be existing ffcv .beton files, `TRAIN.beton,TEST.beton` or a folder holding a train and a test/val
.beton (fasttrain.data.betons has the naming rule). Nothing is converted then: their fields are checked, and DIR
receives only manifest.json, naming the files by absolute path with their sizes, sha256 and field names. The
user's files and their folder are only read; training reads the files where they are. --subset does not apply.

The conversion is atomic: everything is written and fsynced in a temporary sibling directory that is then renamed
to DIR, so DIR is either absent or complete. Rerunning with the same source and subset reuses DIR (after checking
its checksums); a DIR made from something else is an error unless --force replaces it.

Run it in a process that is not also iterating an ffcv Loader: DatasetWriter forks, and a fork taken while numba
compiles in another thread hangs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import fasttrain
from fasttrain.data import betons, sources
from fasttrain.data.manifest import (
    BETON_NAMES,
    MANIFEST_NAME,
    convert_command,
    read_manifest,
    same_source,
    sha256_file,
    verify,
    write_manifest,
)
from fasttrain.errors import EXIT_OK, DatasetError, exit_process, run_command
from fasttrain.files import fsync_path, nearest_existing

SUBSET_RULE = (
    "the first N // C images of each class in source order, one more for the first N % C classes "
    "(sorted class order); kept images stay in source order"
)


class _ArrayDataset:
    """The indexable DatasetWriter's worker processes read (inherited through fork, not copied)."""

    def __init__(self, split: sources.Split):
        self.images, self.labels = split.images, split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


PAGE_BYTES = 1 << 21  # 2 MiB pages (ffcv's minimum) rather than its 8 MiB default: each worker pads its last page


def _writer_count(split: sources.Split) -> int:
    return max(1, min(8, os.cpu_count() or 1, len(split.labels) // 5000 + 1))


def _beton_bytes_at_most(split: sources.Split) -> int:
    """An upper bound on the size of a split's .beton: raw pixels, a generous allowance for ffcv's per-sample
    metadata and allocation table, every worker's padded last page, and the header."""
    per_image = int(np.prod(split.images.shape[1:])) + 128
    return len(split.labels) * per_image + (_writer_count(split) + 1) * PAGE_BYTES


def _check_free_space(folder: Path, dataset: sources.Dataset) -> None:
    """ffcv's writer hangs, rather than fails, when a worker process runs out of disk: check before writing."""
    needed = sum(_beton_bytes_at_most(dataset.splits[split]) for split in BETON_NAMES)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DatasetError(
            f"converting needs up to {needed / 1e6:.0f} MB free in {folder}, and {free / 1e6:.0f} MB are: free "
            f"some space there, or choose an --out (--data.dir) on another disk"
        )


def _write_beton(path: Path, split: sources.Split, progress: bool) -> None:
    from fasttrain.data.ffcv_compat import DatasetWriter, IntField, RGBImageField

    writer = DatasetWriter(
        str(path),
        {"image": RGBImageField(write_mode="raw"), "label": IntField()},
        page_size=PAGE_BYTES,
        num_workers=_writer_count(split),
    )
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())  # ffcv's own bar
    with quiet:
        writer.from_indexed_dataset(_ArrayDataset(split), chunksize=1000)


def _manifest(source: str, dataset: sources.Dataset, subset: int | None, folder: Path) -> dict[str, Any]:
    splits = {}
    for split, name in BETON_NAMES.items():
        data = dataset.splits[split]
        splits[split] = {
            "file": name,
            "count": int(len(data.labels)),
            "per_class": sources.per_class_counts(data.labels, dataset.classes),
            "bytes": (folder / name).stat().st_size,
            "sha256": sha256_file(folder / name),
        }
    return {
        "source": {"given": source, "kind": dataset.kind, "path": dataset.path},
        "subset": subset,
        "subset_rule": SUBSET_RULE if subset is not None else None,
        "classes": dataset.classes,
        "image_shape": list(sources.IMAGE_SHAPE),
        "fields": {"image": "RGBImageField, raw (lossless) uint8 HWC", "label": "IntField, index into classes"},
        "field_names": {"image": "image", "label": "label"},
        "splits": splits,
        **_stamp(),
    }


def _stamp() -> dict[str, str]:
    return {
        "fasttrain_version": fasttrain.__version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _check_beton_request(ref: sources.SourceRef, out: Path, subset: int | None) -> None:
    if subset is not None:
        raise DatasetError(
            f"--subset does not apply to existing .beton files ({ref.given}): they are read whole, in place; "
            f"drop --subset (--data.subset), or convert an image source such as a .tar.gz with --subset"
        )
    folders = {path.parent for path in ref.betons.values()}
    if out.resolve() in folders:
        raise DatasetError(
            f"--out {out} is the folder of your .beton files, and fasttrain never writes there; "
            f"choose another --out (it will hold only manifest.json)"
        )


def _beton_manifest(source: str, ref: sources.SourceRef) -> dict[str, Any]:
    """The manifest of the user's own .beton files, after checking their fields (fasttrain.data.betons)."""
    checked = {split: betons.inspect(path) for split, path in ref.betons.items()}
    train, test = checked["train"], checked["test"]
    if (train.image_field, train.label_field) != (test.image_field, test.label_field):
        raise DatasetError(
            f"{train.path} keeps images and labels in fields `{train.image_field}`/`{train.label_field}` but "
            f"{test.path} in `{test.image_field}`/`{test.label_field}`; fasttrain reads both files with the same "
            f"field names: write them with the same ones"
        )
    splits = {
        split: {
            "file": str(split_file.path),
            "fields": split_file.fields,
            "count": split_file.count,
            "per_class": split_file.per_class,
            "bytes": split_file.path.stat().st_size,
            "sha256": sha256_file(split_file.path),
        }
        for split, split_file in checked.items()
    }
    return {
        "source": {"given": source, "kind": "beton", "path": ref.identity},
        "subset": None,
        "subset_rule": None,
        "classes": list(betons.CIFAR10_CLASSES),
        "image_shape": list(sources.IMAGE_SHAPE),
        "fields": {
            "image": f"RGBImageField `{train.image_field}` of the user's file, 32x32",
            "label": f"IntField `{train.label_field}` of the user's file, index into classes",
        },
        "field_names": {"image": train.image_field, "label": train.label_field},
        "splits": splits,
        **_stamp(),
    }


def _check_destination(
    out: Path, source: str, ref: sources.SourceRef, subset: int | None, force: bool
) -> dict[str, Any] | None:
    """The existing manifest if `out` already holds this conversion; None if `out` may be (re)written."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DatasetError(f"--out {out} exists and is not a directory; choose another --out")
    contents = {p.name for p in out.iterdir()}
    if not contents:
        return None
    if MANIFEST_NAME not in contents:
        if force and contents <= {MANIFEST_NAME, *BETON_NAMES.values()}:
            return None
        raise DatasetError(
            f"--out {out} is a non-empty directory without {MANIFEST_NAME}, so not a fasttrain "
            f"data set; choose a new or empty --out (nothing there was touched)"
        )
    if force:
        return None
    try:
        manifest = read_manifest(out)
    except DatasetError as e:
        raise DatasetError(f"{e}; to replace it: `{convert_command(source, out, subset, force=True)}`") from None
    if same_source(manifest, ref.kind, ref.identity, subset):
        return manifest
    old = manifest.get("source", {})
    raise DatasetError(
        f"{out} holds a data set converted from {old.get('given')!r} ({old.get('kind')}) with subset "
        f"{manifest.get('subset')}, not from {source!r} with subset {subset}; pass --force to replace it "
        f"(`{convert_command(source, out, subset, force=True)}`) or choose another --out"
    )


def _check_writable_parent(out: Path) -> None:
    """Make `out`'s parent if missing and check that a directory can be made in it (where the conversion is built)."""
    probe = out.parent / f".{out.name}.probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        existing = nearest_existing(out.parent)
        if not os.path.isdir(existing):
            raise DatasetError(f"--out {out}: {existing} is a file, not a directory; choose another --out") from None
        raise DatasetError(
            f"--out {out}: cannot write in {out.parent} ({e.strerror}); choose a writable --out"
        ) from None


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished `tmp` to `out`; with force, swap out an existing `out` and delete it afterwards."""
    try:
        os.rename(tmp, out)  # atomic; also replaces an empty directory
    except OSError:
        if not force:
            raise DatasetError(
                f"{out} appeared while converting (a concurrent conversion?); nothing was "
                f"replaced: rerun the same command to reuse it, or add --force"
            ) from None
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(out.parent)


def convert(
    source: str,
    out: str | Path,
    subset: int | None = None,
    force: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert `source` into `out`/{train,test}.beton and manifest.json; returns the manifest (see module doc)."""
    start = time.perf_counter()
    out = Path(out).expanduser().absolute()
    ref = sources.resolve(source)
    if ref.kind == "beton":
        _check_beton_request(ref, out, subset)
    existing = _check_destination(out, source, ref, subset, force)
    if existing is not None:
        verify(out)
        print(f"{out} already holds this conversion (source {source!r}, subset {subset}): reused, not rewritten")
        return existing
    _check_writable_parent(out)  # before minutes of decoding

    if ref.kind == "beton":
        manifest = _beton_manifest(source, ref)
        dataset = None
    else:
        dataset = sources.load(ref, subset, Path(cache_dir) if cache_dir else None, progress)
    if dataset is not None:
        _check_free_space(out.parent, dataset)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        if dataset is not None:
            for split, name in BETON_NAMES.items():
                _write_beton(tmp / name, dataset.splits[split], progress)
                fsync_path(tmp / name)
            manifest = _manifest(source, dataset, subset, tmp)
        write_manifest(tmp, manifest)
        fsync_path(tmp)  # the renames inside it (manifest.json's) are durable before tmp becomes `out`
        _install(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed

    if dataset is None:
        files = " and ".join(f"{s['file']} ({s['count']} {split})" for split, s in manifest["splits"].items())
        print(f"recorded {out / MANIFEST_NAME}: {files}, read in place, in {time.perf_counter() - start:.1f} s")
        return manifest
    megabytes = sum(s["bytes"] for s in manifest["splits"].values()) / 1e6
    counts = ", ".join(f"{s['count']} {split}" for split, s in manifest["splits"].items())
    print(f"wrote {out}: {counts} images ({dataset.kind}), {megabytes:.1f} MB, in {time.perf_counter() - start:.1f} s")
    return manifest


def command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fasttrain convert", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        default="cifar10",
        help="cifar10 (torchvision download), a cifar-10-batches-py folder, cifar-10-python.tar.gz, "
        "an ImageFolder train/ test/ tree as a folder or .tar/.tar.gz/.tgz, or existing ffcv files as "
        "TRAIN.beton,TEST.beton or a folder holding a *train* and a *test*/*val* .beton (default: cifar10)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="directory to create (train.beton, test.beton, manifest.json; only manifest.json for .beton sources)",
    )
    parser.add_argument(
        "--subset",
        type=int,
        default=None,
        help="keep N images per split (train and test): " + SUBSET_RULE.replace("%", "%%"),
    )
    parser.add_argument("--force", action="store_true", help="replace an --out converted from another source/subset")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"torchvision download cache for --source cifar10 (default {sources.DEFAULT_CACHE_DIR})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    convert(
        args.source, args.out, subset=args.subset, force=args.force, cache_dir=args.cache_dir, progress=not args.quiet
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("fasttrain convert", command, argv)


if __name__ == "__main__":
    exit_process(main())
