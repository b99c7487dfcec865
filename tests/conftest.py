"""Shared fixtures: the real CIFAR-10 archive and a small slice of it converted once per session."""

import os

# One OpenMP thread per test process, and so per trainer a test starts (they inherit the environment): `pytest -n 2`
# runs two tests at once on the 2-core machines this suite is sized for, and two processes with a thread per core
# each spin against each other instead of working. A value the caller set wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess  # noqa: E402
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from helpers import FAST, SHARED_ARCHIVE, run_train


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process-wide state forgotten before and after: the test's Accelerator decides its device and
    precision anew."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


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


@pytest.fixture(scope="session")
def one_epoch_run(cifar_slice_dir, tmp_path_factory) -> Path:
    """A finished FAST run of one epoch on the slice (10 steps, its checkpoint at step 10), trained once per session
    for the tests that go on from it: copy it (shutil.copytree) before resuming; run.dir may differ on resume."""
    tmp = tmp_path_factory.mktemp("one-epoch")
    run_train([*FAST, "--data.dir", str(cifar_slice_dir), "--run.dir", str(tmp / "run"), "--train.epochs", "1"], tmp)
    return tmp / "run"
