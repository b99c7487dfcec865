"""What W&B offline runs really recorded, read with wandb's own reader.

wandb buffers its offline log (`run-<id>.wandb`) in its service process: a run killed with SIGKILL leaves that file
with the rows of its last few seconds missing, often all of them. So a resumed run cannot assume that the rows in
metrics.jsonl reached W&B. It reads the earlier offline runs of its W&B id with wandb's own reader
(`wandb leet inspect`) and sends again what they lack, and nothing they hold. `launch/wandb_readback.py` reads a
finished run's series through the same reader.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fasttrain.tracking.wandb_keys import to_wandb
from fasttrain.tracking.wandb_run import local_run_dirs

READ_TIMEOUT_S = 60


def recorded_keys(run_dir: Path, run_id: str, current: Path | None) -> dict[int, set[str]]:
    """W&B step -> the keys W&B durably holds at it, over the offline runs of `run_id` in `run_dir`/wandb other than
    `current` (the one this process writes). Raises OSError, ValueError or subprocess.SubprocessError when wandb
    cannot read them."""
    recorded: dict[int, set[str]] = {}
    for offline in local_run_dirs(run_dir, run_id, kind="offline-run"):
        if current is not None and offline.resolve() == Path(current).resolve():
            continue
        for log in offline.glob(f"run-{run_id}.wandb"):
            for step, keys in _history(log):
                recorded.setdefault(step, set()).update(keys)
    return recorded


def holds(recorded: dict[int, set[str]], row: dict[str, Any]) -> bool:
    """Whether W&B already holds every value of metrics row `row` at its step."""
    values, step = to_wandb(row)
    return values.keys() <= recorded.get(step, set())


def offline_records(log: Path) -> list[dict[str, Any]]:
    """Every record of one offline run's `run-<id>.wandb` file, in the order written, as wandb's own reader
    (`wandb leet inspect --json`) gives them: {"type": "history" | "stats" | "summary" | ..., ...}."""
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
        capture_output=True, text=True, timeout=READ_TIMEOUT_S, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def history_rows(records: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(W&B step, logged values) of each history record, in the order logged."""
    rows = []
    for record in records:
        if record.get("type") == "history":
            item = record["history"]
            rows.append((item.get("step", {}).get("num", 0), item.get("item", {})))
    return rows


def _history(log: Path) -> list[tuple[int, set[str]]]:
    return [(step, set(values)) for step, values in history_rows(offline_records(log))]
