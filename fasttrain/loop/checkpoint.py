"""Atomic checkpoints on top of `Accelerator.save_state`.

A checkpoint is a directory `checkpoints/ckpt-e{epoch}-s{step}` holding what Accelerate saves (model, optimiser,
scheduler, grad scaler, every rank's RNG state, and our `Progress`) plus `meta.json`. It is written under a
temporary name, fsynced, and renamed only once every rank has written its part, so a crash or `kill -9` at any
moment leaves either the complete new checkpoint or none of it: the previous one is never touched.

`meta.json`, written last, lists every other file with its size and sha256, so a checkpoint damaged afterwards (a
truncated copy, a lost file, flipped bits) is recognised by `validate` before `Accelerator.load_state` reads it.
`find_resume` skips damaged checkpoints for the newest intact one; nothing here deletes a damaged checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from fasttrain.errors import ConfigError, FasttrainError
from fasttrain.files import fsync_path, fsync_tree, is_write_failure, read_json, write_failure_reason, write_json
from fasttrain.loop.distributed import inject_fault

META = "meta.json"
PREFIX = "ckpt-"
NAME_PATTERN = re.compile(r"ckpt-e(\d+)-s(\d+)")
# What fasttrain's trainer has always saved; checked in checkpoints whose meta.json predates the file list.
LEGACY_REQUIRED = ("model.safetensors", "optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl")
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
        # Walk the directory only once every rank has finished writing (a walk during another rank's write meets
        # its temporary files vanishing); one process per node flushes what that node wrote.
        accelerator.wait_for_everyone()
        if accelerator.is_local_main_process:
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
            "files": file_list(tmp),  # every rank's files are written (the barrier above)
        }
        write_json(tmp / META, meta)  # fsynced with its directory entry, before the rename below publishes it
        inject_fault(accelerator.process_index, progress.step, at="checkpoint")
        if final.exists():
            set_aside_or_remove(final)
        os.replace(tmp, final)
        fsync_path(ckpt_root)
    except Exception as e:
        if not is_write_failure(e):
            raise
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = newest_intact(ckpt_root)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no intact earlier checkpoint exists"
        raise FasttrainError(
            f"could not write checkpoint {final}: {write_failure_reason(e)}; {kept}. "
            f"Free disk space or choose another --run.dir, then continue with --resume auto"
        ) from None
    prune(ckpt_root, keep)
    return final


def set_aside_or_remove(ckpt: Path) -> None:
    """Make way for a new checkpoint of the same step. An intact one (an interrupt right after an epoch-end save) is
    removed; a damaged one (a resume from an older checkpoint skipped it) is renamed `damaged-<name>`, which no
    function here lists, prunes or deletes."""
    if validate(ckpt) is None:
        shutil.rmtree(ckpt)
        return
    aside = ckpt.with_name(f"damaged-{ckpt.name}")
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = ckpt.with_name(f"damaged-{ckpt.name}-{suffix}")
    os.replace(ckpt, aside)


def prune(ckpt_root: Path, keep: int) -> list[Path]:
    """Delete the intact checkpoints older than the newest `keep` intact ones; returns those deleted.

    Damaged checkpoints are neither counted nor deleted: they stay on disk for the user to inspect or remove
    (`find_resume` skips them), and counting them would leave fewer than `keep` checkpoints a resume can use.
    """
    intact = [c for c in checkpoint_dirs(ckpt_root) if validate(c) is None]
    old = intact[:-keep]
    for ckpt in old:
        shutil.rmtree(ckpt, ignore_errors=True)
    return old


def file_list(ckpt: Path) -> list[dict[str, Any]]:
    """Every file below `ckpt` except meta.json, sorted: relative path, size in bytes and sha256."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p != ckpt / META)
    return [{"path": p.relative_to(ckpt).as_posix(), "size": p.stat().st_size, "sha256": sha256_of(p)} for p in files]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_meta(ckpt: Path) -> dict[str, Any] | None:
    try:
        meta = read_json(ckpt / META)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("complete") else None


def validate(ckpt: Path) -> str | None:
    """None when the checkpoint is complete and intact; otherwise a short reason naming the damaged file.

    With a file list in meta.json, every listed file must exist with its size and sha256. Checkpoints written before
    the list existed get what can be checked without it: the files fasttrain's trainer always writes are present,
    safetensors headers agree with their file's size, and torch files (zip archives) pass their CRC checks.
    """
    if not ckpt.is_dir():
        return f"{ckpt.name} is not a directory"
    meta_path = ckpt / META
    if not meta_path.is_file():
        return f"{META} is missing"
    try:
        meta = read_json(meta_path)
    except OSError as e:
        return f"{META} cannot be read ({e.strerror})"
    except ValueError:  # includes UnicodeDecodeError
        return f"{META} is not valid JSON"
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        return f"{META} does not mark the checkpoint complete"
    for key, kind in (("epoch", int), ("step", int), ("config", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"{META} has no valid '{key}'"
    if not all(isinstance(values, dict) for values in meta["config"].values()):
        return f"{META} has no valid 'config' (expected sections of settings, e.g. model: {{name: ...}})"
    if "files" not in meta:
        return _legacy_problem(ckpt, meta)
    return _listed_files_problem(ckpt, meta["files"])


def _listed_files_problem(ckpt: Path, files: Any) -> str | None:
    def well_formed(entry: Any) -> bool:
        return (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
            and not Path(entry["path"]).is_absolute()
            and ".." not in Path(entry["path"]).parts
        )

    if not isinstance(files, list) or not files or not all(well_formed(e) for e in files):
        return f"{META} has a malformed file list"
    # Sizes first: a missing or truncated file is found without reading the others.
    for entry in files:
        path = ckpt / entry["path"]
        if not path.is_file():
            return f"{entry['path']} is missing"
        if (size := path.stat().st_size) != entry["size"]:
            return f"{entry['path']} is {size:,} bytes, expected {entry['size']:,}"
    for entry in files:
        if sha256_of(ckpt / entry["path"]) != entry["sha256"]:
            return f"{entry['path']} is corrupt: its sha256 differs from the one recorded when it was saved"
    return None


def _legacy_problem(ckpt: Path, meta: dict[str, Any]) -> str | None:
    world_size = meta.get("world_size")
    ranks = world_size if isinstance(world_size, int) and world_size >= 1 else 1
    required = [*LEGACY_REQUIRED, *(f"random_states_{i}.pkl" for i in range(ranks))]
    for name in required:
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    for path in sorted(ckpt.rglob("*.safetensors")):
        if problem := _safetensors_problem(path):
            return f"{path.relative_to(ckpt).as_posix()} {problem}"
    for path in sorted([*ckpt.rglob("*.bin"), *ckpt.rglob("*.pkl")]):
        if problem := _torch_file_problem(path):
            return f"{path.relative_to(ckpt).as_posix()} {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes the header locates."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else None
        if header_len is None or header_len > size - 8:
            return f"is {size:,} bytes, too short for its header"
        try:
            header = json.loads(f.read(header_len))
            data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has a damaged header"
    expected = 8 + header_len + data_end
    return None if size == expected else f"is {size:,} bytes, expected {expected:,}"


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive: a truncated one has no central directory, a changed byte fails a CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return f"is damaged: {path.stat().st_size:,} bytes that are not a complete torch file"
    return None if bad_member is None else f"is corrupt: {bad_member} fails its CRC check"


def checkpoint_dirs(ckpt_root: Path) -> list[Path]:
    """Every checkpoint directory, intact or damaged, oldest first; `.tmp-*` directories are not checkpoints."""
    if not ckpt_root.is_dir():
        return []

    def step(ckpt: Path) -> int:
        if match := NAME_PATTERN.fullmatch(ckpt.name):
            return int(match.group(2))
        meta = read_meta(ckpt)
        return meta["step"] if meta and isinstance(meta.get("step"), int) else -1

    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: (step(p), p.name))


def newest_intact(ckpt_root: Path) -> Path | None:
    return next((c for c in reversed(checkpoint_dirs(ckpt_root)) if validate(c) is None), None)


def find_resume(ckpt_root: Path, announce: Callable[[str], None]) -> Path | None:
    """The newest intact checkpoint under `ckpt_root`, announcing each newer damaged one it skips.

    None when there is no checkpoint directory at all; ConfigError when there are some but none is intact.
    Damaged checkpoints are left where they are.
    """
    candidates = checkpoint_dirs(ckpt_root)
    for ckpt in reversed(candidates):
        reason = validate(ckpt)
        if reason is None:
            return ckpt
        announce(f"skipping damaged checkpoint {ckpt}: {reason}")
    if not candidates:
        return None
    raise ConfigError(
        f"no intact checkpoint in {ckpt_root}: all {len(candidates)} are damaged (reasons above). "
        "Start over in another --run.dir, or delete the damaged checkpoints"
    )


def check_explicit(path: Path) -> None:
    """For `--resume DIR`: ConfigError naming what is wrong when `path` is not an intact checkpoint."""
    path = Path(path)
    reason = validate(path)
    if reason is None:
        return
    if (path / "checkpoints").is_dir() and (newest := newest_intact(path / "checkpoints")):  # a run directory
        how = f"it is a run: continue it with --resume auto --run.dir {path}, or name a checkpoint, e.g. {newest}"
    elif newest := newest_intact(path):  # a run's checkpoints/ folder
        how = f"it holds checkpoints: name one, e.g. {newest} (the newest intact)"
    else:
        how = "name another checkpoint, use --resume auto (the newest intact one), or start over in another --run.dir"
    raise ConfigError(f"run.resume: {path} is not an intact fasttrain checkpoint: {reason}; {how}")


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary and incomplete directories are ignored."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and read_meta(p)]
    return sorted(found, key=lambda p: read_meta(p)["step"])


def remove_partial(ckpt_root: Path) -> None:
    """Temporary directories left by a crash mid-save."""
    if ckpt_root.is_dir():
        for p in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a checkpoint's run and this one, ignoring those safe to change on resume and
    former names of the same model or data mode: `key: checkpoint -> now` each."""
    from fasttrain.config import with_current_names

    a, b = _settings(with_current_names(saved)), _settings(current)
    keys = sorted((set(a) | set(b)) - RESUMABLE_KEYS)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys if a.get(k) != b.get(k)]


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """`section.key -> value`, and `param_groups.NAME.key -> value` for each parameter group's own settings."""
    from fasttrain.config import flatten

    groups = config.get("param_groups") or {}
    flat = flatten({section: values for section, values in config.items() if section != "param_groups"})
    for name, group in groups.items():
        if not isinstance(group, dict):  # a hand-edited meta.json: compared whole
            flat[f"param_groups.{name}"] = group
            continue
        flat.update({f"param_groups.{name}.{key}": value for key, value in group.items()})
    return flat


# What --resume force cannot change: the optimiser state it loads belongs to one optimiser type, and the step count
# it continues from belongs to one number of steps per epoch.
UNFORCEABLE = ("train.optimizer", "param_groups.*.optimizer", "train.batch_size", "data.subset")


def _listed(diffs: list[str], most: int = 4) -> str:
    return "; ".join(diffs[:most]) + (f"; and {len(diffs) - most} more" if len(diffs) > most else "")


def check_compatible(ckpt: Path, config: dict[str, Any], world_size: int, force: bool, explicit: bool) -> list[str]:
    """Refuse a checkpoint of other settings (one line, the first differences named) unless forced; `explicit`: it
    was named as --resume DIR, which force cannot take. Returns what force overrides, for the run to say."""
    meta = read_meta(ckpt)
    diffs = config_differences(meta["config"], config)
    if meta.get("world_size") != world_size:
        diffs.append(f"processes: {meta.get('world_size')} -> {world_size} (the data order differs)")
    if not diffs:
        return []
    if not force:
        how = (
            "copy it into a new run's checkpoints/ folder and pass --resume force there"
            if explicit
            else "pass --resume force to load it anyway"
        )
        raise ConfigError(
            f"checkpoint {ckpt} was written with other settings ({_listed(diffs)}); run with the checkpoint's "
            f"settings, or {how}"
        )
    fixed = [d for d in diffs if any(fnmatch(d.split(":")[0], key) for key in UNFORCEABLE)]
    if fixed:
        raise ConfigError(
            f"--resume force cannot change {_listed(fixed)} (the checkpoint's optimiser state and step count hold "
            f"them): set them as they were, or train from scratch in another --run.dir"
        )
    return diffs


def load(accelerator, ckpt: Path) -> None:
    """`accelerator.load_state`, refusing in one line a checkpoint whose tensors do not fit this run's model or
    optimisers: what a model setting changed under --resume force leads to (force keeps the weights)."""
    try:
        accelerator.load_state(str(ckpt))
    except (RuntimeError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's load_state_dict: "Error(s) in loading state_dict for M:" then one line a tensor; Optimizer's:
        # "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
        if not lines or not ("loading state_dict" in lines[0] or "parameter group" in lines[0]):
            raise
        raise ConfigError(
            f"checkpoint {ckpt} does not fit this run's model ({(lines[1:] or lines)[0].rstrip('.')}): --resume "
            "force keeps the checkpoint's weights, so set the model as it was, or train from scratch in another "
            "--run.dir"
        ) from None
