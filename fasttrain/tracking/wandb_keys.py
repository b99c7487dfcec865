"""How fasttrain's metrics rows (metrics.jsonl) are named in W&B: the one table, and the row -> W&B mapping.

W&B groups charts by the prefix before "/": `train/` (the optimiser's view), `val/` (the test set), `perf/`
(throughput), `sys/` (the device), `time/` (clocks). Step rows (every `train.log_every` steps) and epoch rows
report some quantities over different spans (a window of steps vs a whole epoch); those get separate keys
(`perf/images_per_sec` vs `perf/epoch_images_per_sec`, `train/loss` vs `train/epoch_loss`) so a chart never
mixes the two. `epoch` and `time/train_s` are logged as values too, so charts can use them as x-axes.
Keys a row holds that the table does not know are logged under their own name.
"""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WandbKey:
    name: str  # the key in W&B
    summary: str | None = None  # what the runs table keeps: "max" for accuracies, "min" for losses, None: the last
    x_axis: str | None = None  # the key its charts are drawn against by default; None: the global step


EPOCH = WandbKey("epoch")
TRAIN_TIME = WandbKey("time/train_s")
LR = WandbKey("train/lr")

# Per row kind: fasttrain row key -> W&B key. "kind" and "step" (the W&B step itself) are not logged as values.
ROW_KEYS: dict[str, dict[str, WandbKey]] = {
    "step": {
        "epoch": EPOCH,
        "time_s": TRAIN_TIME,
        "lr": LR,
        "train_loss": WandbKey("train/loss", "min"),
        "train_loss_smoothed": WandbKey("train/loss_smoothed", "min"),
        "train_acc": WandbKey("train/acc", "max"),
        "images_per_sec": WandbKey("perf/images_per_sec"),
        "images_per_sec_per_device": WandbKey("perf/images_per_sec_per_device"),
        "images_per_sec_main": WandbKey("perf/images_per_sec_main"),
        "step_time_ms": WandbKey("perf/step_time_ms"),
    },
    "epoch": {
        "epoch": EPOCH,
        "time_s": TRAIN_TIME,
        "lr": LR,
        "train_loss": WandbKey("train/epoch_loss", "min", "epoch"),
        "train_loss_smoothed": WandbKey("train/epoch_loss_smoothed", "min", "epoch"),
        "train_acc": WandbKey("train/epoch_acc", "max", "epoch"),
        "train_eval_loss": WandbKey("train/eval_loss", "min", "epoch"),
        "train_eval_acc": WandbKey("train/eval_acc", "max", "epoch"),
        "val_loss": WandbKey("val/loss", "min", "epoch"),
        "val_acc": WandbKey("val/acc", "max", "epoch"),
        "val_count": WandbKey("val/count", None, "epoch"),
        "images_per_sec": WandbKey("perf/epoch_images_per_sec", None, "epoch"),
        "images_per_sec_per_device": WandbKey("perf/epoch_images_per_sec_per_device", None, "epoch"),
        "step_time_ms": WandbKey("perf/epoch_step_time_ms", None, "epoch"),
        "gpu_mem_gb": WandbKey("sys/gpu_mem_gb", "max", "epoch"),
    },
}
NOT_LOGGED = frozenset({"kind", "step"})

# summary.json keys shown as columns of the runs table (the W&B summary holds summary.json's flat keys).
SUMMARY_COLUMNS = ("val_acc", "tta_acc", "best_val_acc", "train_time_s", "images_per_sec", "model")


def logged_keys() -> frozenset[str]:
    """Every W&B key a metrics row can be logged under."""
    return frozenset(key.name for table in ROW_KEYS.values() for key in table.values())


def metric_definitions() -> list[WandbKey]:
    """The keys that need a `define_metric` (a summary or an x-axis of their own), x-axes first, each once."""
    axes = {key.x_axis for table in ROW_KEYS.values() for key in table.values() if key.x_axis}
    defined = {key.name: key for table in ROW_KEYS.values() for key in table.values() if key.summary or key.x_axis}
    x_axes = [WandbKey(name) for name in sorted(axes | {TRAIN_TIME.name})]
    return x_axes + sorted(defined.values(), key=lambda key: key.name)


def to_wandb(row: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """(W&B values, W&B step) for one metrics row; None values are left out (W&B would record nothing)."""
    table = ROW_KEYS.get(row.get("kind"), {})
    values = {
        (table[key].name if key in table else key): value
        for key, value in row.items()
        if key not in NOT_LOGGED and value is not None
    }
    step = row.get("step")
    return values, step if isinstance(step, int) else None
