"""What several test modules share: paths, the tiny training settings, and ways to run the trainer as users do.
Tests import from here (fixtures come from conftest.py); no test module imports another."""

import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from fasttrain.tracking.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = Path(
    os.environ.get("FASTTRAIN_CIFAR_ARCHIVE", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
)
TRAIN = REPO / "fasttrain" / "train.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
WANDB = Path(sys.executable).with_name("wandb")
CPU_2PROC = REPO / "launch" / "accelerate" / "cpu_2proc.yaml"

TINY = [
    "--model.name",
    "deepcnn",
    "--model.widths",
    "8,16",
    "--model.blocks",
    "1,1",
    "--train.batch_size",
    "100",
    "--train.lr",
    "0.2",
    "--train.lr_ref_batch",
    "100",
    "--train.lr_peak_epoch",
    "1",
    "--train.log_every",
    "2",
    "--data.workers",
    "1",
    "--data.eval_batch_size",
    "250",
    "--train.mixed_precision",
    "no",
    "--train.compile",
    "off",
]
# The tiny settings in the resident data mode, W&B off: 10 steps per epoch on the 1,000-image slice.
FAST = [*TINY, "--data.mode", "resident", "--wandb.mode", "disabled"]


def read_archive_slice(per_class: int, split: str = "train"):
    """The first `per_class` images (by name) of each class of `split`, decoded: (uint8 [N,32,32,3], int64 [N],
    classes)."""
    images, labels, classes = _archive_slice(per_class, split)
    return images.copy(), labels.copy(), list(classes)


@functools.lru_cache(maxsize=8)
def _archive_slice(per_class: int, split: str):
    """Two forward passes over the archive (a gzip stream cannot seek back cheaply), cached per process."""
    from PIL import Image

    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"shared CIFAR-10 archive not found at {SHARED_ARCHIVE} (set FASTTRAIN_CIFAR_ARCHIVE)")
    names: dict[str, list[str]] = {}
    with tarfile.open(SHARED_ARCHIVE) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) >= 3 and parts[-3] == split:
                names.setdefault(parts[-2], []).append(m.name)
    classes = sorted(names)
    wanted = {name: label for label, cls in enumerate(classes) for name in sorted(names[cls])[:per_class]}
    decoded: dict[str, np.ndarray] = {}
    with tarfile.open(SHARED_ARCHIVE, mode="r|gz") as tar:
        for m in tar:
            if m.name in wanted:
                decoded[m.name] = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
    order = sorted(wanted, key=lambda name: (wanted[name], name))
    labels = np.asarray([wanted[name] for name in order], dtype=np.int64)
    return np.stack([decoded[name] for name in order]), labels, classes


def env_for_tests(tmp_path: Path) -> dict:
    """The environment of a user without W&B credentials, with a private HOME."""
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_MODE", None)
    return env


def run_train(args, tmp_path, *, launcher=None, timeout=600, check=True, env_extra=None, script=None):
    """`python fasttrain/train.py ARGS` (or under `launcher`) in `tmp_path`; raises with its output if it fails.
    `script`: `python -c script ARGS` instead, a test's patch of the trainer that calls its main."""
    entry = ["-c", script] if script is not None else [str(TRAIN)]
    cmd = [*(launcher or [sys.executable]), *entry, *args]
    env = {**env_for_tests(tmp_path), **(env_extra or {})}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def start_train(args, cwd, env_extra=None, **kwargs) -> subprocess.Popen:
    """The trainer as a background process, stdout and stderr merged."""
    env = {**env_for_tests(cwd), **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, str(TRAIN), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, **kwargs,
    )  # fmt: skip


def launch(args, cwd: Path, *, processes: int, env_extra=None, timeout=600, background=False):
    """`accelerate launch` of the trainer with `processes` CPU processes; returns (CompletedProcess, seconds), or
    with `background` the running Popen (stdout and stderr merged)."""
    env = {**env_for_tests(cwd), "ACCELERATE_USE_CPU": "1", **(env_extra or {})}
    if processes == 1:
        launcher = [str(ACCELERATE), "launch", "--num_processes", "1", "--cpu"]
    else:
        launcher = [
            str(ACCELERATE), "launch", "--config_file", str(CPU_2PROC), "--num_processes", str(processes),
            "--main_process_port", str(29500 + os.getpid() % 1000),
        ]  # fmt: skip
    if background:
        return subprocess.Popen(
            [*launcher, str(TRAIN), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*launcher, str(TRAIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.perf_counter() - t0


def has_logged(run_dir: Path, step: int) -> bool:
    """Whether metrics.jsonl of `run_dir` has a row at `step` or later (its last line may be half written)."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and any(r["step"] >= step for r in read_metrics(metrics))


def wait_for_step(run_dir: Path, step: int, proc, timeout=300) -> None:
    """Until metrics.jsonl of `run_dir` has a row at `step` or later; fails if `proc` ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if has_logged(run_dir, step):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} never logged")


def wandb_inspect(*args: str) -> str:
    """`wandb leet inspect --json ARGS`: W&B's own reader of offline runs (wandb.Api cannot read them)."""
    proc = subprocess.run([str(WANDB), "leet", "inspect", "--json", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"wandb leet inspect {args} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc.stdout


def wandb_records(record_file: Path) -> list[dict]:
    """Every record of one offline run's `run-<id>.wandb` file, in the order written."""
    return [json.loads(line) for line in wandb_inspect(str(record_file)).splitlines() if line.strip()]


def wandb_history(records: list[dict]) -> list[tuple[int, dict]]:
    """(step, logged values) of every history record among `records`, in the order logged (repeats kept)."""
    history = [r["history"] for r in records if r.get("type") == "history"]
    return [(h["step"].get("num", 0), h["item"]) for h in history]


def wandb_summary(offline_run_dir: Path) -> dict:
    """config, summary, state and exit code of one offline run directory."""
    return json.loads(wandb_inspect("--summary", str(offline_run_dir)))


def wandb_offline_runs(run_dir: Path) -> list[Path]:
    """The W&B offline run directories under a fasttrain run directory, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def final_weights(run_dir: Path) -> dict:
    """The tensors of a finished run's model.safetensors, by name."""
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "model.safetensors"))


def assert_same_weights(first_run: Path, second_run: Path) -> None:
    """The two runs ended with bit-identical weights (torch.equal, tensor by tensor)."""
    import torch

    first, second = final_weights(first_run), final_weights(second_run)
    assert first.keys() == second.keys()
    unequal = [name for name in first if not torch.equal(first[name], second[name])]
    assert not unequal, f"tensors differ: {unequal}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(json.loads((c / "meta.json").read_text())["step"] for c in (run_dir / "checkpoints").glob("ckpt-*"))


def tree_digest(path: Path) -> str:
    """One hash of every file's name and bytes under `path`."""
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()


def pattern_images(indices: np.ndarray) -> np.ndarray:
    """uint8 [N,32,32,3] inspection images whose pixels say where they came from: red = 8*row + 4,
    green = 8*col + 4, blue = index % 250 + 1."""
    y, x = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    images = np.empty((len(indices), 32, 32, 3), dtype=np.uint8)
    images[..., 0] = 8 * y + 4
    images[..., 1] = 8 * x + 4
    images[..., 2] = (np.asarray(indices) % 250 + 1)[:, None, None]
    return images
