"""Atomic checkpoints on top of `Accelerator.save_state`.

A checkpoint is a directory `checkpoints/ckpt-e{epoch}-s{step}` holding what Accelerate saves (model, optimiser,
scheduler, grad scaler, every rank's RNG state, and our `Progress`) plus `meta.json`. It is written under a
temporary name, fsynced, and renamed only once every rank has written its part, so a crash or `kill -9` at any
moment leaves either the complete new checkpoint or none of it: the previous one is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fasttrain.errors import ConfigError, FasttrainError
from fasttrain.files import fsync_path, fsync_tree
from fasttrain.loop.distributed import inject_fault

META = "meta.json"
PREFIX = "ckpt-"
# Settings that may change between a run and its resumption without changing what is being trained.
RESUMABLE_KEYS = {
    "run.resume",
    "run.dir",
    "data.dir",
    "data.source",
    "data.workers",
    "data.eval_batch_size",
    "train.log_every",
    "train.compile",
    "train.compile_mode",
    "train.target_acc",
    "checkpoint.every",
    "checkpoint.keep",
    "wandb.mode",
    "wandb.project",
    "wandb.entity",
    "wandb.name",
    "wandb.tags",
}


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint (registered with Accelerate's checkpointing)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    step_in_epoch: int = 0  # steps of epoch `epoch` already done (non-zero only for interrupt checkpoints)
    train_time_s: float = 0.0
    best_val_acc: float | None = None
    last_val: dict[str, float] | None = None  # the latest evaluation: loss, acc, count
    time_to_target_s: float | None = None
    skipped_steps: int = 0
    wandb_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def save(accelerator, ckpt_root: Path, progress: Progress, config: dict[str, Any], keep: int) -> Path | None:
    """Write a checkpoint of the current state on every rank; returns its path (on the main process)."""
    name = f"{PREFIX}e{progress.epoch:04d}-s{progress.step:07d}"
    tmp = ckpt_root / f".tmp-{name}"
    final = ckpt_root / name
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        fsync_tree(tmp)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
        meta = {
            "complete": True,
            "epoch": progress.epoch,
            "step": progress.step,
            "step_in_epoch": progress.step_in_epoch,
            "world_size": accelerator.num_processes,
            "config": config,
        }
        with open(tmp / META, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        inject_fault(accelerator.process_index, progress.step, at="checkpoint")
        if final.exists():  # same step saved twice (an interrupt right after an epoch-end save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(ckpt_root)
    except Exception as e:
        # safetensors reports a full disk as its own error type, not OSError: recognise both.
        if not (isinstance(e, OSError) or "I/O error" in str(e)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(ckpt_root)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        reason = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else str(e)
        raise FasttrainError(
            f"could not write checkpoint {final}: {reason}; {kept}. "
            f"Free disk space or choose another --run.dir, then continue with --resume auto"
        ) from None
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(ckpt: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("complete") else None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary and incomplete directories are ignored."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and read_meta(p)]
    return sorted(found, key=lambda p: read_meta(p)["step"])


def exists_for_step(ckpt_root: Path, step: int) -> bool:
    """Whether a complete checkpoint of optimizer step `step` is already there."""
    return any(read_meta(p)["step"] == step for p in list_checkpoints(ckpt_root))


def remove_partial(ckpt_root: Path) -> None:
    """Temporary directories left by a crash mid-save."""
    if ckpt_root.is_dir():
        for p in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a checkpoint's run and this one, ignoring those safe to change on resume."""
    a, b = flatten(saved), flatten(current)
    keys = sorted((set(a) | set(b)) - RESUMABLE_KEYS)
    return [
        f"  {k}: checkpoint={a.get(k, '<unset>')!r}  now={b.get(k, '<unset>')!r}"
        for k in keys
        if a.get(k, "<unset>") != b.get(k, "<unset>")
    ]


def check_compatible(ckpt: Path, config: dict[str, Any], world_size: int, force: bool) -> None:
    meta = read_meta(ckpt)
    diffs = config_differences(meta["config"], config)
    if diffs and not force:
        raise ConfigError(
            f"checkpoint {ckpt} was written by a different configuration:\n"
            + "\n".join(diffs)
            + "\nRun with the checkpoint's settings, or pass --resume force to load it anyway."
        )
    if meta.get("world_size") != world_size and not force:
        raise ConfigError(
            f"checkpoint {ckpt} was written by {meta.get('world_size')} processes, this run has {world_size}; "
            "the data order would differ. Relaunch with the same number of processes or pass --resume force."
        )
