"""Learning curves from the metrics log: accuracy and loss per epoch, train against validation.

A widening gap between the train and validation curves is overfitting; both flat and high is underfitting.
Uses matplotlib's object API with the Agg canvas (no display, no pyplot global state).
"""

import math
from pathlib import Path
from typing import Any

from fasttrain.files import replacing

# (panel title, y label, [(row key, legend label, line style)])
_PANELS = (
    (
        "Accuracy",
        "accuracy",
        [
            ("train_acc", "train (running)", "--"),
            ("train_eval_acc", "train (eval mode)", "-."),
            ("val_acc", "validation", "-"),
        ],
    ),
    (
        "Loss",
        "loss",
        [
            ("train_loss", "train (running)", "--"),
            ("train_eval_loss", "train (eval mode)", "-."),
            ("val_loss", "validation", "-"),
        ],
    ),
)


def epoch_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The end-of-epoch rows, evaluated or not (with train.eval_every > 1 the validation lines have gaps)."""
    return [row for row in rows if row.get("kind") == "epoch"]


def _as_float(value: Any) -> float:
    """A plottable number; missing or non-finite values become NaN (a gap in the line)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def curves(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """What the figure draws: per panel title, per line label, (epochs, values); a value missing or not finite is
    NaN (a gap), and a line with no value at all is left out."""
    epochs = epoch_rows(rows)
    x = [_as_float(row.get("epoch", index + 1)) for index, row in enumerate(epochs)]
    panels = {}
    for panel_title, _, series in _PANELS:
        lines = {}
        for key, label, _ in series:
            y = [_as_float(row.get(key)) for row in epochs]
            if not all(math.isnan(value) for value in y):
                lines[label] = (x, y)
        panels[panel_title] = lines
    return panels


def plot_curves(rows: list[dict[str, Any]], out_png: Path, title: str = "") -> Path:
    """Draw train/validation accuracy and loss per epoch from `rows` into `out_png` (replaced atomically)."""
    from matplotlib.figure import Figure

    drawn = curves(rows)
    figure = Figure(figsize=(10, 4), layout="constrained")
    if title:
        figure.suptitle(title)
    for axes, (panel_title, y_label, series) in zip(figure.subplots(1, 2), _PANELS):
        axes.set_title(panel_title)
        axes.set_xlabel("epoch")
        axes.set_ylabel(y_label)
        axes.grid(True, alpha=0.3)
        lines = drawn[panel_title]
        for _, label, style in series:
            if label in lines:  # markers keep a single epoch (a lone point, no line) visible
                axes.plot(*lines[label], style, marker="o", markersize=3, label=label)
        if lines:
            axes.legend()
        else:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)

    out_png = Path(out_png)
    with replacing(out_png) as temp:
        figure.savefig(temp, format="png", dpi=100)
    return out_png
