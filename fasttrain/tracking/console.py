"""The run's console output: `say` prints a line, `EpochTable` formats the per-epoch table:

|  epoch  |  train_loss  |  val_acc  |
-------------------------------------
|      1  |      2.3012  |   0.1032  |
"""

import contextlib
import sys
from typing import Any

from fasttrain.errors import silence_stdout, stdout_reader_gone

_MIN_WIDTH = 6


def say(message: str) -> None:
    """Print one line of a run's console output (main process). A reader of it that went away (a dead `tee` or
    `head`) must not cost the run: it goes on, its rows still reach metrics.jsonl and W&B."""
    try:
        print(message, flush=True)
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise
        silence_stdout()
        with contextlib.suppress(OSError):
            print("fasttrain train: the reader of this run's output went away; training goes on (every epoch is in "
                  "metrics.jsonl)", file=sys.stderr, flush=True)  # fmt: skip


class EpochTable:
    """Formats rows of named values into aligned columns.

    `columns` is a list of (name, format spec), e.g. [("epoch", "d"), ("val_acc", ".4f")]. A column is as wide as
    its name (at least 6 characters); values are right-aligned; a missing value leaves the cell blank, a value
    the spec does not fit (a string under ".4f") is shown as text, and a value wider than its column shifts the
    rest of that row.
    """

    def __init__(self, columns: list[tuple[str, str]]) -> None:
        if not columns:
            raise ValueError("EpochTable needs at least one column")
        self.columns = list(columns)
        self._widths = [max(len(name), _MIN_WIDTH) for name, _ in self.columns]

    def _line(self, cells: list[str]) -> str:
        return "".join(f"|  {cell}  " for cell in cells) + "|"

    def header(self) -> str:
        """The column names and a rule under them (two lines)."""
        names = self._line([name.center(width) for (name, _), width in zip(self.columns, self._widths)])
        return names + "\n" + "-" * len(names)

    def row(self, values: dict[str, Any]) -> str:
        cells = []
        for (name, spec), width in zip(self.columns, self._widths):
            cells.append(_format(values.get(name), spec).rjust(width))
        return self._line(cells)


def _format(value: Any, spec: str) -> str:
    if value is None:
        return ""
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)
