"""The run's own metrics log: one JSON object per line (`metrics.jsonl`), readable without W&B.

Rows follow fasttrain's one JSON policy (fasttrain.files): non-finite floats are spelled "NaN", "Infinity",
"-Infinity", and `read_metrics` turns them back into floats.

Every row should carry an integer "step": resuming uses it to drop what was logged after the checkpoint.
Write a step's rows before saving its checkpoint, so a resume never lacks them. Main process only.
"""

import json
import os
from pathlib import Path
from typing import IO, Any

from fasttrain.errors import FasttrainError
from fasttrain.files import dumps, from_json_safe, replacing
from fasttrain.loop.distributed import inject_fault


def encode_row(row: dict[str, Any]) -> str:
    return dumps(row)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics file. A cut-off last line (a crash mid-write) is skipped; damage elsewhere raises."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise _damaged(path, f"byte {e.start} is not UTF-8 text") from None
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            row = None
        if not isinstance(row, dict):
            raise _damaged(path, f"line {number} is not a JSON object")
        rows.append(from_json_safe(row))
    return rows


def _damaged(path: Path, what: str) -> FasttrainError:
    return FasttrainError(
        f"{path} is damaged: {what}; delete the damaged line, or move the file aside (a resumed run then starts "
        f"a new one), and run again"
    )


def _logged_after(row: dict[str, Any], resume_step: int) -> bool:
    step = row.get("step")
    return isinstance(step, int) and not isinstance(step, bool) and step > resume_step


def _rewrite(path: Path, rows: list[dict[str, Any]]) -> None:
    with replacing(path) as temp, open(temp, "w", encoding="utf-8") as out:
        out.writelines(encode_row(row) + "\n" for row in rows)  # `replacing` fsyncs it before the rename


class MetricsFile:
    """Appends metric rows to a JSON-lines file, one flushed line per `write`.

    Without `resume_step` an existing file is replaced. With it, the file is continued: rows with
    `step > resume_step` (logged after the checkpoint being resumed) are dropped first, so the resumed
    run neither loses nor repeats history. Rows without an integer "step" are kept. `previously_logged` holds the
    (kind, step) of every row the file had before, dropped ones included: what the interrupted run may already
    have sent elsewhere (W&B). `kept_rows` holds the rows kept (empty without `resume_step`).
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.previously_logged: set[tuple[Any, Any]] = set()
        self.kept_rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.exists():
            rows = read_metrics(self.path)
            self.previously_logged = {(row.get("kind"), row.get("step")) for row in rows}
            self.kept_rows = [row for row in rows if not _logged_after(row, resume_step)]
            _rewrite(self.path, self.kept_rows)
            self._file: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run)
        else:
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (open for the run)

    def write(self, row: dict[str, Any]) -> None:
        line = encode_row(row) + "\n"
        half = len(line) // 2
        self._file.write(line[:half])
        self._file.flush()
        inject_fault(0, row.get("step", -1), at="metrics")  # the reliability tests' kill mid-line; a no-op otherwise
        self._file.write(line[half:])
        self._file.flush()

    def sync(self) -> None:
        """Force written rows to disk (call before saving a checkpoint)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file.closed:
            return
        self.sync()
        self._file.close()

    def __enter__(self) -> "MetricsFile":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
