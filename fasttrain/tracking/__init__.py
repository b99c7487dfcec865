"""Run tracking: W&B (online, offline or off), a local JSON-lines metrics log, learning-curve plots and the
console epoch table. Importing this package imports neither wandb nor matplotlib; they load on first use."""

from fasttrain.tracking.console import EpochTable
from fasttrain.tracking.metrics import MetricsFile, read_metrics
from fasttrain.tracking.plots import plot_curves
from fasttrain.tracking.wandb_run import MODES, WandbRun, resolve_mode, start_wandb

__all__ = [
    "MODES",
    "EpochTable",
    "MetricsFile",
    "WandbRun",
    "plot_curves",
    "read_metrics",
    "resolve_mode",
    "start_wandb",
]
