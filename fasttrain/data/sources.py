"""Read CIFAR-10 from any supported source into memory: uint8 [N,32,32,3] images and int64 labels per split.

Sources (`resolve` decides which one a string names):
- `cifar10`: torchvision downloads the python pickles into a cache directory (reused when present).
- a `cifar-10-batches-py` folder, a folder that holds one, or `cifar-10-python.tar.gz`: the pickles, read directly.
- an ImageFolder tree `train/<class>/*.png|jpg|jpeg` and `test/<class>/...`, as a folder or a `.tar`/`.tar.gz`/`.tgz`
  archive (read in place, never extracted), optionally inside one wrapping folder.
- existing ffcv .beton files, `TRAIN.beton,TEST.beton` or a folder holding a train and a test/val .beton: not loaded
  here but checked and read in place (fasttrain.data.betons defines the rules).

Classes are numbered in sorted name order. Sample order is the source's own: for ImageFolder trees class by class,
each class's files sorted by path (torchvision's ImageFolder order); for pickles the order of the batch files.

`subset=N` keeps the first N images of each split, stratified: class k (in sorted order) keeps its first
N // C images in that sample order, plus one more for the first N % C classes; a class with fewer keeps all of
them (the manifest records the real counts). Kept images stay in source order.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasttrain.data import betons
from fasttrain.errors import DatasetError

SPLITS = ("train", "test")
IMAGE_SHAPE = (32, 32, 3)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_META_FILE = "batches.meta"
CIFAR_FILES = CIFAR_TRAIN_FILES + (CIFAR_TEST_FILE, CIFAR_META_FILE)
DEFAULT_CACHE_DIR = Path("~/.cache/fasttrain/torchvision")

OTHER_SOURCES_HINT = (
    "a local copy works offline: --source PATH with PATH a cifar-10-python.tar.gz, a cifar-10-batches-py folder, "
    "or an ImageFolder tree (train/<class>/*.png, test/<class>/*.png) as a folder or .tar/.tar.gz archive"
)


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # int64 [N]


@dataclass
class Dataset:
    kind: str  # torchvision | cifar-batches | cifar-batches-tar | imagefolder | imagefolder-tar
    path: str | None  # resolved absolute path of the source; None for torchvision's download
    classes: list[str]
    splits: dict[str, Split]


@dataclass(frozen=True)
class SourceRef:
    """What a `--source` string names, before anything is read: the identity a manifest records."""

    given: str
    kind: str  # torchvision | folder | tar | beton (folder/tar are refined into the Dataset kinds once read)
    path: Path | None
    betons: dict[str, Path] | None = None  # kind beton: the user's files, {"train": ..., "test": ...}, absolute

    @property
    def identity(self) -> str | None:
        """What the manifest records as the source's path: two sources are the same when these are equal."""
        if self.betons is not None:
            return ",".join(str(self.betons[split]) for split in SPLITS)
        return str(self.path) if self.path else None


def resolve(source: str) -> SourceRef:
    if source == "cifar10":
        return SourceRef(source, "torchvision", None)
    if betons.names_betons(source):
        return SourceRef(source, "beton", None, betons.find_pair(source))
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(
            f"data source {source!r} does not exist. Pass `cifar10` (download through torchvision) or the path of "
            f"a cifar-10-python.tar.gz, a cifar-10-batches-py folder, an ImageFolder tree/archive, "
            f"or existing ffcv files as TRAIN.beton,TEST.beton"
        )
    path = path.resolve()
    if path.is_dir():
        return SourceRef(source, "folder", path)
    if path.name.lower().endswith(TAR_SUFFIXES):
        return SourceRef(source, "tar", path)
    raise DatasetError(
        f"{path} is neither a folder nor a .tar/.tar.gz/.tgz archive: pass a folder or archive with train/ and test/ "
        f"ImageFolder trees, a cifar-10-batches-py folder or cifar-10-python.tar.gz, or `cifar10`"
    )


def load(ref: SourceRef, subset: int | None = None, cache_dir: Path | None = None, progress: bool = True) -> Dataset:
    if subset is not None and subset < 1:
        raise DatasetError(f"--subset must be a positive number of images per split, got {subset}")
    if ref.kind == "beton":
        raise ValueError("existing .beton files are read in place, not loaded: see fasttrain.data.convert")
    if ref.kind == "torchvision":
        batches_dir = download_cifar10(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser())
        files = _FolderFiles(batches_dir)
        classes, splits = _read_cifar_batches(files.read, batches_dir, subset)
        return Dataset("torchvision", None, classes, splits)
    assert ref.path is not None
    files = _FolderFiles(ref.path) if ref.kind == "folder" else _TarFiles(ref.path)
    suffix = "" if ref.kind == "folder" else "-tar"
    batches_dir = _find_cifar_batches(files.paths)
    if batches_dir is not None:
        where = ref.path / batches_dir if ref.kind == "folder" else Path(f"{ref.path}:{batches_dir}")
        read = functools.partial(_read_prefixed, files.read, batches_dir)
        classes, splits = _read_cifar_batches(read, where, subset)
        return Dataset(f"cifar-batches{suffix}", str(ref.path), classes, splits)
    classes, splits = _read_image_folder(files.paths, files.read, ref.path, subset, progress)
    return Dataset(f"imagefolder{suffix}", str(ref.path), classes, splits)


def _read_prefixed(read: Callable[[str], bytes], prefix: str, name: str) -> bytes:
    return read(prefix + name)


def download_cifar10(cache_dir: Path) -> Path:
    """torchvision's CIFAR-10 download into `cache_dir`; present and intact files are reused without network."""
    try:
        from torchvision.datasets import CIFAR10
    except ImportError:
        raise DatasetError(
            f"--source cifar10 needs torchvision (pip install torchvision); {OTHER_SOURCES_HINT}"
        ) from None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        CIFAR10(root=str(cache_dir), train=True, download=True)
    except (OSError, RuntimeError) as e:  # URLError and socket errors are OSErrors
        raise DatasetError(
            f"could not download CIFAR-10 into {cache_dir} ({type(e).__name__}: {e}); no network? {OTHER_SOURCES_HINT}"
        ) from None
    return cache_dir / CIFAR_DIR


# ---- file access: a folder and a tar archive behind the same two members (relative POSIX paths, read) ----


def _skipped(rel: str) -> bool:
    # macOS and editors leave ._foo.jpg, .DS_Store and __MACOSX/ behind, notably inside archives.
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


class _FolderFiles:
    def __init__(self, root: Path):
        self.root = root
        self.paths: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for name in sorted(filenames):
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not _skipped(rel):
                    self.paths.append(rel)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


class _TarFiles:
    """All wanted members of an archive read in one sequential pass (seeking back in a .tar.gz restarts gunzip)."""

    def __init__(self, archive: Path):
        self.data: dict[str, bytes] = {}
        try:
            with tarfile.open(archive) as tar:
                for member in tar:
                    rel = member.name.lstrip("/")
                    while rel.startswith("./"):
                        rel = rel[2:]
                    if not member.isfile() or _skipped(rel):
                        continue
                    if rel.lower().endswith(IMAGE_SUFFIXES) or rel.rsplit("/", 1)[-1] in CIFAR_FILES:
                        self.data[rel] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DatasetError(
                f"{archive} is not a readable tar archive ({e}); check the file or re-download it"
            ) from None
        self.paths = sorted(self.data)

    def read(self, rel: str) -> bytes:
        return self.data[rel]


# ---- CIFAR-10 python pickles ----


def _find_cifar_batches(paths: list[str]) -> str | None:
    """Prefix ('' or 'some/dir/') of the folder holding CIFAR batch files, at the top or one level down."""
    for rel in paths:
        parts = rel.split("/")
        if parts[-1] in CIFAR_FILES and len(parts) <= 2:
            return "".join(p + "/" for p in parts[:-1])
    return None


class _CifarUnpickler(pickle.Unpickler):
    """Loads CIFAR batch files, which hold only dicts, lists, bytes and numpy arrays: no other globals."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = module.replace("numpy.core.", "numpy._core.", 1)  # numpy >= 2 renamed the package
        return super().find_class(module, name)


def _unpickle(data: bytes, where: Path) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise DatasetError(
            f"{where} is not a CIFAR-10 python batch file ({e}); re-download cifar-10-python.tar.gz"
        ) from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where} is not a CIFAR-10 python batch file; re-download cifar-10-python.tar.gz")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar_batches(
    read: Callable[[str], bytes], where: Path, subset: int | None
) -> tuple[list[str], dict[str, Split]]:
    def read_file(name: str) -> bytes:
        try:
            return read(name)
        except (KeyError, FileNotFoundError):
            present = [n for n in CIFAR_FILES if _exists(read, n)]
            missing = [n for n in CIFAR_FILES if n not in present]
            raise DatasetError(
                f"{where} lacks CIFAR-10 batch file(s) {', '.join(missing)}; "
                f"re-download or re-extract cifar-10-python.tar.gz"
            ) from None

    meta = _unpickle(read_file(CIFAR_META_FILE), where / CIFAR_META_FILE)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    if not names:
        raise DatasetError(f"{where / CIFAR_META_FILE} has no label_names; re-download cifar-10-python.tar.gz")
    classes = sorted(names)
    to_sorted = np.array([classes.index(n) for n in names], dtype=np.int64)

    splits = {}
    for split, files in (("train", CIFAR_TRAIN_FILES), ("test", (CIFAR_TEST_FILE,))):
        images, labels = [], []
        for name in files:
            batch = _unpickle(read_file(name), where / name)
            data, batch_labels = batch.get("data"), batch.get("labels")
            if (
                not isinstance(data, np.ndarray)
                or data.dtype != np.uint8
                or data.ndim != 2
                or data.shape[1] != 32 * 32 * 3
                or batch_labels is None
                or len(batch_labels) != len(data)
            ):
                raise DatasetError(
                    f"{where / name} does not hold CIFAR-10 data (uint8 [N,3072] 'data' and N 'labels'); "
                    f"re-download cifar-10-python.tar.gz"
                )
            batch_labels = np.asarray(batch_labels, dtype=np.int64)
            if batch_labels.min(initial=0) < 0 or batch_labels.max(initial=0) >= len(names):
                raise DatasetError(f"{where / name} has labels outside 0..{len(names) - 1}; re-download it")
            # Rows are channel planes (R, G, B), each 32x32 row-major.
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(to_sorted[batch_labels])
        split_images, split_labels = np.concatenate(images), np.concatenate(labels)
        if subset is not None:
            keep = _stratified_first(split_labels, len(classes), subset)
            split_images, split_labels = split_images[keep], split_labels[keep]
        splits[split] = Split(np.ascontiguousarray(split_images), split_labels)
    return classes, splits


def _exists(read: Callable[[str], bytes], name: str) -> bool:
    try:
        read(name)
        return True
    except (KeyError, FileNotFoundError):
        return False


def _quota(subset: int, num_classes: int) -> list[int]:
    return [subset // num_classes + (1 if k < subset % num_classes else 0) for k in range(num_classes)]


def _stratified_first(labels: np.ndarray, num_classes: int, subset: int) -> np.ndarray:
    """Indices (in source order) of the first quota[k] samples of each class k."""
    quota = _quota(subset, num_classes)
    keep = [np.flatnonzero(labels == k)[: quota[k]] for k in range(num_classes)]
    return np.sort(np.concatenate(keep))


# ---- ImageFolder trees ----


def _find_root(paths: list[str], where: Path) -> str:
    def has(prefix: str, split: str) -> bool:
        return any(p.startswith(f"{prefix}{split}/") for p in paths)

    if has("", "train") and has("", "test"):
        return ""
    tops = sorted({p.split("/", 1)[0] for p in paths if "/" in p})
    if len(tops) == 1 and has(f"{tops[0]}/", "train") and has(f"{tops[0]}/", "test"):
        return f"{tops[0]}/"
    prefix = f"{tops[0]}/" if len(tops) == 1 else ""
    missing = [s for s in SPLITS if not has(prefix, s)]
    found = ", ".join(tops[:10]) or "no folders"
    raise DatasetError(
        f"{where} has no {' and no '.join(m + '/' for m in missing)} folder "
        f"(top level holds: {found}). Expected an ImageFolder tree train/<class>/<image>.png and "
        f"test/<class>/<image>.png (png/jpg/jpeg), optionally inside one wrapping folder"
    )


def _read_image_folder(
    paths: list[str], read: Callable[[str], bytes], where: Path, subset: int | None, progress: bool
) -> tuple[list[str], dict[str, Split]]:
    root = _find_root(paths, where)
    by_split: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for rel in paths:
        if not rel.startswith(root) or not rel.lower().endswith(IMAGE_SUFFIXES):
            continue
        parts = rel[len(root) :].split("/")
        if len(parts) >= 3 and parts[0] in by_split:
            by_split[parts[0]].setdefault(parts[1], []).append(rel)

    train_classes, test_classes = set(by_split["train"]), set(by_split["test"])
    for split, found in by_split.items():
        if not found:
            raise DatasetError(f"{where}: {root}{split}/ holds no class folders with .png/.jpg/.jpeg images")
    if train_classes != test_classes:
        only_train = sorted(train_classes - test_classes)
        only_test = sorted(test_classes - train_classes)
        raise DatasetError(
            f"{where}: class folders differ between {root}train/ and {root}test/ "
            f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'}); "
            f"make both splits hold the same class folders"
        )
    classes = sorted(train_classes)

    selected: dict[str, list[tuple[str, int]]] = {}
    for split in SPLITS:
        quota = _quota(subset, len(classes)) if subset is not None else [None] * len(classes)
        selected[split] = [
            (rel, label) for label, cls in enumerate(classes) for rel in sorted(by_split[split][cls])[: quota[label]]
        ]

    total = sum(len(v) for v in selected.values())
    splits = {}
    from tqdm import tqdm

    with tqdm(total=total, disable=not progress, desc=f"decoding {where.name}", unit="img", mininterval=0.5) as bar:
        for split in SPLITS:
            items = selected[split]
            images = np.empty((len(items), *IMAGE_SHAPE), dtype=np.uint8)
            labels = np.array([label for _, label in items], dtype=np.int64)
            for i, (rel, _) in enumerate(items):
                images[i] = _decode_image(read(rel), f"{where}: {rel}")
                bar.update(1)
            splits[split] = Split(images, labels)
    return classes, splits


def _decode_image(data: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as image:
            image.load()
            size, mode = image.size, image.mode
            if size != (32, 32):
                raise DatasetError(
                    f"{where} is {size[0]}x{size[1]}, expected 32x32 RGB; resize the images to 32x32 first "
                    f"(fasttrain does not resize)"
                )
            # Greyscale, palette and alpha images become RGB; 16-bit and float modes would be clipped silently.
            if mode not in ("RGB", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "1"):
                raise DatasetError(f"{where} has pixel mode {mode}; save it as 8-bit RGB")
            return np.asarray(image if mode == "RGB" else image.convert("RGB"))
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{where} cannot be read as an image ({e}); replace or delete the file") from None


def per_class_counts(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(classes))
    return {cls: int(n) for cls, n in zip(classes, counts)}
