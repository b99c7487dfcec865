"""Train a grid of DeepCNNs that differ only in their connections, and compare them.

usage: fasttrain compare --grid NAME|PATH [--out DIR] [--group NAME] [--dry-run] [--section.key V ...]

    fasttrain compare --grid connections_cpu --data.source ../shared/data/cifar10-jpeg.tar.gz
    fasttrain compare --grid my_grid.yaml --out runs/my-grid --dry-run   (or: python -m fasttrain.compare ...)

Options:
  --grid NAME|PATH   a grid spec (see fasttrain/grid/spec.py), or a grid shipped in fasttrain/recipes/grids/
  --out DIR          where the cells' run directories and the results go (default: runs/compare-<grid>)
  --group NAME       the W&B group of the cells' runs (default: compare-<grid>)
  --dry-run          print each cell's trainer command and stop
  --section.key V    any trainer option, passed to every cell (e.g. --data.source, --data.dir, --wandb.mode)

Each cell (block x depth x dropout) runs the normal trainer as a subprocess into OUT/<cell>/, its own run
directory and W&B run, with its output in OUT/<cell>/train.log. A cell whose run directory holds a finished run of
the same settings is reused; an interrupted one continues from its newest checkpoint (--resume auto). Then
OUT/results.csv, OUT/results.md and OUT/comparison.png are written. Exit status (fasttrain/errors.py): 0 when every
cell finished, 1 when any failed (the table says which), 2 for bad input, 130/143 when interrupted.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from fasttrain.config import is_sections, load_config, parse_overrides
from fasttrain.errors import EXIT_OK, EXIT_TRAINER_FAILED, ConfigError, exit_process, run_command, signal_exit_code
from fasttrain.files import nearest_existing
from fasttrain.grid.report import (
    CellResult,
    markdown_table,
    plot_comparison,
    read_cell,
    write_csv,
    write_markdown,
)
from fasttrain.grid.spec import Cell, Grid, grid_cells, grid_names, load_grid
from fasttrain.tracking.report import run_finished

INTERRUPTED = (signal_exit_code(signal.SIGINT), signal_exit_code(signal.SIGTERM))  # the trainer's, after a signal
# Options each cell's command sets itself; a passthrough option may not set them.
CELL_OPTIONS = ("model.name", "model.block", "model.blocks", "model.dropout", "run.dir", "run.name", "wandb.group")


@dataclass(frozen=True)
class CompareArgs:
    grid: str
    out: Path | None
    group: str | None
    dry_run: bool
    passthrough: tuple[str, ...]


@dataclass(frozen=True)
class PlannedCell:
    cell: Cell
    run_dir: Path
    argv: tuple[str, ...]  # the trainer's arguments
    params: int
    reusable: bool  # its run directory holds a finished run of these settings


def parse_args(argv: list[str]) -> CompareArgs:
    grid, out, group, dry_run, passthrough = None, None, None, False, []
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name == "--dry-run":
            dry_run, i = True, i + 1
            continue
        if name in ("--grid", "--out", "--group"):
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            grid, out, group = (
                value if name == "--grid" else grid,
                Path(value) if name == "--out" else out,
                value if name == "--group" else group,
            )
            i += 1
            continue
        passthrough.append(argv[i])
        i += 1
    if grid is None:
        raise ConfigError(f"--grid NAME|PATH is required; shipped grids: {', '.join(grid_names())}")
    _check_passthrough(passthrough)
    return CompareArgs(grid, out, group, dry_run, tuple(passthrough))


def _check_passthrough(passthrough: list[str]) -> None:
    config_path, overrides = parse_overrides(passthrough)
    if config_path is not None:
        raise ConfigError("--config: the grid's base: key names the trainer recipe; change it there")
    for section, key, _ in overrides:
        option = f"{section}.{key}"
        if option in CELL_OPTIONS or option == "run.resume":
            raise ConfigError(f"--{option} is set per cell by the grid; change the grid spec (or --out/--group)")


def _count_params(model_config: dict) -> int:
    import torch

    from fasttrain import models

    with torch.device("meta"):
        model = models.create(model_config["name"], **{k: v for k, v in model_config.items() if k != "name"})
    return models.count_params(model)


def _stages(grid: Grid, passthrough: tuple[str, ...]) -> int:
    base = load_config(["--config", grid.base, *grid.overrides, *passthrough])
    if base.model["name"] != "deepcnn":
        raise ConfigError(
            f"grid {grid.name}: base recipe {grid.base!r} trains {base.model['name']}; the grid needs a deepcnn "
            "recipe (e.g. cpu_quick, deepcnn)"
        )
    return len(base.model["widths"])


def _saved_settings(run_dir: Path) -> dict | None:
    """The settings of the run already in `run_dir` (its config.yaml, sections of key: value pairs as the trainer
    writes them); None if none ran there or the file is damaged."""
    try:
        found = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return None
    if not found or not is_sections(found):
        return None
    return found


def _settings_differ(found: dict, expected: dict) -> list[str]:
    """The keys in which the settings `found` in a run directory differ from `expected`."""
    return [
        f"{section}.{key}"
        for section in sorted(set(found) | set(expected))
        for key in sorted(set(found.get(section, {})) | set(expected.get(section) or {}))
        if found.get(section, {}).get(key) != (expected.get(section) or {}).get(key)
    ]


def _check_out(out: Path) -> None:
    """--out must be, or be creatable as, a writable directory: checked before anything trains."""
    existing = nearest_existing(out)
    if not os.path.isdir(existing):
        raise ConfigError(f"--out {out}: {existing} is a file, not a directory; choose another --out")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable; choose another --out")


def _reusable(run_dir: Path, expected: dict, out: Path) -> bool:
    """Whether `run_dir` holds a finished run of the `expected` settings; a run of other settings is refused.
    A damaged config.yaml or summary.json counts as not finished: the cell's --resume auto then continues from its
    newest checkpoint (for a finished run, its end), which the trainer checks against the cell's settings, and
    writes both files again."""
    found = _saved_settings(run_dir)
    if found is None:
        return False
    differing = _settings_differ(found, expected)
    if differing:
        raise ConfigError(
            f"--out {out}: {run_dir} holds a run with other settings ({', '.join(differing)}); "
            "choose another --out, or delete that directory"
        )
    return run_finished(run_dir)


def plan(args: CompareArgs) -> tuple[Grid, Path, list[PlannedCell]]:
    """Every cell's trainer command, each checked by building its config, before anything trains."""
    grid = load_grid(args.grid)
    out = args.out or Path("runs") / f"compare-{grid.name}"
    _check_out(out)
    group = args.group or f"compare-{grid.name}"
    planned = []
    for cell in grid_cells(grid, _stages(grid, args.passthrough)):
        run_dir = out / cell.name
        argv = (
            *("--config", grid.base),
            *grid.overrides,
            *args.passthrough,
            *("--model.block", cell.block, "--model.blocks", ",".join([str(cell.blocks_per_stage)] * cell.stages)),
            *("--model.dropout", f"{cell.dropout:g}"),
            *("--run.dir", str(run_dir), "--run.name", cell.name, "--wandb.group", group, "--resume", "auto"),
        )
        try:
            config = load_config(list(argv))
        except ConfigError as e:
            raise ConfigError(f"cell {cell.name}: {e}") from None
        reusable = _reusable(run_dir, config.to_dict(), out)
        planned.append(PlannedCell(cell, run_dir, argv, _count_params(config.model), reusable))
    return grid, out, planned


def trainer_command(argv: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "fasttrain.train", *argv]


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def run_cell(planned: PlannedCell) -> int:
    """The trainer as a subprocess, its output appended to <run dir>/train.log; returns its exit code."""
    planned.run_dir.mkdir(parents=True, exist_ok=True)
    log = planned.run_dir / "train.log"
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(trainer_command(planned.argv))}\n")
        out.flush()
        process = subprocess.Popen(trainer_command(planned.argv), stdout=out, stderr=subprocess.STDOUT)
        try:
            return process.wait()
        except KeyboardInterrupt:  # the trainer got the SIGINT too: let it write its checkpoint
            return process.wait()


def _cell_outcome(result: CellResult) -> str:
    if not result.finished:
        return f"FAILED: {result.status}; last line of {result.run_dir / 'train.log'}:"
    return (
        f"val {100 * (result.final_val_acc or 0):.1f}% (best {100 * (result.best_val_acc or 0):.1f}%), "
        f"train {100 * (result.final_train_acc or 0):.1f}%, {result.train_time_s or 0:.1f} s training"
    )


def train_grid(planned: list[PlannedCell]) -> tuple[list[CellResult], int | None]:
    """Run (or reuse) each cell in order; stops early, returning the trainer's code, if a cell was interrupted."""
    results = []
    for index, p in enumerate(planned, start=1):
        where = f"[{index}/{len(planned)}] {p.cell.name}"
        if p.reusable:
            result = read_cell(p.cell, p.run_dir, None, p.params)
            print(f"{where}: reused the finished run in {p.run_dir} (not retrained): {_cell_outcome(result)}")
            results.append(result)
            continue
        print(f"{where}: training ({p.params:,} params), log in {p.run_dir / 'train.log'}", flush=True)
        exit_code = run_cell(p)
        result = read_cell(p.cell, p.run_dir, exit_code, p.params)
        print(f"{where}: {_cell_outcome(result)}", flush=True)
        if not result.finished:
            print(f"    {_last_line(p.run_dir / 'train.log')}", flush=True)
        results.append(result)
        if exit_code in INTERRUPTED:
            results += [read_cell(q.cell, q.run_dir, None, q.params) for q in planned[index:]]
            return results, exit_code
    return results, None


def write_report(results: list[CellResult], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(results, out / "results.csv")
    write_markdown(results, out / "results.md")
    plot_comparison(results, out / "comparison.png")
    return markdown_table(results)


def command(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + f"\n\nShipped grids: {', '.join(grid_names())}")
        return EXIT_OK
    args = parse_args(argv)
    grid, out, planned = plan(args)
    if args.dry_run:
        for p in planned:
            print(shlex.join(trainer_command(p.argv)) + ("   # finished, would be reused" if p.reusable else ""))
        return EXIT_OK
    print(f"grid {grid.name}: {len(planned)} cells into {out}", flush=True)
    results, interrupted = train_grid(planned)
    print("\n" + write_report(results, out) + f"\nwritten: {out}/results.csv, results.md, comparison.png")
    if interrupted is not None:
        print("interrupted; run the same command again to continue (finished cells are reused)", file=sys.stderr)
        return interrupted
    failed = [r.cell.name for r in results if not r.finished]
    if failed:
        print(f"fasttrain compare: {len(failed)} of {len(results)} cells failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_TRAINER_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_command("fasttrain compare", command, argv)


if __name__ == "__main__":
    exit_process(main())
