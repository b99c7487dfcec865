"""Conversion to .beton: every source kind round-trips exactly through both loader modes, the manifest, atomic and
idempotent writes, verify(), and the message of every bad input.

.beton files are written in subprocesses: ffcv's DatasetWriter forks, and a fork taken while a Loader in this
process compiles with numba hangs (see fasttrain.data.convert).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import urllib.error
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, read_archive_slice
from PIL import Image

from fasttrain.data import convert as convert_module
from fasttrain.data import sources as source_kinds
from fasttrain.data.convert import convert
from fasttrain.data.manifest import verify
from fasttrain.errors import ConfigError, DatasetError

PICKLE_NAMES = ["truck", "airplane", "cat"]  # batches.meta order; fasttrain numbers classes in sorted order
FOLDER_CLASSES = ["bird", "cat", "dog"]
SHARED_SUBSET = 20  # 2 images per class and split


def run_python(code: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_convert_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "fasttrain.data.convert", "--quiet", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


# ---- generated sources ----


def write_cifar_pickles(folder: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A cifar-10-batches-py folder with 5 train batches of 6 and a test batch of 9; returns expected splits."""
    folder.mkdir(parents=True)
    sorted_index = {name: i for i, name in enumerate(sorted(PICKLE_NAMES))}
    expected = {}
    batches = {**{f"data_batch_{i}": 6 for i in range(1, 6)}, "test_batch": 9}
    for name, n in batches.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, len(PICKLE_NAMES), n)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        # Protocol 2 as the original Python 2 files; its bytes objects exercise the unpickler's _codecs path.
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        split = "test" if name == "test_batch" else "train"
        images = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
        remapped = np.array([sorted_index[PICKLE_NAMES[v]] for v in labels], dtype=np.int64)
        if split in expected:
            expected[split] = (
                np.concatenate([expected[split][0], images]),
                np.concatenate([expected[split][1], remapped]),
            )
        else:
            expected[split] = (images, remapped)
    meta = {b"label_names": [n.encode() for n in PICKLE_NAMES], b"num_cases_per_batch": 6}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return expected


def save_png(path: Path, pixels: np.ndarray, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path)


def write_image_folder(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train/<class>/ (4 per class) and test/<class>/ (3 per class) PNGs, one greyscale and one RGBA among them."""
    expected = {}
    for split, per_class in (("train", 4), ("test", 3)):
        images, labels = [], []
        for label, cls in enumerate(FOLDER_CLASSES):
            for i in range(per_class):
                path = root / split / cls / f"{i:03d}.png"
                if split == "train" and cls == "cat" and i == 1:
                    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
                    save_png(path, grey, "L")
                    pixels = np.repeat(grey[:, :, None], 3, axis=2)
                elif split == "train" and cls == "dog" and i == 2:
                    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
                    save_png(path, rgba, "RGBA")
                    pixels = rgba[:, :, :3]
                else:
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    save_png(path, pixels)
                images.append(pixels)
                labels.append(label)
        expected[split] = (np.stack(images), np.array(labels, dtype=np.int64))
    (root / "train" / "cat" / "._000.png").write_bytes(b"macOS resource fork, not an image")
    (root / "README.txt").write_text("ignored")
    return expected


def make_tar(archive: Path, folder: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return archive


@pytest.fixture(scope="module")
def sources(tmp_path_factory, shared_archive) -> dict[str, dict]:
    """Every source kind with the images and labels it must produce: {name: {source, expected, kind}}."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    pickles = write_cifar_pickles(root / "pickles" / "cifar-10-batches-py", rng)
    folder = write_image_folder(root / "tree", rng)
    make_tar(root / "cifar-10-python.tar.gz", root / "pickles" / "cifar-10-batches-py", "cifar-10-batches-py")
    make_tar(root / "tree.tar.gz", root / "tree", "wrapped")  # one wrapping folder inside the archive
    cache = root / "torchvision-cache"
    shutil.copytree(root / "pickles", cache)  # what torchvision leaves behind after a download
    per_class = SHARED_SUBSET // 10
    slices = {split: read_archive_slice(per_class, split) for split in ("train", "test")}
    shared = {split: images_labels[:2] for split, images_labels in slices.items()}
    return {
        "pickle-folder": {
            "source": str(root / "pickles" / "cifar-10-batches-py"),
            "expected": pickles,
            "kind": "cifar-batches",
            "classes": sorted(PICKLE_NAMES),
        },
        "pickle-tar": {
            "source": str(root / "cifar-10-python.tar.gz"),
            "expected": pickles,
            "kind": "cifar-batches-tar",
            "classes": sorted(PICKLE_NAMES),
        },
        "torchvision": {
            "source": "cifar10",
            "expected": pickles,
            "kind": "torchvision",
            "classes": sorted(PICKLE_NAMES),
            "cache": str(cache),
        },
        "folder": {"source": str(root / "tree"), "expected": folder, "kind": "imagefolder", "classes": FOLDER_CLASSES},
        "folder-tar": {
            "source": str(root / "tree.tar.gz"),
            "expected": folder,
            "kind": "imagefolder-tar",
            "classes": FOLDER_CLASSES,
        },
        "shared-archive": {
            "source": str(shared_archive),
            "expected": shared,
            "kind": "imagefolder-tar",
            "subset": SHARED_SUBSET,
            "classes": slices["train"][2],
        },
    }


# Runs the CLI's main() once per source in ONE fresh process (imports ffcv once). torchvision's download is
# replaced by a stub: the cache already holds the batches, as after a real download.
_CONVERT_ALL = """
import json, sys
import torchvision.datasets
torchvision.datasets.CIFAR10 = lambda root, train, download: None
from fasttrain.data.convert import main
sys.exit(max(main(args) for args in json.loads(sys.argv[1])))
"""


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> dict[str, Path]:
    out_root = tmp_path_factory.mktemp("converted")
    jobs, outs = [], {}
    for name, spec in sources.items():
        outs[name] = out_root / name
        args = ["--quiet", "--source", spec["source"], "--out", str(outs[name])]
        if "subset" in spec:
            args += ["--subset", str(spec["subset"])]
        if "cache" in spec:
            args += ["--cache-dir", spec["cache"]]
        jobs.append(args)
    run_python(_CONVERT_ALL, json.dumps(jobs))
    return outs


SOURCE_NAMES = ["pickle-folder", "pickle-tar", "torchvision", "folder", "folder-tar", "shared-archive"]


# ---- round trips ----


@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_manifest_records_the_conversion(name, sources, converted):
    spec, out = sources[name], converted[name]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["given"] == spec["source"]
    assert manifest["source"]["kind"] == spec["kind"]
    assert manifest["subset"] == spec.get("subset")
    assert manifest["classes"] == spec["classes"]
    assert manifest["image_shape"] == [32, 32, 3]
    for split, (_images, labels) in spec["expected"].items():
        entry = manifest["splits"][split]
        data = (out / entry["file"]).read_bytes()
        assert entry["count"] == len(labels)
        assert entry["per_class"] == {c: int((labels == k).sum()) for k, c in enumerate(spec["classes"])}
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["fasttrain_version"]
    created = datetime.fromisoformat(manifest["created_utc"])
    assert created.utcoffset().total_seconds() == 0 and created <= datetime.now(timezone.utc)
    assert verify(out) == manifest
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.beton", "train.beton"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_betons_are_standard_ffcv_files(sources, converted):
    from fasttrain.data.ffcv_compat import IntField, Reader, RGBImageField

    spec, out = sources["folder-tar"], converted["folder-tar"]
    for split, (_, labels) in spec["expected"].items():
        reader = Reader(str(out / f"{split}.beton"))
        assert reader.field_names == ["image", "label"]
        assert isinstance(reader.handlers["image"], RGBImageField)
        assert isinstance(reader.handlers["label"], IntField)
        assert reader.num_samples == len(labels)
        image_meta = reader.metadata["f0"]
        assert (image_meta["mode"] == 1).all(), "images must be stored raw (lossless), not as JPEG"
        assert (image_meta["height"] == 32).all() and (image_meta["width"] == 32).all()
        np.testing.assert_array_equal(reader.metadata["f1"], labels)


@pytest.mark.parametrize("name", SOURCE_NAMES)
@pytest.mark.parametrize("mode", ["ffcv", "gpu"])
def test_pixels_and_labels_round_trip_exactly(name, mode, sources, converted):
    from fasttrain.data.loaders import build_loaders
    from fasttrain.data.normalize import denormalize
    from fasttrain.data.resident import read_beton

    expected = sources[name]["expected"]
    train, evaluation = build_loaders(
        converted[name],
        mode=mode,
        batch_size=4,
        eval_batch_size=4,
        workers=1,
        device="cpu",
        augment=False,
        drop_last=False,
    )
    test_images, test_labels = expected["test"]
    batches = [(denormalize(x), y.clone(), v.clone()) for x, y, v in evaluation]
    valid = torch.cat([b[2] for b in batches])  # the last batch is padded to the full batch size
    assert valid.sum() == len(test_labels) and valid[: len(test_labels)].all()
    images = torch.cat([b[0] for b in batches])[valid].permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(images, test_images)
    np.testing.assert_array_equal(torch.cat([b[1] for b in batches])[valid].numpy(), test_labels)

    # Training order is random: compare the epoch as a multiset of (pixels, label) samples.
    def samples(images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
        return sorted((img.tobytes(), int(lab)) for img, lab in zip(images, labels))

    seen = [(denormalize(x).permute(0, 2, 3, 1).numpy(), y.numpy().copy()) for x, y in train]
    train_images, train_labels = expected["train"]
    got = samples(np.concatenate([s[0] for s in seen]), np.concatenate([s[1] for s in seen]))
    assert got == samples(train_images, train_labels)

    if mode == "gpu":  # the one-time read keeps file order
        images, labels = read_beton(converted[name] / "train.beton")
        np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), train_images)
        np.testing.assert_array_equal(labels.numpy(), train_labels)


def test_subset_is_stratified_first_per_class(sources, converted):
    manifest = json.loads((converted["shared-archive"] / "manifest.json").read_text())
    for split in ("train", "test"):
        assert manifest["splits"][split]["count"] == SHARED_SUBSET
        assert set(manifest["splits"][split]["per_class"].values()) == {SHARED_SUBSET // 10}
    assert "N // C" in manifest["subset_rule"]


def test_uneven_subset_gives_the_first_classes_one_more():
    from fasttrain.data.sources import _quota, _stratified_first

    assert _quota(7, 3) == [3, 2, 2]
    labels = np.array([2, 0, 1, 0, 0, 2, 1, 0, 1, 2])
    np.testing.assert_array_equal(_stratified_first(labels, 3, 4), [0, 1, 2, 3])  # two 0s, one 1, one 2


# ---- idempotence, mismatch, --force ----


def file_states(folder: Path) -> dict[str, tuple[int, int]]:
    paths = [folder, *folder.iterdir()]
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def test_same_request_reuses_the_directory(sources, converted, capsys):
    out = converted["folder"]
    before = file_states(out)
    manifest = convert(sources["folder"]["source"], out, progress=False)
    assert "reused" in capsys.readouterr().out
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert file_states(out) == before

    result = run_convert_cli("--source", sources["folder"]["source"], "--out", str(out))  # the CLI, too
    assert result.returncode == 0 and "reused" in result.stdout
    assert file_states(out) == before


def test_mismatching_request_is_refused_then_forced(sources, converted, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(converted["folder"], out)
    before = file_states(out)
    with pytest.raises(DatasetError, match="--force") as error:
        convert(sources["pickle-folder"]["source"], out, progress=False)
    assert str(out) in str(error.value)
    with pytest.raises(DatasetError, match="subset"):
        convert(sources["folder"]["source"], out, subset=3, progress=False)
    assert file_states(out) == before

    result = run_convert_cli("--source", sources["pickle-folder"]["source"], "--out", str(out), "--force")
    assert result.returncode == 0, result.stderr
    manifest = verify(out)
    assert manifest["source"]["kind"] == "cifar-batches"
    assert manifest["splits"]["train"]["count"] == 30
    assert os.stat(out).st_ino != before[out.name][0], "--force must rename a new directory into place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_the_trainer_takes_a_data_dir_of_its_source_even_once_the_source_is_gone(sources, converted, tmp_path):
    """The trainer's check of data.source against a data directory: another source that exists is refused; the same
    one, or one deleted or moved since it was converted (the directory holds every image), is taken."""
    from accelerate import Accelerator

    from fasttrain.config import DataSection
    from fasttrain.data.prepare import prepare_data

    accelerator, out = Accelerator(cpu=True), tmp_path / "data"
    source = shutil.copytree(sources["folder"]["source"], tmp_path / "tree")
    convert(str(source), out, progress=False)
    with pytest.raises(ConfigError, match=f"holds a data set converted from '{source}', not from data.source"):
        prepare_data(DataSection(source=sources["pickle-folder"]["source"], dir=str(out)), accelerator)
    assert prepare_data(DataSection(source=str(source), dir=str(out)), accelerator)[0] == out
    source.rename(tmp_path / "moved")
    assert prepare_data(DataSection(source=str(source), dir=str(out)), accelerator)[0] == out


# ---- bad input ----


def assert_nothing_written(parent: Path) -> None:
    assert list(parent.iterdir()) == [], f"left behind: {list(parent.iterdir())}"


def test_missing_source_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as error:
        convert(str(tmp_path / "nowhere.tar.gz"), tmp_path / "out" / "data", progress=False)
    assert "nowhere.tar.gz" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_too_little_disk_space_is_refused_before_writing(tmp_path, monkeypatch):
    """ffcv's writer hangs when a worker fills the disk, so the space is checked first (the reaction is ours to
    test: disk_usage reports a nearly full disk)."""
    write_cifar_pickles(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda path: real_disk_usage(path)._replace(free=10**6))
    (tmp_path / "out").mkdir()
    with pytest.raises(DatasetError, match=r"needs up to \d+ MB free in .*out, and 1 MB are") as error:
        convert(str(tmp_path / "cifar-10-batches-py"), tmp_path / "out" / "data", progress=False)
    assert "another disk" in str(error.value)
    assert_nothing_written(tmp_path / "out")


def test_the_space_checked_for_is_at_least_what_a_conversion_writes(cifar_slice_dir):
    manifest = json.loads((cifar_slice_dir / "manifest.json").read_text())
    for split in manifest["splits"].values():
        same_shape = source_kinds.Split(np.zeros((split["count"], 32, 32, 3), np.uint8), np.zeros(split["count"]))
        assert split["bytes"] <= convert_module._beton_bytes_at_most(same_shape) <= 2 * split["bytes"]


def test_an_out_that_cannot_be_made_is_refused_before_any_image_is_decoded(tmp_path, monkeypatch):
    write_cifar_pickles(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    (tmp_path / "a-file").write_text("")
    result = run_convert_cli("--source", str(tmp_path / "cifar-10-batches-py"), "--out", str(tmp_path / "a-file" / "x"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--out {tmp_path / 'a-file' / 'x'}: {tmp_path / 'a-file'} is a file, not a directory" in result.stderr

    def unwritable(self, *args, **kwargs):  # a read-only filesystem (root writes anywhere on this one)
        raise OSError(30, "Read-only file system")

    def no_decoding(*args, **kwargs):
        raise AssertionError("the source was decoded before the destination was checked")

    monkeypatch.setattr(convert_module.Path, "mkdir", unwritable)
    monkeypatch.setattr(convert_module.sources, "load", no_decoding)
    with pytest.raises(DatasetError, match=r"cannot write in .* \(Read-only file system\); choose a writable --out"):
        convert(str(tmp_path / "cifar-10-batches-py"), tmp_path / "ro" / "data", progress=False)


def test_cli_prints_only_the_message_and_exits_2(tmp_path):
    result = run_convert_cli("--source", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert str(tmp_path / "missing") in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("as_archive", [False, True])
def test_source_without_train_and_test(tmp_path, as_archive):
    tree = tmp_path / "tree"
    save_png(tree / "train" / "cat" / "0.png", np.zeros((32, 32, 3), np.uint8))
    source = make_tar(tmp_path / "tree.tgz", tree, "tree") if as_archive else tree
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    with pytest.raises(DatasetError, match="no test/") as error:
        convert(str(source), out_parent / "data", progress=False)
    assert str(source) in str(error.value) and "train/<class>" in str(error.value)
    assert_nothing_written(out_parent)


def test_class_folders_differ_between_splits(tmp_path):
    for split, classes in (("train", ["cat", "dog"]), ("test", ["cat", "frog"])):
        for cls in classes:
            save_png(tmp_path / "tree" / split / cls / "0.png", np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "out").mkdir()
    with pytest.raises(DatasetError, match="class folders differ") as error:
        convert(str(tmp_path / "tree"), tmp_path / "out" / "data", progress=False)
    assert "only in train: ['dog']" in str(error.value) and "only in test: ['frog']" in str(error.value)
    assert_nothing_written(tmp_path / "out")


def test_wrong_image_size_names_the_file(tmp_path):
    for split in ("train", "test"):
        save_png(tmp_path / "tree" / split / "cat" / "0.png", np.zeros((32, 32, 3), np.uint8))
    save_png(tmp_path / "tree" / "train" / "cat" / "big.png", np.zeros((28, 36, 3), np.uint8))
    (tmp_path / "out").mkdir()
    with pytest.raises(DatasetError, match="expected 32x32") as error:
        convert(str(tmp_path / "tree"), tmp_path / "out" / "data", progress=False)
    assert "train/cat/big.png is 36x28" in str(error.value)
    assert_nothing_written(tmp_path / "out")


def test_undecodable_image_names_the_file(tmp_path):
    for split in ("train", "test"):
        save_png(tmp_path / "tree" / split / "cat" / "0.png", np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "tree" / "test" / "cat" / "1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="cannot be read as an image") as error:
        convert(str(tmp_path / "tree"), tmp_path / "data", progress=False)
    assert "test/cat/1.jpg" in str(error.value)


def test_not_a_cifar_pickle_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_pickles(folder, np.random.default_rng(1))
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": io.BytesIO()}))  # a foreign global
    with pytest.raises(DatasetError, match="data_batch_3 is not a CIFAR-10 python batch file"):
        convert(str(folder), tmp_path / "data", progress=False)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="lacks CIFAR-10 batch file.*data_batch_3"):
        convert(str(folder), tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()


def test_cifar10_without_network_points_at_local_sources(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DatasetError, match="no network") as error:
        convert("cifar10", tmp_path / "data", cache_dir=tmp_path / "cache", progress=False)
    assert "--source PATH" in str(error.value) and str(tmp_path / "cache") in str(error.value)
    assert not (tmp_path / "data").exists()


def test_non_dataset_directory_is_never_overwritten(sources, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    for force in (False, True):
        with pytest.raises(DatasetError, match="not a fasttrain data set"):
            convert(sources["folder"]["source"], out, force=force, progress=False)
    assert (out / "thesis.tex").read_text() == "keep me"


# ---- verify ----


@pytest.fixture
def damaged_copy(converted, tmp_path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(converted["folder-tar"], out)
    return out


def test_verify_catches_a_truncated_beton(damaged_copy, sources):
    path = damaged_copy / "train.beton"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(DatasetError, match="truncated") as error:
        verify(damaged_copy)
    rerun = f"python -m fasttrain.data.convert --source {sources['folder-tar']['source']} --out {damaged_copy} --force"
    assert str(path) in str(error.value) and rerun in str(error.value)


def test_verify_catches_one_corrupted_byte(damaged_copy):
    path = damaged_copy / "test.beton"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="sha256") as error:
        verify(damaged_copy)
    assert str(path) in str(error.value) and "--force" in str(error.value)


def test_verify_missing_directory_and_manifest(tmp_path):
    with pytest.raises(DatasetError, match="--data.source") as error:
        verify(tmp_path / "absent")
    assert "python -m fasttrain.data.convert" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="manifest.json is missing"):
        verify(tmp_path / "empty")


@pytest.mark.parametrize(
    "edit",
    [
        {"splits": {"train": 5}},
        {"source": "x"},
        {"field_names": ["image", "label"]},
        [1, 2],
    ],
)
def test_a_hand_edited_manifest_of_the_wrong_shape_is_named(converted, tmp_path, edit):
    copy = tmp_path / "data"
    shutil.copytree(converted["pickle-folder"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest = {**manifest, **edit} if isinstance(edit, dict) else edit
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="manifest.json is not a fasttrain manifest; reconvert with"):
        verify(copy)
