"""`fasttrain COMMAND ...`: one command for everything fasttrain does.

    fasttrain train     [--config RECIPE] [--section.key value ...]   train (also: accelerate launch fasttrain/train.py)
    fasttrain convert   --source SRC --out DIR [--subset N]           CIFAR-10 to .beton, once
    fasttrain bench     loader|step|overhead|e2e [...]                measure, print one JSON object
    fasttrain eval      RUN_DIR|CHECKPOINT [--tta-level N]            test accuracy of a finished run or checkpoint
    fasttrain compare   --grid NAME|PATH [--out DIR]                  the connections experiment (plain/residual/skip)
    fasttrain dashboard --project P [--entity E]                      save fasttrain's W&B workspace

`fasttrain COMMAND --help` describes each; `fasttrain --version` prints the version. Exit codes are the same for
all (fasttrain/errors.py).
"""

from __future__ import annotations

import importlib
import sys

from fasttrain.errors import EXIT_BAD_INPUT, EXIT_OK, FasttrainError, exit_process, run_command

COMMANDS = {
    "train": "fasttrain.train",
    "convert": "fasttrain.data.convert",
    "bench": "fasttrain.bench",
    "eval": "fasttrain.eval",
    "compare": "fasttrain.compare",
    "dashboard": "fasttrain.tracking.dashboard",
}


def usage() -> str:
    return __doc__.strip()


def command(argv: list[str]) -> int:
    """Dispatch to the subcommand's own `main`, which reports its errors under its own name."""
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return EXIT_OK
    if argv[:1] in (["-V"], ["--version"]):
        from fasttrain import __version__

        print(f"fasttrain {__version__}")
        return EXIT_OK
    if not argv:
        print(usage(), file=sys.stderr)
        return EXIT_BAD_INPUT
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        raise FasttrainError(f"unknown command '{name}'; choose one of: {', '.join(COMMANDS)}")
    return importlib.import_module(COMMANDS[name]).main(rest)


def main(argv: list[str] | None = None) -> int:
    return run_command("fasttrain", command, argv)


def console() -> None:
    """The `fasttrain` console script."""
    exit_process(main())


if __name__ == "__main__":
    exit_process(main())
