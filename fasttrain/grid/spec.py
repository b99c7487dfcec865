"""A comparison grid read from YAML: which block types, depths and dropout values to train on which base recipe.

    base: cpu_quick                      # a trainer recipe: shipped name or YAML path; its model must be deepcnn
    blocks: [plain, residual, skip]
    blocks_per_stage: [1, 2, 4]          # every stage gets this many blocks: --model.blocks N,N,N
    dropout: [0.0]                       # optional, default [0.0]
    overrides:                           # optional: --section.key value for every cell, in recipe layout
      train: {epochs: 10}

Every key and value is checked before any training; a bad one is a ConfigError naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, get_args

import yaml

from fasttrain.config import is_sections, yaml_problem
from fasttrain.errors import ConfigError

GRID_KEYS = ("base", "blocks", "blocks_per_stage", "dropout", "overrides")
REQUIRED_KEYS = ("base", "blocks", "blocks_per_stage")


@dataclass(frozen=True)
class Grid:
    name: str
    base: str
    blocks: tuple[str, ...]
    blocks_per_stage: tuple[int, ...]
    dropout: tuple[float, ...]
    overrides: tuple[str, ...]  # ("--section.key", "value", ...), passed to every cell


@dataclass(frozen=True)
class Cell:
    block: str
    blocks_per_stage: int
    stages: int
    dropout: float

    @property
    def depth(self) -> int:
        """3x3 conv layers from input to head: the stem and two per block (1x1 projections/transitions not
        counted), the same for every block type."""
        return 1 + 2 * self.blocks_per_stage * self.stages

    @property
    def name(self) -> str:
        return f"{self.block}-{self.depth}conv-dropout{self.dropout:g}"


def grid_names() -> list[str]:
    """The grids shipped in fasttrain/recipes/grids/."""
    folder = resources.files("fasttrain.recipes") / "grids"
    return sorted(f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))


def resolve_grid(name_or_path: str):
    """A YAML file's path, or the name of a grid shipped in fasttrain/recipes/grids/."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if name_or_path in grid_names():
        return resources.files("fasttrain.recipes") / "grids" / f"{name_or_path}.yaml"
    raise ConfigError(
        f"--grid: no file '{name_or_path}' and no shipped grid of that name. Grids: {', '.join(grid_names())}"
    )


def _block_choices() -> tuple[str, ...]:
    from fasttrain.models import describe

    return get_args(describe("deepcnn")["block"].annotation)


def _nonempty_list(spec: dict[str, Any], key: str, where: str) -> list[Any]:
    values = spec[key]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {key} must be a non-empty list, e.g. {key}: [...], got {values!r}")
    duplicates = sorted({str(v) for v in values if values.count(v) > 1})
    if duplicates:
        raise ConfigError(f"{where}: {key} lists {', '.join(duplicates)} more than once")
    return values


def _check_blocks(spec: dict[str, Any], where: str) -> tuple[str, ...]:
    choices = _block_choices()
    blocks = _nonempty_list(spec, "blocks", where)
    for block in blocks:
        if block not in choices:
            raise ConfigError(f"{where}: blocks: unknown block {block!r}; choose from {', '.join(choices)}")
    return tuple(blocks)


def _check_blocks_per_stage(spec: dict[str, Any], where: str) -> tuple[int, ...]:
    counts = _nonempty_list(spec, "blocks_per_stage", where)
    for count in counts:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"{where}: blocks_per_stage: every entry must be an integer >= 1, got {count!r}")
    return tuple(counts)


def _check_dropout(spec: dict[str, Any], where: str) -> tuple[float, ...]:
    if "dropout" not in spec:
        return (0.0,)
    values = _nonempty_list(spec, "dropout", where)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"{where}: dropout: every entry must be a number in [0, 1), got {value!r}")
    return tuple(float(v) for v in values)


def _option_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_option_value(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)


def _check_overrides(spec: dict[str, Any], where: str) -> tuple[str, ...]:
    overrides = spec.get("overrides") or {}
    if not is_sections(overrides):
        raise ConfigError(
            f"{where}: overrides must hold sections of key: value pairs, e.g. overrides: {{train: {{epochs: 10}}}}"
        )
    return tuple(
        item
        for section, values in overrides.items()
        for key, value in values.items()
        for item in (f"--{section}.{key}", _option_value(value))
    )


def load_grid(name_or_path: str) -> Grid:
    """Read and check a grid spec; the trainer checks the overrides' keys when the cells' configs are built."""
    path = resolve_grid(name_or_path)
    where = f"grid {name_or_path}"
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text; save {path} as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {path} ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({yaml_problem(e)})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected key: value pairs ({', '.join(GRID_KEYS)})")
    unknown = [key for key in spec if key not in GRID_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(GRID_KEYS)}")
    missing = [key for key in REQUIRED_KEYS if key not in spec]
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}; required keys: {', '.join(REQUIRED_KEYS)}")
    if not isinstance(spec["base"], str) or not spec["base"]:
        raise ConfigError(f"{where}: base must name a trainer recipe (e.g. cpu_quick) or a recipe file")
    return Grid(
        name=Path(str(name_or_path)).name.removesuffix(".yaml"),
        base=spec["base"],
        blocks=_check_blocks(spec, where),
        blocks_per_stage=_check_blocks_per_stage(spec, where),
        dropout=_check_dropout(spec, where),
        overrides=_check_overrides(spec, where),
    )


def grid_cells(grid: Grid, stages: int) -> list[Cell]:
    """Every (depth, dropout, block) combination, shallowest first, so each depth's comparison completes early."""
    return [
        Cell(block, count, stages, dropout)
        for count in grid.blocks_per_stage
        for dropout in grid.dropout
        for block in grid.blocks
    ]
