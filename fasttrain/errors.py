"""User-facing errors and exit codes: a message that names the problem and the fix, printed without a traceback.

Exit codes, the same for every fasttrain command (the EXIT_* names below; entry points return them, never literals):
  0 `EXIT_OK` finished.
  1 an unexpected failure (a bug: the traceback is shown); also `EXIT_TRAINER_FAILED`: a trainer process that
    `fasttrain compare` (a grid cell) or `fasttrain bench e2e` started failed, its own output says why (`bench e2e`
    exits 2 instead when its trainer refused the options it was given as bad input, under `--launcher python`:
    `accelerate launch` turns every failure of its processes into 1).
  2 `EXIT_BAD_INPUT` bad input or a broken environment the user can fix (`FasttrainError`), and argparse's usage
    errors.
  3 `EXIT_NONFINITE` training stopped on a non-finite loss.
  128 + N (`signal_exit_code`) stopped by signal N (130 Ctrl-C, 143 SIGTERM): during training after writing a
    checkpoint; at once on a second signal, or on Ctrl-C outside the training loop; 141 (SIGPIPE) quietly, when the
    reader of a command's output went away (`| head`; a training run goes on instead, tracking/console.say).

Every entry point runs through `run_command`, which turns a FasttrainError into one line on stderr,
`<prog>: error: <message>`, and its exit code, and an interruption into one line and 128 + N; a process started as
a command ends through `exit_process`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_OK = 0
EXIT_TRAINER_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_SIGNAL_BASE = 128


def signal_exit_code(signum: int) -> int:
    """The exit code of a run stopped by signal `signum`, as a shell reports a process killed by it."""
    return EXIT_SIGNAL_BASE + signum


class StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM during training: stop at once, without the checkpoint the first one asked for."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


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
    """Run an entry point's `command(argv)` (argv: sys.argv[1:] when None) and return its exit code; a
    FasttrainError becomes one line on stderr, `<prog>: error: <message>`, and its `exit_code`; an interruption
    (Ctrl-C outside the training loop's own handling, or a second signal) one line and 128 + the signal; output to a
    reader that went away (`fasttrain bench ... | head`) ends the command quietly, as SIGPIPE ends a shell's tools."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _returned_or_exited(command, argv)
        sys.stdout.flush()  # what is still buffered fails here, where it is handled, not in Python's shutdown
        return code
    except FasttrainError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except StopNow as e:
        second = signal.Signals(e.signum).name
        print(
            f"{prog}: stopped at once by a second {second}, without the checkpoint the first asked for", file=sys.stderr
        )
        return signal_exit_code(e.signum)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted by SIGINT", file=sys.stderr)
        return signal_exit_code(signal.SIGINT)
    except BrokenPipeError:
        if not stdout_reader_gone():  # another pipe or socket: not ours to name
            raise
        silence_stdout()
        return signal_exit_code(signal.SIGPIPE)


def _returned_or_exited(command: Callable[[list[str]], int], argv: list[str]) -> int:
    try:
        return command(argv)
    except SystemExit as e:  # argparse's --help (0) and usage errors (2): ended like a return
        return e.code if isinstance(e.code, int) else EXIT_OK


def stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone away (its write end then polls as an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout is not a file (a test's capture)
        return False


def silence_stdout() -> None:
    """Send standard output to /dev/null from now on, what is still buffered included: its reader went away."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def interrupts_end_quietly_until_main(prog: str) -> None:
    """For a script's module-level imports, until its main() calls `python_interrupts_again`: a Ctrl-C there (torch's
    import takes seconds) ends the process with one line and 130, not a traceback through the imports. Only over
    Python's own handler: an ignored SIGINT (a job started with `&` by a script) stays ignored."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return

    def end(signum: int, frame: object) -> None:
        print(f"{prog}: interrupted by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        os._exit(signal_exit_code(signum))

    end.ends_quietly = True
    signal.signal(signal.SIGINT, end)


def python_interrupts_again() -> None:
    """Python's SIGINT handler (KeyboardInterrupt) back, where `interrupts_end_quietly_until_main` replaced it."""
    if getattr(signal.getsignal(signal.SIGINT), "ends_quietly", False):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def exit_process(code: int) -> NoReturn:
    """End a command's process with `code`. Python's shutdown runs several full garbage collections while it tears
    down modules; after torch's import each walks some 370,000 objects, about 1.2 s of a 2-core VM's CPU at every
    exit. Everything left is about to go, so freeze it first: the collections skip it."""
    gc.freeze()
    sys.exit(code)
