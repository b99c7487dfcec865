"""Existing ffcv .beton files as a source (checked, recorded, read in place) and per-node conversion under a lock.

The users' .beton files are written in a subprocess by ffcv's DatasetWriter the way FFCV's CIFAR example
(examples/cifar/write_datasets.py) writes them, from a real slice of the shared archive: DatasetWriter forks, and
must not share a process with an ffcv Loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ACCELERATE, REPO, TRAIN, env_for_tests, read_archive_slice, read_jsonl

from fasttrain.data import betons
from fasttrain.data.convert import convert, main
from fasttrain.data.manifest import beton_paths, field_names, loader_pipelines, verify
from fasttrain.errors import ConfigError, DatasetError

TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 5

# Each variant: its fields, or the kind of damage. The first is FFCV's CIFAR example exactly:
# DatasetWriter(path, {'image': RGBImageField(), 'label': IntField()}).from_indexed_dataset(torchvision_cifar10),
# whose items are (PIL image, int).
_WRITE_USER_FILES = """
import sys
import numpy as np
from PIL import Image
from fasttrain.data.ffcv_compat import DatasetWriter, IntField, RGBImageField
from ffcv.fields import FloatField

arrays, root = np.load(sys.argv[1]), sys.argv[2]

class Items:
    # (PIL image, label) like torchvision's CIFAR10, or `arrange`(PIL image, label) in the fields' order.
    def __init__(self, images, labels, arrange):
        self.images, self.labels, self.arrange = images, labels, arrange
    def __len__(self):
        return len(self.images)
    def __getitem__(self, i):
        return self.arrange(Image.fromarray(self.images[i]), self.labels[i])

def write(folder, name, fields, images, labels, arrange=lambda image, label: (image, label), **kwargs):
    import os
    os.makedirs(f"{root}/{folder}", exist_ok=True)
    DatasetWriter(f"{root}/{folder}/{name}", fields, **kwargs).from_indexed_dataset(Items(images, labels, arrange))

for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    ints = [int(v) for v in labels]
    name = f"cifar_{split}.beton"
    write("ffcv-example", name, {"image": RGBImageField(), "label": IntField()}, images, ints)
    write("renamed", name, {"img": RGBImageField(), "target": IntField()}, images, ints, num_workers=1)
    write("reordered", name, {"label": IntField(), "weight": FloatField(), "image": RGBImageField()}, images, ints,
          lambda im, y: (y, 0.5, im), num_workers=1)
    if split == "test":
        continue  # the damaged variants below hold only a training file
    write("float-label", name, {"image": RGBImageField(), "label": FloatField()}, images,
          [float(v) for v in labels], num_workers=1)
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
    write("64px", name, {"image": RGBImageField(), "label": IntField()}, big, ints, num_workers=1)
    write("no-label", name, {"image": RGBImageField()}, images, ints, lambda im, y: (im,), num_workers=1)
    write("two-int-fields", name, {"image": RGBImageField(), "y": IntField(), "index": IntField()}, images, ints,
          lambda im, y: (im, y, 0), num_workers=1)
    write("label-out-of-range", name, {"image": RGBImageField(), "label": IntField()}, images,
          [v + 5 for v in ints], num_workers=1)
"""


def _python_env() -> dict[str, str]:
    return {**env_for_tests(Path(os.environ.get("TMPDIR", "/tmp"))), "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> Path:
    """Folders of users' .beton pairs (cifar_train.beton, cifar_test.beton), one per variant of _WRITE_USER_FILES,
    and arrays.npz, the slice they were written from."""
    root = tmp_path_factory.mktemp("user")
    train_images, train_labels, _ = read_archive_slice(TRAIN_PER_CLASS, "train")
    test_images, test_labels, _ = read_archive_slice(TEST_PER_CLASS, "test")
    arrays = root / "arrays.npz"
    np.savez(
        arrays,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
    )
    subprocess.run(
        [sys.executable, "-c", _WRITE_USER_FILES, str(arrays), str(root)],
        check=True,
        capture_output=True,
        env=_python_env(),
        timeout=300,
    )
    return root


def pair(folder: Path) -> str:
    test = folder / "cifar_test.beton"
    if not test.exists():  # a damaged variant: its training file with the good test file
        test = folder.parent / "ffcv-example" / "cifar_test.beton"
    return f"{folder / 'cifar_train.beton'},{test}"


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry below `folder`: (size, mtime_ns, sha256) — what "unchanged" means."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
    }


# ---- recording existing files ----


def test_ffcv_example_files_are_recorded_and_read_in_place(user_files, tmp_path, capsys):
    folder = user_files / "ffcv-example"
    before = snapshot(folder)
    out = tmp_path / "data"

    manifest = convert(pair(folder), out, progress=False)

    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert json.loads((out / "manifest.json").read_text()) == manifest == verify(out)
    assert manifest["source"]["kind"] == "beton"
    assert manifest["field_names"] == {"image": "image", "label": "label"}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        entry, path = manifest["splits"][split], folder / f"cifar_{split}.beton"
        assert entry["file"] == str(path)
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["count"] == 10 * per_class
        assert entry["per_class"] == dict.fromkeys(betons.CIFAR10_CLASSES, per_class)
    assert beton_paths(out) == {"train": folder / "cifar_train.beton", "test": folder / "cifar_test.beton"}
    assert field_names(out) == {"image": "image", "label": "label"}
    assert "read in place" in capsys.readouterr().out
    assert snapshot(folder) == before


def test_files_read_in_place_are_hashed_once_each_when_verified(user_files, tmp_path, monkeypatch):
    from fasttrain.data import manifest as manifest_module

    folder, out = user_files / "ffcv-example", tmp_path / "data"
    convert(pair(folder), out, progress=False)
    hashed = []
    real = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    manifest_module.verify(out)
    assert sorted(hashed) == ["cifar_test.beton", "cifar_train.beton"]


def test_folder_source_is_the_same_source_as_its_pair(user_files, tmp_path, capsys):
    folder, out = user_files / "ffcv-example", tmp_path / "data"
    first = convert(str(folder), out, progress=False)
    assert beton_paths(out)["train"] == folder / "cifar_train.beton"
    again = convert(pair(folder), out, progress=False)
    assert again == first
    assert "reused, not rewritten" in capsys.readouterr().out


def test_other_field_names_are_recorded_for_the_loaders(user_files, tmp_path):
    out = tmp_path / "data"
    manifest = convert(pair(user_files / "renamed"), out, progress=False)
    assert manifest["field_names"] == {"image": "img", "label": "target"}
    assert field_names(out) == {"image": "img", "label": "target"}
    assert loader_pipelines(out, "train", ["I"], ["L"]) == ({"img": ["I"], "target": ["L"]}, True)


def test_loader_pipelines_read_any_field_order_exactly(user_files, tmp_path):
    """Fields (label, weight, image): ffcv's Loader, given loader_pipelines, yields only labels and images, in the
    file's order, and they are the slice the files were written from."""
    from fasttrain.data.ffcv_compat import IntDecoder, Loader, OrderOption, SimpleRGBImageDecoder, Squeeze, ToTensor

    out = tmp_path / "data"
    convert(pair(user_files / "reordered"), out, progress=False)
    pipelines, image_first = loader_pipelines(
        out, "test", [SimpleRGBImageDecoder(), ToTensor()], [IntDecoder(), ToTensor(), Squeeze(1)]
    )
    assert image_first is False and pipelines["weight"] is None
    loader = Loader(
        str(beton_paths(out)["test"]),
        batch_size=10 * TEST_PER_CLASS,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines=pipelines,
    )
    batch = next(iter(loader))
    assert len(batch) == 2
    labels, images = batch
    expected = np.load(user_files / "arrays.npz")  # the slice the files were written from
    np.testing.assert_array_equal(images.numpy(), expected["test_images"])
    np.testing.assert_array_equal(labels.numpy(), expected["test_labels"])


def test_several_fields_of_a_kind_need_the_usual_name(user_files, tmp_path):
    with pytest.raises(DatasetError, match="has 2 IntField fields \\(y, index\\) and none is named `label`"):
        convert(pair(user_files / "two-int-fields"), tmp_path / "data", progress=False)


def test_directory_without_manifest_keeps_fasttrain_names(tmp_path):
    assert field_names(tmp_path) == {"image": "image", "label": "label"}
    with pytest.raises(DatasetError, match="train.beton is missing; convert the data set with"):
        beton_paths(tmp_path)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("float-label", "has no integer label field (an ffcv IntField); its fields: image (RGBImageField), label"),
        ("64px", "image field `image` holds 64x64 images"),
        ("no-label", "has no integer label field (an ffcv IntField); its fields: image (RGBImageField)."),
        ("label-out-of-range", "label field `label` holds values 5..14, outside 0..9"),
    ],
)
def test_wrong_fields_exit_2_naming_the_file(user_files, tmp_path, capsys, variant, message):
    folder, out = user_files / variant, tmp_path / "data"
    before = snapshot(folder)
    assert main(["--source", pair(folder), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert str(folder / "cifar_train.beton") in err
    assert message in err
    assert not out.exists()
    assert snapshot(folder) == before


def test_a_file_that_is_not_a_beton(user_files, tmp_path):
    fake = tmp_path / "fake_train.beton"
    fake.write_bytes(b"not an ffcv file" * 64)
    with pytest.raises(DatasetError, match="is not a readable ffcv .beton file"):
        convert(f"{fake},{user_files / 'ffcv-example' / 'cifar_test.beton'}", tmp_path / "data", progress=False)


def _folder_with(tmp_path: Path, user_files: Path, names: list[str]) -> Path:
    folder = tmp_path / "betons"
    folder.mkdir()
    for name, original in zip(names, ["cifar_train.beton", "cifar_test.beton", "cifar_test.beton"]):
        shutil.copy(user_files / "ffcv-example" / original, folder / name)
    return folder


@pytest.mark.parametrize(
    "names",
    [["train.beton", "val-32px.beton"], ["Cifar.Train.beton", "CIFAR_VALIDATION.beton"]],
)
def test_folder_name_rule_accepts(user_files, tmp_path, names):
    folder = _folder_with(tmp_path, user_files, names)
    convert(str(folder), tmp_path / "data", progress=False)
    assert beton_paths(tmp_path / "data") == {"train": folder / names[0], "test": folder / names[1]}


@pytest.mark.parametrize(
    "names",
    [["training.beton", "test.beton"], ["train.beton", "test.beton", "val.beton"], ["train_test.beton", "val.beton"]],
)
def test_folder_name_rule_refuses_listing_the_files(user_files, tmp_path, names):
    folder = _folder_with(tmp_path, user_files, names)
    with pytest.raises(DatasetError, match="a folder source needs exactly one .beton whose name has the word `train`"):
        convert(str(folder), tmp_path / "data", progress=False)
    with pytest.raises(DatasetError) as error:
        convert(str(folder), tmp_path / "data", progress=False)
    assert all(name in str(error.value) for name in names)


def test_one_beton_file_asks_for_the_pair(user_files, tmp_path):
    with pytest.raises(DatasetError, match="is one .beton file; pass the training and test files together"):
        convert(str(user_files / "ffcv-example" / "cifar_train.beton"), tmp_path / "data", progress=False)
    with pytest.raises(DatasetError, match="the test file .*nowhere.beton does not exist"):
        convert(f"{user_files / 'ffcv-example' / 'cifar_train.beton'},nowhere.beton", tmp_path / "d", progress=False)


def test_subset_and_the_users_own_folder_are_refused(user_files, tmp_path):
    folder = user_files / "ffcv-example"
    with pytest.raises(DatasetError, match="--subset does not apply to existing .beton files"):
        convert(pair(folder), tmp_path / "data", subset=10, progress=False)
    before = snapshot(folder)
    with pytest.raises(DatasetError, match="is the folder of your .beton files, and fasttrain never writes there"):
        convert(pair(folder), folder, progress=False)
    assert snapshot(folder) == before


def test_a_changed_user_file_is_caught_and_recorded_again(user_files, tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(user_files / "ffcv-example", folder)
    out = tmp_path / "data"
    convert(pair(folder), out, progress=False)
    with open(folder / "cifar_test.beton", "r+b") as f:  # same size, one byte different
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(DatasetError, match="has changed since .*manifest.json recorded it") as error:
        verify(out)
    command = str(error.value).split("`")[1].split()
    assert command[:3] == ["python", "-m", "fasttrain.data.convert"] and "--force" in command
    assert main(command[3:] + ["--quiet"]) == 0
    recorded = verify(out)["splits"]["test"]["sha256"]
    assert recorded == hashlib.sha256((folder / "cifar_test.beton").read_bytes()).hexdigest()


# ---- training on them ----


def _train(source: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(TRAIN),
        "--config",
        "cpu_quick",
        "--data.source",
        source,
        "--train.epochs",
        "1",
        "--train.batch_size",
        "50",
        "--model.widths",
        "8,8,8",
        "--wandb.mode",
        "disabled",
        "--run.dir",
        str(cwd / "run"),
    ]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=_python_env(), timeout=300)


def assert_trained_on_the_files(run_dir: Path) -> None:
    """The run went through the users' images: 10 per class to train (2 steps of 50), 5 per class evaluated."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 10 * TRAIN_PER_CLASS // 50
    (epoch,) = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    assert epoch["val_count"] == 10 * TEST_PER_CLASS and 0 <= epoch["val_acc"] <= 1


def test_training_on_ffcv_example_files(user_files, tmp_path):
    folder = user_files / "ffcv-example"
    before = snapshot(folder)
    result = _train(pair(folder), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_trained_on_the_files(tmp_path / "run")
    # fasttrain's own directory records the files and, the run being resident (cpu_quick), keeps their decoded
    # copy; the user's folder is untouched
    own = tmp_path / "data" / "cifar_train-betons"
    assert sorted(p.name for p in own.iterdir()) == ["decoded", "manifest.json"]
    assert snapshot(folder) == before


def test_training_on_files_with_other_field_names(user_files, tmp_path):
    result = _train(pair(user_files / "renamed"), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_trained_on_the_files(tmp_path / "run")


# ---- per-node conversion ----


def test_a_waiting_process_finds_the_data_and_converts_nothing(user_files, tmp_path):
    """Shared filesystem: another node holds the lock while it converts; this one waits, then finds the manifest."""
    from fasttrain.data.prepare import conversion_lock

    out, source = tmp_path / "data", pair(user_files / "ffcv-example")
    child = (
        "import sys; from pathlib import Path; from fasttrain.config import DataSection; "
        "from fasttrain.data.prepare import convert_once; "
        "print('result', convert_once(DataSection(source=sys.argv[1], dir=sys.argv[2]), Path(sys.argv[2])))"
    )
    with conversion_lock(out):
        waiting = subprocess.Popen(
            [sys.executable, "-c", child, source, str(out)], stdout=subprocess.PIPE, text=True, env=_python_env()
        )
        assert "is being converted by another process" in waiting.stdout.readline()
        convert(source, out, progress=False)
        time.sleep(0.2)
    output = waiting.communicate(timeout=120)[0]
    assert waiting.returncode == 0
    assert "result True" in output and "converting" not in output


def test_existing_data_needs_no_lock(user_files, tmp_path):
    """A data set already there (perhaps on a read-only filesystem) is used without creating the lock file."""
    from fasttrain.config import DataSection
    from fasttrain.data.prepare import conversion_lock, convert_once

    out = tmp_path / "data"
    convert(pair(user_files / "ffcv-example"), out, progress=False)
    assert convert_once(DataSection(source="unused", dir=str(out)), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    (tmp_path / "a-file").write_text("")
    under_a_file = conversion_lock(tmp_path / "a-file" / "data")
    with pytest.raises(
        DatasetError, match="a-file/data: .*a-file is a file, not a directory; choose another --data.dir"
    ):
        under_a_file.__enter__()


def test_a_data_dir_made_from_another_source_is_refused_not_trained_on(user_files, tmp_path, monkeypatch):
    """Two .beton pairs of the same file names map to the same data/<name>-betons: the second must not train on the
    first one's images. The default source (cifar10) with --data.dir takes whatever the directory holds."""
    from accelerate import Accelerator

    from fasttrain.config import DataSection
    from fasttrain.data.prepare import prepare_data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the conversion's child process imports fasttrain from here
    accelerator = Accelerator(cpu=True)
    first, second = pair(user_files / "ffcv-example"), pair(user_files / "renamed")
    data_dir, _ = prepare_data(DataSection(source=first), accelerator)
    assert data_dir == Path("data/cifar_train-betons")
    with pytest.raises(ConfigError) as refused:
        prepare_data(DataSection(source=second), accelerator)
    message = str(refused.value)
    assert f"holds a data set converted from {first!r}, not from data.source {second!r}" in message
    assert "choose another --data.dir" in message and "--force" in message
    assert prepare_data(DataSection(source=first), accelerator)[0] == data_dir
    assert prepare_data(DataSection(dir=str(data_dir)), accelerator)[0] == data_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_each_convert_their_own_copy_and_train(shared_archive, tmp_path):
    """Two `accelerate launch` "machines" on this host, no shared data directory: each node converts, both train."""
    port = _free_port()
    env = {**_python_env(), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    nodes = []
    for rank in (0, 1):
        command = [
            str(ACCELERATE),
            "launch",
            "--multi_gpu",
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            str(TRAIN),
            "--config",
            "cpu_quick",
            "--data.source",
            str(shared_archive),
            "--data.subset",
            "100",
            "--data.dir",
            str(tmp_path / f"node{rank}" / "data"),
            "--train.epochs",
            "1",
            "--train.batch_size",
            "20",
            "--model.widths",
            "8,8,8",
            "--wandb.mode",
            "disabled",
            "--run.dir",
            str(tmp_path / "run"),
            # Both "machines" share this host's run directory; checkpoints are not what this test is about.
            "--checkpoint.every",
            "0",
        ]
        output = subprocess.PIPE
        nodes.append(
            subprocess.Popen(command, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT, text=True, env=env)
        )
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-4000:]}"
        data_dir = tmp_path / f"node{rank}" / "data"
        assert f"no dataset in {data_dir}; converting" in output
        assert verify(data_dir)["splits"]["train"]["count"] == 100
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"


def test_trainer_refuses_wrong_files_with_exit_2(user_files, tmp_path):
    result = _train(pair(user_files / "64px"), tmp_path)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "image field `image` holds 64x64 images" in result.stderr
    assert "failed (message above)" in result.stderr
    assert "Traceback" not in result.stderr
