"""The connections experiment command: a tiny real grid through the real trainer, and grid specs it refuses."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from fasttrain.compare import main, parse_args, plan
from fasttrain.config import load_config
from fasttrain.grid.spec import Cell, grid_names, load_grid

TINY_OVERRIDES = {
    "model": {"widths": [8, 8, 8], "stem_channels": 8},
    "train": {
        "epochs": 1,
        "batch_size": 200,
        "lr_ref_batch": 200,
        "lr_peak_epoch": 0.5,
        "tta_level": 0,
        "eval_train_images": 300,
    },
    "data": {"eval_batch_size": 500, "workers": 1},
    "checkpoint": {"every": 0},
}


def write_grid(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def run_compare(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(cwd / "home"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fasttrain.compare", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_tiny_grid_writes_table_figure_and_one_run_per_cell(tmp_path: Path, cifar_slice_dir: Path) -> None:
    grid = write_grid(
        tmp_path / "tiny.yaml",
        base="cpu_quick",
        blocks=["plain", "residual"],
        blocks_per_stage=[1],  # a second depth's order and sizes: test_a_grid_is_planned_depth_by_depth
        overrides=TINY_OVERRIDES,
    )
    out = tmp_path / "out"
    args = ["--grid", str(grid), "--out", str(out), "--group", "tiny-group", "--data.dir", str(cifar_slice_dir)]
    args += ["--wandb.mode", "disabled"]
    result = run_compare(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    cells = ["plain-7conv-dropout0", "residual-7conv-dropout0"]
    for index, cell in enumerate(cells, start=1):
        assert f"[{index}/2] {cell}: training" in result.stdout

    for cell in cells:
        run_dir = out / cell
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["wandb"]["group"] == "tiny-group" and config["run"]["name"] == cell
        assert config["model"]["blocks"] == [1, 1, 1]

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["cell"] for row in rows] == cells
    by_cell = {row["cell"]: row for row in rows}
    for cell, row in by_cell.items():
        summary = json.loads((out / cell / "summary.json").read_text())
        assert row["status"] == "finished" and row["epochs"] == "1"
        assert int(row["params"]) == summary["params"]
        assert float(row["final_val_acc"]) == pytest.approx(summary["val_acc"], abs=1e-4)
        epoch_row = [r for r in map(json.loads, (out / cell / "metrics.jsonl").read_text().splitlines())][-1]
        assert float(row["final_train_acc"]) == pytest.approx(epoch_row["train_acc"], abs=1e-4)
        assert float(row["final_train_eval_acc"]) == pytest.approx(epoch_row["train_eval_acc"], abs=1e-4)
        gap = epoch_row["train_eval_acc"] - epoch_row["val_acc"]  # the eval-mode accuracy, not the running one
        assert float(row["train_val_gap"]) == pytest.approx(gap, abs=1e-4)
    # Equal widths: no projection shortcuts, so plain and residual have the same parameters at each depth.
    assert by_cell["plain-7conv-dropout0"]["params"] == by_cell["residual-7conv-dropout0"]["params"]

    table = (out / "results.md").read_text().splitlines()
    assert "| block | depth (conv layers) | dropout | params |" in table[0]
    assert [line.split("|")[1:3] for line in table[2:]] == [[" plain ", " 7 "], [" residual ", " 7 "]]
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Run again: every cell is reused, nothing retrained.
    again = run_compare(args, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("reused the finished run") == 2 and "training (" not in again.stdout

    # Other settings into the same --out: refused before training, naming what differs.
    changed = run_compare([*args, "--train.lr", "0.1"], tmp_path)
    assert changed.returncode == 2 and "train.lr" in changed.stderr and "another --out" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1


def test_a_grid_is_planned_depth_by_depth_each_cell_counted(tmp_path: Path) -> None:
    """The order the cells train in, and so the order of results.csv and results.md: depth, then block."""
    grid = write_grid(
        tmp_path / "tiny.yaml", base="cpu_quick", blocks=["plain", "residual"], blocks_per_stage=[1, 2],
        overrides=TINY_OVERRIDES,
    )  # fmt: skip
    _, _, planned = plan(parse_args(["--grid", str(grid), "--out", str(tmp_path / "out")]))
    names = [p.cell.name for p in planned]
    assert names == [
        "plain-7conv-dropout0",
        "residual-7conv-dropout0",
        "plain-13conv-dropout0",
        "residual-13conv-dropout0",
    ]
    params = {p.cell.name: p.params for p in planned}
    assert params["plain-7conv-dropout0"] == params["residual-7conv-dropout0"], "equal widths: no projections"
    assert params["plain-13conv-dropout0"] == params["residual-13conv-dropout0"] > params["plain-7conv-dropout0"]
    blocks = [p.argv[p.argv.index("--model.blocks") + 1] for p in planned]
    assert blocks == ["1,1,1", "1,1,1", "2,2,2", "2,2,2"]


def test_failed_cell_is_in_the_table_and_the_exit_code(tmp_path: Path, cifar_slice_dir: Path) -> None:
    grid = write_grid(
        tmp_path / "tiny.yaml", base="cpu_quick", blocks=["plain"], blocks_per_stage=[1], overrides=TINY_OVERRIDES
    )
    out = tmp_path / "out"
    # A data dir with no .beton files and a source that does not exist: the trainer fails, the grid goes on.
    args = ["--grid", str(grid), "--out", str(out), "--wandb.mode", "disabled"]
    args += ["--data.source", str(tmp_path / "missing.tar.gz"), "--data.dir", str(tmp_path / "nodata")]
    result = run_compare(args, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 of 1 cells failed: plain-7conv-dropout0" in result.stderr
    with open(out / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "failed (exit 2)" and row["final_val_acc"] == ""
    assert "**failed (exit 2)**" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    "spec,key",
    [
        ({"blocks": ["plain", "dense"]}, "blocks"),
        ({"blocks_per_stage": [2, 0]}, "blocks_per_stage"),
        ({"blocks": []}, "blocks"),
        ({"dropout": []}, "dropout"),
        ({"dropout": [1.5]}, "dropout"),
        ({"widths": [8, 8, 8]}, "widths"),
        ({"base": "resnet9"}, "deepcnn"),
        ({"overrides": {"train": {"epohcs": 2}}}, "train.epohcs"),
    ],
)
def test_bad_grid_spec_is_refused_before_training(tmp_path: Path, capsys, spec: dict, key: str) -> None:
    grid = write_grid(
        tmp_path / "bad.yaml", **{"base": "cpu_quick", "blocks": ["plain"], "blocks_per_stage": [1], **spec}
    )
    out = tmp_path / "out"
    assert main(["--grid", str(grid), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fasttrain compare: error: ") and key in error
    assert len(error.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("option", ["--model.block", "--run.dir", "--config"])
def test_options_the_grid_sets_cannot_be_passed_through(tmp_path: Path, capsys, option: str) -> None:
    assert main(["--grid", "connections_cpu", "--out", str(tmp_path / "out"), option, "x"]) == 2
    assert option in capsys.readouterr().err


def test_dry_run_prints_each_cells_trainer_command(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["--grid", "connections_cpu", "--out", str(out), "--dry-run", "--data.dir", "somewhere"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    grid = load_grid("connections_cpu")
    assert len(commands) == len(grid.blocks) * len(grid.blocks_per_stage) * len(grid.dropout)
    assert all("-m fasttrain.train --config cpu_quick" in c and "--data.dir somewhere" in c for c in commands)
    assert not out.exists()


def test_shipped_grids_load_and_the_deepest_cpu_cells_have_20_conv_layers() -> None:
    assert {"connections_cpu", "connections_gpu"} <= set(grid_names())
    for name in ("connections_cpu", "connections_gpu"):
        grid = load_grid(name)
        assert set(grid.blocks) == {"plain", "residual", "skip"} and len(grid.blocks_per_stage) >= 3
        assert Cell("plain", max(grid.blocks_per_stage), 3, 0.0).depth >= 20
    dropout = load_grid("dropout_cpu")  # the dropout question: every block type with and without it
    assert set(dropout.blocks) == {"plain", "residual", "skip"} and 0.0 in dropout.dropout and max(dropout.dropout) > 0


def test_a_grid_file_that_is_not_utf8_is_refused(tmp_path: Path, capsys) -> None:
    grid = tmp_path / "latin1.yaml"
    grid.write_bytes(b"base: cpu_quick  # caf\xe9\n")
    assert main(["--grid", str(grid), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fasttrain compare: error: ") and "not UTF-8" in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("below", ["", "sub"])
def test_an_out_that_is_a_file_is_refused_before_training(tmp_path: Path, capsys, below: str) -> None:
    grid = write_grid(tmp_path / "tiny.yaml", base="cpu_quick", blocks=["plain"], blocks_per_stage=[1])
    (tmp_path / "afile").write_text("mine\n")
    out = tmp_path / "afile" / below if below else tmp_path / "afile"
    assert main(["--grid", str(grid), "--out", str(out), "--wandb.mode", "disabled"]) == 2
    captured = capsys.readouterr()
    assert "training" not in captured.out and len(captured.err.strip().splitlines()) == 1
    assert f"{tmp_path / 'afile'} is a file, not a directory" in captured.err
    assert (tmp_path / "afile").read_text() == "mine\n"


FINISHED = b'{"status": "finished"}'


@pytest.mark.parametrize(
    "config_yaml,summary_json,reused",
    [
        (None, FINISHED, True),  # None: the cell's own settings, as the trainer writes them
        (b"- x\n", FINISHED, False),
        (b"run: 5\n", FINISHED, False),
        (b"\xff\xfe", FINISHED, False),
        (None, b"[1, 2]", False),
    ],
)
def test_a_damaged_cell_is_trained_again_not_reused(
    tmp_path: Path, capsys, config_yaml: bytes | None, summary_json: bytes, reused: bool
) -> None:
    grid = write_grid(
        tmp_path / "tiny.yaml", base="cpu_quick", blocks=["plain"], blocks_per_stage=[1], overrides=TINY_OVERRIDES
    )
    args = ["--grid", str(grid), "--out", str(tmp_path / "out"), "--dry-run"]
    (cell,) = plan(parse_args(args))[2]
    cell.run_dir.mkdir(parents=True)
    settings = yaml.safe_dump(load_config(list(cell.argv)).to_dict()).encode()
    (cell.run_dir / "config.yaml").write_bytes(settings if config_yaml is None else config_yaml)
    (cell.run_dir / "summary.json").write_bytes(summary_json)
    assert main(args) == 0
    assert ("would be reused" in capsys.readouterr().out) == reused
