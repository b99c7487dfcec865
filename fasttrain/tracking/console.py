"""A fixed-width per-epoch table for the console:

|  epoch  |  train_loss  |  val_acc  |
-------------------------------------
|      1  |      2.3012  |   0.1032  |
"""

from typing import Any

_MIN_WIDTH = 6


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
