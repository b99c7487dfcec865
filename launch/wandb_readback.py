"""Read a fasttrain run's W&B offline run back with wandb's own reader and print one JSON object: the throughput,
accuracy and GPU-memory series fasttrain logged, and the system series (GPU memory, utilisation) wandb sampled.

    python launch/wandb_readback.py RUN_DIR

The GPU check uses it to show what a W&B dashboard of the GPU run will hold (`wandb sync` uploads the same file).
"""

import json
import sys
from pathlib import Path

from fasttrain.tracking.wandb_history import history_rows, offline_records

LOGGED = ("perf/images_per_sec", "perf/epoch_images_per_sec", "perf/step_time_ms", "sys/gpu_mem_gb", "val/acc",
          "train/loss", "time/train_s")  # fmt: skip
SYSTEM_PREFIXES = ("gpu.", "cpu", "memory_percent", "proc.memory.rssMB")


def read_back(run_dir: Path) -> dict:
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    if not offline:
        raise SystemExit(f"wandb_readback: no W&B offline run under {run_dir}/wandb (was the run made with W&B off?)")
    log = next(offline[-1].glob("run-*.wandb"))
    records = offline_records(log)
    history = history_rows(records)
    logged: dict[str, list] = {key: [] for key in LOGGED}
    for step, values in history:
        for key in LOGGED:
            if key in values:
                logged[key].append([step, values[key]])
    system: dict[str, list] = {}
    for record in records:
        if record.get("type") == "stats":
            stats = record["stats"]
            for key, value in stats.get("item", {}).items():
                if key.startswith(SYSTEM_PREFIXES):
                    system.setdefault(key, []).append([stats.get("timestamp"), value])
    return {
        "wandb_file": str(log), "records": len(records), "history_rows": len(history),
        "stats_samples": sum(r.get("type") == "stats" for r in records), "logged": logged, "system": system,
    }  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python launch/wandb_readback.py RUN_DIR")
    print(json.dumps(read_back(Path(sys.argv[1]))))
