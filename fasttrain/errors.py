"""User-facing errors and exit codes: a message that names the problem and the fix, printed without a traceback.

Exit codes, the same for every fasttrain command:
  0 finished; 1 an unexpected failure (a bug: the traceback is shown); 2 bad input or a broken environment the user
  can fix (`FasttrainError`); 3 training stopped on a non-finite loss; 128 + N stopped by signal N (130 Ctrl-C, 143
  SIGTERM) after writing a checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


class FasttrainError(Exception):
    """Bad input or a broken environment the user can fix. Entry points print it and exit with `exit_code`."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(FasttrainError):
    """An unknown key, a wrong type or an impossible value in the run configuration."""


class DatasetError(FasttrainError):
    """A missing, corrupt or mismatching dataset."""


class NonFiniteLoss(FasttrainError):
    """The training loss became NaN or Inf."""

    exit_code = EXIT_NONFINITE


def run_command(prog: str, command: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run an entry point's `command(argv)`; a FasttrainError becomes one line on stderr and its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return command(argv)
    except FasttrainError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
