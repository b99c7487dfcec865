"""The resident mode's decoded copy of a verified .beton: the same samples as ffcv's reading, used on the next
start, keyed by the file's sha256, and never a reason for a run to fail."""

import shutil
from functools import partial

import numpy as np
import pytest
import torch

from fasttrain.data.decoded import DECODED_DIR, decoded_path, read_split
from fasttrain.data.manifest import beton_paths, loader_pipelines
from fasttrain.data.resident import read_beton


@pytest.fixture
def data_dir(cifar_slice_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(cifar_slice_dir, copy, ignore=shutil.ignore_patterns(DECODED_DIR))
    return copy


def through_ffcv(data_dir, split="train", calls=None):
    def read():
        if calls is not None:
            calls.append(split)
        fields = partial(loader_pipelines, data_dir, split)
        return read_beton(beton_paths(data_dir)[split], 1, fields=fields)

    return read


def refuse():
    raise AssertionError("read through ffcv although a good decoded copy exists")


def test_the_copy_holds_what_ffcv_read_and_serves_the_next_start(data_dir):
    calls = []
    images, labels = read_split(data_dir, "train", through_ffcv(data_dir, calls=calls))
    assert calls == ["train"] and decoded_path(data_dir, "train").is_file()
    again_images, again_labels = read_split(data_dir, "train", refuse)
    assert torch.equal(again_images, images) and torch.equal(again_labels, labels)
    assert again_images.shape == (1000, 3, 32, 32) and again_images.dtype == torch.uint8
    assert again_images.is_contiguous(memory_format=torch.channels_last) == images.is_contiguous(
        memory_format=torch.channels_last
    )


def test_the_name_follows_the_manifest_sha256_and_a_new_copy_removes_old_ones(data_dir):
    stale = data_dir / DECODED_DIR / "train-0123456789abcdef.npz"
    stale.parent.mkdir()
    np.savez(stale, images=np.zeros((1, 32, 32, 3), np.uint8), labels=np.zeros(1, np.int64))
    read_split(data_dir, "train", through_ffcv(data_dir))
    path = decoded_path(data_dir, "train")
    assert path.name.startswith("train-") and path.name != stale.name and not stale.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_damaged_copy_is_decoded_again_and_replaced(data_dir):
    images, labels = read_split(data_dir, "test", through_ffcv(data_dir, "test"))
    path = decoded_path(data_dir, "test")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    calls = []
    again_images, again_labels = read_split(data_dir, "test", through_ffcv(data_dir, "test", calls))
    assert calls == ["test"] and torch.equal(again_images, images) and torch.equal(again_labels, labels)
    read_split(data_dir, "test", refuse)  # replaced by a good copy


def test_a_place_that_cannot_be_written_only_costs_the_speed_up(data_dir):
    (data_dir / DECODED_DIR).write_text("a file where the directory would go")
    calls = []
    images, _ = read_split(data_dir, "train", through_ffcv(data_dir, calls=calls))
    assert calls == ["train"] and images.shape[0] == 1000


def test_no_manifest_means_no_copy(tmp_path, cifar_slice_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train.beton", "test.beton"):
        shutil.copy(cifar_slice_dir / name, bare / name)
    assert decoded_path(bare, "train") is None
