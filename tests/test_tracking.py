"""Tracking: real offline W&B runs read back with wandb's own CLI, mode resolution and fallbacks, the
metrics log, learning-curve plots and the console table."""

import json
import math
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import wandb_history, wandb_records, wandb_summary

from fasttrain.errors import ConfigError, FasttrainError
from fasttrain.tracking import EpochTable, MetricsFile, plot_curves, read_metrics, resolve_mode, start_wandb
from fasttrain.tracking.plots import curves

FAKE_API_KEY = "f" * 40
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_WANDB_ENV = (
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_BASE_URL",
    "WANDB_IDENTITY_TOKEN_FILE",
    "WANDB_CONFIG_DIR",
    "WANDB_DIR",
    "WANDB_SILENT",
    "NETRC",
)


def _reset_wandb() -> None:
    # wandb reads the environment once per process, at setup; tearing down makes the next start re-read it.
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No W&B credentials, mode or server override; HOME is an empty temporary directory."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in _WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _reset_wandb()
    yield home
    _reset_wandb()


def _messages(capsys) -> list[str]:
    captured = capsys.readouterr()
    return [line for line in (captured.out + captured.err).splitlines() if line.strip()]


# --- W&B ---------------------------------------------------------------------------------------------------


def test_offline_run_is_recorded_as_logged(clean_env, tmp_path, monkeypatch, capsys):
    working_dir = tmp_path / "cwd"
    working_dir.mkdir()
    monkeypatch.chdir(working_dir)
    logged = [
        {"kind": "step", "step": 0, "images_per_sec": 51234.5, "step_time_ms": 9.75, "train_acc": 0.25},
        {"kind": "step", "step": 1, "images_per_sec": 52000.0, "step_time_ms": 9.5, "train_acc": 0.5},
        {"kind": "epoch", "step": 2, "epoch": 1, "images_per_sec": 52500.0, "step_time_ms": 9.25, "val_acc": 0.625},
    ]
    run = start_wandb(
        "offline",
        project="fasttrain-test",
        name="offline-check",
        tags=("test",),
        config={"lr": 0.1, "epochs": 3},
        run_dir=tmp_path / "run",
        system_stats=False,
    )
    assert run.mode == "offline" and run.id
    for row in logged:
        run.log_row(row)
    run.summary({"best_val_acc": 0.625, "images_per_sec": 52500.0})
    run.finish()
    run.finish()  # idempotent

    lines = _messages(capsys)
    assert len(lines) == 1 and "offline" in lines[0] and str(run.run_dir_path) in lines[0]
    assert f"wandb sync {run.run_dir_path}" in lines[0]
    assert run.run_dir_path.parent == tmp_path / "run" / "wandb"
    assert list(working_dir.iterdir()) == []  # nothing lands in the working directory

    history = dict(wandb_history(wandb_records(run.run_dir_path / f"run-{run.id}.wandb")))
    assert sorted(history) == [0, 1, 2]
    assert [history[step]["perf/images_per_sec"] for step in (0, 1)] == [51234.5, 52000.0]
    assert history[1]["train/acc"] == 0.5 and history[1]["perf/step_time_ms"] == 9.5
    assert history[2]["perf/epoch_images_per_sec"] == 52500.0 and history[2]["val/acc"] == 0.625

    summary = wandb_summary(run.run_dir_path)
    assert summary["state"] == "finished" and summary["exit_code"] == 0 and summary["run_id"] == run.id
    assert summary["project"] == "fasttrain-test" and summary["config"]["lr"] == 0.1
    assert summary["summary"]["best_val_acc"] == 0.625 and summary["summary"]["perf/epoch_step_time_ms"] == 9.25
    assert summary["summary"]["images_per_sec"] == 52500.0 and summary["summary"]["val/acc"] == {"max": 0.625}


def test_auto_mode_is_offline_without_credentials(clean_env, monkeypatch):
    _forbid_network(monkeypatch)
    mode, reason = resolve_mode("auto")
    assert mode == "offline" and "wandb login" in reason


def test_auto_mode_is_online_with_a_key_and_makes_no_network_call(clean_env, monkeypatch):
    _forbid_network(monkeypatch)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_API_KEY)
    assert resolve_mode("auto") == ("online", "W&B credentials found in WANDB_API_KEY")

    monkeypatch.delenv("WANDB_API_KEY")
    netrc = clean_env / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_API_KEY}\n")
    netrc.chmod(0o600)
    assert resolve_mode("auto") == ("online", f"W&B credentials found in {netrc}")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # the key is for another server
    assert resolve_mode("auto")[0] == "offline"


def test_wandb_mode_environment_wins_over_auto_only(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_API_KEY)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto")[0] == "disabled"
    assert resolve_mode("offline") == ("offline", "requested")
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode("auto")[0] == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        resolve_mode("auto")
    with pytest.raises(ConfigError, match="auto, online, offline, disabled"):
        resolve_mode("cloud")


def _forbid_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("mode resolution must not touch the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _check_fell_back(run, run_dir: Path, lines: list[str]) -> None:
    assert run.mode == "offline"
    assert len(lines) == 1, lines
    assert "online start failed" in lines[0] and f"wandb sync {run.run_dir_path}" in lines[0]
    run.log_row({"kind": "step", "step": 0, "train_acc": 0.5})
    run.finish()
    assert (run.run_dir_path / f"run-{run.id}.wandb").is_file()
    assert not list((run_dir / "wandb").glob("run-*")), "the failed online attempt left its directory"


def test_online_start_falls_back_to_offline_when_server_refuses(clean_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_API_KEY)
    started = time.monotonic()
    run = start_wandb("online", project="fasttrain-test", config={}, run_dir=tmp_path / "run", system_stats=False)
    elapsed = time.monotonic() - started
    _check_fell_back(run, tmp_path / "run", _messages(capsys))
    assert elapsed < 60
    print(f"refused-server fallback took {elapsed:.2f} s")


def test_online_start_falls_back_when_server_never_answers(clean_env, tmp_path, monkeypatch, capsys):
    silent_server = socket.socket()  # accepts TCP connections (the kernel does) but never replies
    silent_server.bind(("127.0.0.1", 0))
    silent_server.listen(8)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{silent_server.getsockname()[1]}")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_API_KEY)
    try:
        started = time.monotonic()
        run = start_wandb(
            "online",
            project="fasttrain-test",
            config={},
            run_dir=tmp_path / "run",
            resume_id="resumeme1",
            init_timeout_s=3,
            system_stats=False,
        )
        elapsed = time.monotonic() - started
    finally:
        silent_server.close()
    assert run.id == "resumeme1"  # the fallback keeps the id, so `wandb sync` continues the same run
    _check_fell_back(run, tmp_path / "run", _messages(capsys))
    assert elapsed < 30
    print(f"silent-server fallback took {elapsed:.2f} s")


def test_disabled_does_nothing_and_writes_nothing(clean_env, tmp_path):
    run = start_wandb("disabled", project="fasttrain-test", config={"lr": 0.1}, run_dir=tmp_path / "run")
    run.log_row({"kind": "step", "step": 0, "train_acc": 0.5})
    run.summary({"best_val_acc": 0.5})
    run.finish()
    assert run.mode == "disabled" and run.id is None and run.run_dir_path is None and run.url is None
    assert not (tmp_path / "run").exists()

    probe = (
        "import sys; from fasttrain.tracking import start_wandb; "
        "start_wandb('disabled', project='p', config={}, run_dir='unused'); print('wandb' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "False"


# --- metrics file ------------------------------------------------------------------------------------------


def _strict_loads(line: str) -> dict:
    def reject(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=reject)


def test_metrics_file_writes_strict_json_and_round_trips_non_finite(tmp_path):
    import numpy as np

    path = tmp_path / "metrics.jsonl"
    with MetricsFile(path) as metrics:
        metrics.write({"step": 0, "train_loss": float("nan"), "grad_norm": float("inf"), "lr": np.float32(0.5)})
        metrics.write({"step": 1, "train_loss": -math.inf, "note": "ok"})
        assert len(path.read_text().splitlines()) == 2  # flushed per line, before close
    lines = path.read_text().splitlines()
    assert [_strict_loads(line)["train_loss"] for line in lines] == ["NaN", "-Infinity"]
    rows = read_metrics(path)
    assert math.isnan(rows[0]["train_loss"]) and rows[0]["grad_norm"] == math.inf and rows[0]["lr"] == 0.5
    assert rows[1] == {"step": 1, "train_loss": -math.inf, "note": "ok"}

    MetricsFile(path).close()  # without resume, an existing file is replaced
    assert read_metrics(path) == []


def test_metrics_file_resume_drops_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsFile(path) as metrics:
        for step in range(10):
            metrics.write({"step": step, "train_loss": 1.0 / (step + 1)})
            if step % 4 == 3:
                metrics.write({"step": step, "epoch": step // 4 + 1, "val_acc": 0.1 * step})
    with path.open("a") as crashed:
        crashed.write('{"step": 10, "train_lo')  # the process died mid-line

    assert [row["step"] for row in read_metrics(path)][-1] == 9  # the cut-off line is skipped

    with MetricsFile(path, resume_step=7) as metrics:
        metrics.write({"step": 8, "train_loss": 0.5, "resumed": True})
    rows = read_metrics(path)
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 8]
    assert rows[-1]["resumed"] is True and rows[-2]["epoch"] == 2
    assert all(_strict_loads(line) for line in path.read_text().splitlines())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left

    with MetricsFile(tmp_path / "fresh.jsonl", resume_step=3) as metrics:  # nothing to resume: starts empty
        metrics.write({"step": 4})
    assert read_metrics(tmp_path / "fresh.jsonl") == [{"step": 4}]


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b'{"step": 0}\n{"step": 1, "x\n{"step": 2}\n', "line 2 is not a JSON object"),
        (b'{"step": 0}\n[1, 2]\n', "line 2 is not a JSON object"),
        (b'{"step": 0}\n{"note": "caf\xe9"}\n', "byte 25 is not UTF-8 text"),
    ],
)
def test_read_metrics_names_damage_before_the_last_line_and_the_fix(tmp_path, content, what):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    message = f"{path} is damaged: {what}; delete the damaged line, or move the file aside"
    with pytest.raises(FasttrainError, match=re.escape(message)):
        read_metrics(path)


# --- plots -------------------------------------------------------------------------------------------------


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5_000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically, no temp left


def test_plot_curves_multi_epoch(tmp_path):
    rows = []
    for epoch in range(1, 9):
        rows.append({"kind": "step", "step": epoch * 10 - 5, "epoch": epoch - 1, "train_loss": 2.0})  # ignored
        rows.append(
            {
                "kind": "epoch",
                "step": epoch * 10,
                "epoch": epoch,
                "train_acc": 0.5 + 0.06 * epoch,
                "val_acc": 0.5 + 0.04 * epoch,
                "train_loss": 2.0 / epoch,
                "val_loss": 2.2 / epoch + (0.1 * epoch if epoch > 5 else 0),
            }
        )
    rows[-1]["val_loss"] = float("nan")
    _assert_png(plot_curves(rows, tmp_path / "plots" / "curves.png", title="resnet18 on CIFAR-10"))


def test_plot_curves_single_epoch_with_missing_values(tmp_path):
    rows = [{"kind": "epoch", "step": 97, "epoch": 1, "train_acc": 0.41, "val_acc": 0.45, "train_loss": 1.6}]
    _assert_png(plot_curves(rows, tmp_path / "one" / "curves.png"))
    _assert_png(plot_curves([], tmp_path / "none" / "curves.png"))


def test_the_curves_keep_the_train_figures_of_epochs_not_evaluated():
    """train.eval_every 2: epoch 1's row has no validation figures, and its train accuracy and loss are still drawn;
    the validation lines have a gap there. Step rows are not drawn."""
    rows = [
        {"kind": "step", "step": 5, "epoch": 0, "train_acc": 0.2, "train_loss": 2.2},
        {"kind": "epoch", "step": 10, "epoch": 1, "train_acc": 0.3, "train_loss": 2.0, "val_acc": None},
        {
            "kind": "epoch",
            "step": 20,
            "epoch": 2,
            "train_acc": 0.4,
            "train_loss": 1.8,
            "val_acc": 0.35,
            "val_loss": 1.9,
        },
    ]
    drawn = curves(rows)
    accuracy, loss = drawn["Accuracy"], drawn["Loss"]
    assert accuracy.keys() == loss.keys() == {"train (running)", "validation"}  # no eval-mode train figures here
    assert accuracy["train (running)"] == ([1.0, 2.0], [0.3, 0.4]) and loss["train (running)"][1] == [2.0, 1.8]
    (_, val_acc), (_, val_loss) = accuracy["validation"], loss["validation"]
    assert math.isnan(val_acc[0]) and val_acc[1] == 0.35 and math.isnan(val_loss[0]) and val_loss[1] == 1.9


# --- console table -----------------------------------------------------------------------------------------


def test_epoch_table_aligns_columns():
    table = EpochTable([("epoch", "d"), ("train_loss", ".4f"), ("val_acc", ".4f"), ("time_s", ".1f")])
    header = table.header().splitlines()
    rows = [
        table.row({"epoch": 1, "train_loss": 2.30123, "val_acc": 0.1032, "time_s": 3.25}),
        table.row({"epoch": 12, "train_loss": 0.5, "val_acc": None}),
        table.row({"epoch": 100, "train_loss": float("nan"), "val_acc": "n/a", "time_s": 120.0}),
    ]
    assert header[0].split("|")[1:-1] == ["  epoch   ", "  train_loss  ", "  val_acc  ", "  time_s  "]
    assert set(header[1]) == {"-"}
    assert len({len(line) for line in [*header, *rows]}) == 1
    assert rows[0] == "|       1  |      2.3012  |   0.1032  |     3.2  |"
    bars = [i for i, c in enumerate(header[0]) if c == "|"]
    for row in rows:
        assert [i for i, c in enumerate(row) if c == "|"] == bars
    assert "n/a" in rows[2] and "nan" in rows[2]
