"""What a grid's runs measured: one row per cell read from its summary.json and metrics.jsonl, written as
results.csv, results.md and comparison.png (validation accuracy and training loss per epoch, a panel per depth)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasttrain.files import replacing
from fasttrain.grid.spec import Cell
from fasttrain.tracking.metrics import read_metrics
from fasttrain.tracking.report import read_summary

CSV_COLUMNS = (
    "cell",
    "block",
    "depth_conv_layers",
    "blocks_per_stage",
    "dropout",
    "params",
    "status",
    "epochs",
    "final_train_acc",
    "final_train_eval_acc",
    "final_val_acc",
    "best_val_acc",
    "train_val_gap",
    "train_time_s",
    "run_dir",
)
BLOCK_COLORS = {"plain": "tab:red", "residual": "tab:blue", "skip": "tab:green"}
DROPOUT_STYLES = ("-", "--", ":", "-.")


@dataclass
class CellResult:
    cell: Cell
    run_dir: Path
    status: str  # "finished", or why not: "failed (exit 1)", "nonfinite_loss", "not run"
    params: int | None
    epoch_rows: list[dict[str, Any]] = field(default_factory=list)
    train_time_s: float | None = None
    best_val_acc: float | None = None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def _final(self, key: str) -> float | None:
        return self.epoch_rows[-1].get(key) if self.finished and self.epoch_rows else None

    @property
    def final_train_acc(self) -> float | None:
        return self._final("train_acc")

    @property
    def final_train_eval_acc(self) -> float | None:
        """Accuracy on training images in eval mode, unaugmented (train.eval_train_images), if the run measured it."""
        return self._final("train_eval_acc")

    @property
    def final_val_acc(self) -> float | None:
        return self._final("val_acc")

    @property
    def train_val_gap(self) -> float | None:
        """Train minus validation accuracy, from the eval-mode train accuracy when measured: the running one sees
        augmented images and dropout, which hides part of the gap."""
        train = self.final_train_eval_acc if self.final_train_eval_acc is not None else self.final_train_acc
        val = self.final_val_acc
        return None if train is None or val is None else train - val


def read_cell(cell: Cell, run_dir: Path, exit_code: int | None, params: int) -> CellResult:
    """A cell's result. `exit_code` is None for a reused run (its summary decides) and the trainer's exit code for
    a run just made, which wins over a summary left behind by an earlier attempt."""
    summary = read_summary(run_dir) or {}
    metrics_path = Path(run_dir) / "metrics.jsonl"
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    if exit_code is not None and exit_code != 0:
        status = f"failed (exit {exit_code})"
    else:
        status = summary.get("status", "failed (no summary.json)" if exit_code == 0 else "not run")
    return CellResult(
        cell=cell,
        run_dir=Path(run_dir),
        status=status,
        params=summary.get("params", params),
        epoch_rows=[row for row in rows if row.get("kind") == "epoch"],
        train_time_s=summary.get("train_time_s") if status == "finished" else None,
        best_val_acc=summary.get("best_val_acc") if status == "finished" else None,
    )


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return round(value, 4) if isinstance(value, float) else value


def write_csv(results: list[CellResult], path: Path) -> Path:
    with replacing(path) as temp, open(temp, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            row = (
                r.cell.name,
                r.cell.block,
                r.cell.depth,
                r.cell.blocks_per_stage,
                r.cell.dropout,
                r.params,
                r.status,
                len(r.epoch_rows),
                r.final_train_acc,
                r.final_train_eval_acc,
                r.final_val_acc,
                r.best_val_acc,
                r.train_val_gap,
                r.train_time_s,
                str(r.run_dir),
            )
            writer.writerow([_csv_value(v) for v in row])
    return path


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def markdown_table(results: list[CellResult]) -> str:
    header = (
        "| block | depth (conv layers) | dropout | params | final train acc (running) | final train acc (eval mode) "
        "| final val acc | best val acc | train−val gap | train time s | status |"
    )
    lines = [header, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in results:
        gap = "" if r.train_val_gap is None else f"{100 * r.train_val_gap:+.1f} pp"
        seconds = "" if r.train_time_s is None else f"{r.train_time_s:.1f}"
        params = "" if r.params is None else f"{r.params:,}"
        status = r.status if r.finished else f"**{r.status}**"
        lines.append(
            f"| {r.cell.block} | {r.cell.depth} | {r.cell.dropout:g} | {params} | {_percent(r.final_train_acc)} "
            f"| {_percent(r.final_train_eval_acc)} | {_percent(r.final_val_acc)} | {_percent(r.best_val_acc)} "
            f"| {gap} | {seconds} | {status} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown(results: list[CellResult], path: Path) -> Path:
    with replacing(path) as temp:
        temp.write_text(markdown_table(results))
    return path


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(row.get("epoch"), row.get(key)) for row in rows]
    points = [(float(x), float(y)) for x, y in points if x is not None and y is not None and math.isfinite(y)]
    return [x for x, _ in points], [y for _, y in points]


def plot_comparison(results: list[CellResult], path: Path) -> Path:
    """Row 1: validation accuracy per epoch; row 2: training loss. One column per depth, one line per block
    (line style per dropout value). Failed cells are drawn as far as they got, marked in the legend."""
    from matplotlib.figure import Figure

    depths = sorted({r.cell.depth for r in results})
    dropouts = sorted({r.cell.dropout for r in results})
    figure = Figure(figsize=(3.6 * len(depths), 6.0), layout="constrained")
    axes = figure.subplots(2, len(depths), squeeze=False, sharey="row")  # depths compared on one scale
    for column, depth in enumerate(depths):
        top, bottom = axes[0][column], axes[1][column]
        top.set_title(f"{depth} conv layers")
        top.set_ylabel("validation accuracy" if column == 0 else "")
        bottom.set_ylabel("training loss" if column == 0 else "")
        bottom.set_xlabel("epoch")
        for r in (r for r in results if r.cell.depth == depth):
            label = r.cell.block + (f", dropout {r.cell.dropout:g}" if len(dropouts) > 1 else "")
            label += "" if r.finished else f" ({r.status})"
            style = {
                "color": BLOCK_COLORS.get(r.cell.block),
                "linestyle": DROPOUT_STYLES[dropouts.index(r.cell.dropout) % len(DROPOUT_STYLES)],
                "marker": "o",
                "markersize": 2.5,
            }
            top.plot(*_series(r.epoch_rows, "val_acc"), label=label, **style)
            bottom.plot(*_series(r.epoch_rows, "train_loss"), **style)
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
        top.legend(fontsize="small")
    with replacing(path) as temp:
        figure.savefig(temp, format="png", dpi=80)
    return path
