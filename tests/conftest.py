"""Shared fixtures: where the real CIFAR-10 archive lives, and small slices of it."""

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = Path(
    os.environ.get("FASTTRAIN_CIFAR_ARCHIVE", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
)


def read_archive_slice(per_class: int, split: str = "train"):
    """The first `per_class` images of each class of `split`, decoded: (uint8 [N,32,32,3], int64 [N], classes)."""
    from PIL import Image

    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"shared CIFAR-10 archive not found at {SHARED_ARCHIVE} (set FASTTRAIN_CIFAR_ARCHIVE)")
    members: dict[str, list[tarfile.TarInfo]] = {}
    with tarfile.open(SHARED_ARCHIVE) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) >= 3 and parts[-3] == split:
                members.setdefault(parts[-2], []).append(m)
        classes = sorted(members)
        images, labels = [], []
        for label, cls in enumerate(classes):
            for m in sorted(members[cls], key=lambda m: m.name)[:per_class]:
                data = tar.extractfile(m).read()
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"shared CIFAR-10 archive not found at {SHARED_ARCHIVE} (set FASTTRAIN_CIFAR_ARCHIVE)")
    return SHARED_ARCHIVE


@pytest.fixture(scope="session")
def cifar_slice_dir(tmp_path_factory, shared_archive) -> Path:
    """1,000 train and 1,000 test images of the real CIFAR-10 as .beton files, converted once per session (in a
    subprocess: ffcv's writer must not share a process with a loader)."""
    out = tmp_path_factory.mktemp("data") / "cifar-slice"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fasttrain.data.convert",
            "--source",
            str(shared_archive),
            "--out",
            str(out),
            "--subset",
            "1000",
        ],
        check=True,
        capture_output=True,
    )
    return out
