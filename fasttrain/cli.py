"""`fasttrain COMMAND ...`: one command for everything fasttrain does.

    fasttrain train     [--config RECIPE] [--section.key value ...]   train (also: accelerate launch fasttrain/train.py)
    fasttrain convert   --source SRC --out DIR [--subset N]           CIFAR-10 to .beton, once
    fasttrain bench     loader|step|overhead|e2e [...]                measure, print one JSON object
    fasttrain eval      RUN_DIR|CHECKPOINT [--tta-level N]            test accuracy of a finished run or checkpoint
    fasttrain compare   --grid NAME|PATH --out DIR                    the connections experiment (plain/residual/skip)
    fasttrain dashboard --project P [--entity E]                      save fasttrain's W&B workspace

`fasttrain COMMAND --help` describes each. Exit codes are the same for all (fasttrain/errors.py).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "fasttrain.train",
    "convert": "fasttrain.data.convert",
    "bench": "fasttrain.bench",
    "eval": "fasttrain.eval",
    "compare": "fasttrain.compare",
    "dashboard": "fasttrain.tracking.dashboard",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fasttrain: unknown command '{name}'; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
