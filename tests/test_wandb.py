"""W&B as its users expect it: namespaced keys read back from real offline runs with wandb's own reader, settings
from the environment (sweeps), failures that never end a run, the model artifact, the shipped dashboard and the
sweep file."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import yaml
from helpers import wandb_history, wandb_records, wandb_summary

from fasttrain.tracking import start_wandb
from fasttrain.tracking.dashboard import build_workspace, main, workspace_spec
from fasttrain.tracking.wandb_history import holds, recorded_keys
from fasttrain.tracking.wandb_keys import ROW_KEYS, SUMMARY_COLUMNS, logged_keys, to_wandb
from fasttrain.tracking.wandb_run import local_run_dirs

REPO = Path(__file__).resolve().parents[1]
_IDENTITY_ENV = (
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_NAME",
    "WANDB_TAGS",
    "WANDB_RUN_GROUP",
    "WANDB_JOB_TYPE",
    "WANDB_RUN_ID",
    "WANDB_SWEEP_ID",
)
_MODE_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_CONFIG_DIR", "WANDB_DIR", "WANDB_SILENT", "NETRC")


def _reset_wandb() -> None:
    # wandb reads the environment once per process, at setup; tearing down makes the next start re-read it.
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No W&B credentials, identity or mode settings; HOME is an empty temporary directory."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in (*_IDENTITY_ENV, *_MODE_ENV):
        monkeypatch.delenv(name, raising=False)
    _reset_wandb()
    yield home
    _reset_wandb()


def _records(run) -> list[dict]:
    return wandb_records(run.run_dir_path / f"run-{run.id}.wandb")


def _summary(run) -> dict:
    return wandb_summary(run.run_dir_path)


def _offline(tmp_path, announce=print, **identity):
    return start_wandb(
        "offline", config={"lr": 0.1}, run_dir=tmp_path / "run", system_stats=False, announce=announce, **identity
    )


# Rows as the trainer writes them to metrics.jsonl: two epochs of 10 steps, step rows every 5 steps.
STEP_ROWS = [
    {
        "kind": "step",
        "epoch": step / 10,
        "step": step,
        "time_s": 0.5 * step,
        "lr": 0.1 * step,
        "train_loss": 2.0 - 0.05 * step,
        "train_loss_smoothed": 2.1 - 0.05 * step,
        "train_acc": 0.03 * step,
        "images_per_sec": 1000.0 + step,
        "images_per_sec_per_device": 500.0 + step,
        "images_per_sec_main": 501.0 + step,
        "step_time_ms": 20.0 - 0.1 * step,
    }
    for step in (5, 10, 15, 20)
]
EPOCH_ROWS = [
    {
        "kind": "epoch",
        "epoch": epoch,
        "step": 10 * epoch,
        "time_s": 5.0 * epoch,
        "lr": 1.0 * epoch,
        "train_loss": 1.6 - 0.2 * epoch,
        "train_loss_smoothed": 1.7 - 0.2 * epoch,
        "train_acc": 0.2 * epoch,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "val_count": 1000,
        "images_per_sec": 990.0 + epoch,
        "images_per_sec_per_device": 495.0 + epoch,
        "step_time_ms": 19.0,
        "gpu_mem_gb": gpu_mem,
    }
    for epoch, val_acc, val_loss, gpu_mem in ((1, 0.625, 1.25, 1.5), (2, 0.5, 1.5, None))  # best epoch first
]
SUMMARY = {
    "status": "finished",
    "exit_code": 0,
    "val_acc": 0.5,
    "tta_acc": 0.53125,
    "best_val_acc": 0.625,
    "train_time_s": 10.0,
    "time_to_target_s": None,
    "images_per_sec": 995.5,
    "model": "resnet9",
    "params": 6_573_130,
}


def test_rows_map_to_namespaced_keys_with_window_and_epoch_throughput_apart():
    values, step = to_wandb(STEP_ROWS[0])
    assert step == 5
    assert values["perf/images_per_sec"] == 1005.0 and values["perf/step_time_ms"] == pytest.approx(19.5)
    assert values["train/loss"] == pytest.approx(1.75) and values["time/train_s"] == 2.5 and values["epoch"] == 0.5
    assert "kind" not in values and "step" not in values

    values, step = to_wandb({**EPOCH_ROWS[1], "grad_norm": 3.0})
    assert step == 20
    assert values["perf/epoch_images_per_sec"] == 992.0 and "perf/images_per_sec" not in values
    assert values["val/acc"] == 0.5 and values["val/loss"] == 1.5 and values["train/epoch_acc"] == 0.4
    assert "sys/gpu_mem_gb" not in values  # None: left out
    assert values["grad_norm"] == 3.0  # a key the table does not know keeps its name
    prefixes = {name.split("/")[0] for name in logged_keys() if "/" in name}
    assert prefixes == {"train", "val", "perf", "sys", "time"}
    for table in ROW_KEYS.values():  # one W&B key per row key, no two row keys of a kind on one W&B key
        assert len({key.name for key in table.values()}) == len(table)


def test_offline_run_read_back_holds_namespaced_keys_summary_best_accuracy_and_model(
    clean_env, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    run = _offline(tmp_path, project="fasttrain-test")
    for row in sorted(STEP_ROWS + EPOCH_ROWS, key=lambda row: (row["step"], row["kind"] == "epoch")):
        run.log_row(row)
    weights = tmp_path / "run" / "model.safetensors"
    weights.write_bytes(b"\x00" * 4096)
    run.log_model(weights, name="resnet9 run/1", metadata={"val_acc": 0.5, "params": 6_573_130})
    run.summary(SUMMARY)
    run.finish()
    assert not any("failed" in line for line in capsys.readouterr().out.splitlines())

    records = _records(run)
    history = dict(wandb_history(records))
    assert sorted(history) == [5, 10, 15, 20]
    assert history[20]["val/acc"] == 0.5 and history[10]["val/acc"] == 0.625  # epoch rows merged into their step
    assert history[5]["perf/images_per_sec"] == 1005.0 and history[20]["perf/epoch_images_per_sec"] == 992.0
    assert history[10]["sys/gpu_mem_gb"] == 1.5 and history[10]["epoch"] == 1 and history[15]["epoch"] == 1.5
    for row in STEP_ROWS + EPOCH_ROWS:
        values, step = to_wandb(row)
        for key, value in values.items():
            assert history[step][key] == pytest.approx(value), (row["kind"], step, key)
    logged = {key for item in history.values() for key in item if not key.startswith("_")}
    assert logged <= logged_keys() and {"val/acc", "perf/images_per_sec", "time/train_s"} <= logged

    recorded = _summary(run)
    assert recorded["state"] == "finished" and recorded["project"] == "fasttrain-test"
    summary = recorded["summary"]
    for key, value in SUMMARY.items():  # the W&B summary holds summary.json's figures under the same flat keys
        assert summary.get(key) == value, key
    assert summary["val/acc"] == {"max": 0.625}  # the best epoch, not the last
    assert summary["val/loss"] == {"min": 1.25} and summary["sys/gpu_mem_gb"] == {"max": 1.5}
    assert summary["perf/epoch_images_per_sec"] == 992.0  # no summary rule: the last value

    metrics = {r["metric"].get("name") or r["metric"].get("glob_name"): r["metric"] for r in records if "metric" in r}
    assert metrics["val/acc"]["step_metric"] == "epoch" and metrics["train/epoch_acc"]["step_metric"] == "epoch"
    assert "perf/step_time_ms" not in metrics  # drawn against the optimiser step, W&B's default

    (artifact,) = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert artifact["type"] == "model" and artifact["name"] == "resnet9-run-1"
    assert json.loads(artifact["metadata"]) == {"val_acc": 0.5, "params": 6_573_130}
    assert [entry["path"] for entry in artifact["manifest"]["contents"]] == ["model.safetensors"]
    assert list(tmp_path.iterdir()) == [tmp_path / "home", tmp_path / "run"]  # nothing in the working directory


def test_environment_decides_what_the_config_leaves_unset(clean_env, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "sweep-project")
    monkeypatch.setenv("WANDB_RUN_ID", "agent0001")
    monkeypatch.setenv("WANDB_NAME", "agent-name")
    monkeypatch.setenv("WANDB_TAGS", "sweep,lr")
    monkeypatch.setenv("WANDB_RUN_GROUP", "lr-sweep")
    monkeypatch.setenv("WANDB_JOB_TYPE", "trial")
    run = _offline(tmp_path, project=None, default_name="resnet9-20261128", tags=())
    assert run.id == "agent0001"
    run.finish()
    recorded = _summary(run)
    assert recorded["project"] == "sweep-project" and recorded["name"] == "agent-name"
    assert recorded["tags"] == ["sweep", "lr"] and recorded["run_id"] == "agent0001"
    (run_record,) = [r["run"] for r in _records(run) if r["type"] == "run"]
    assert run_record["run_group"] == "lr-sweep" and run_record["job_type"] == "trial"

    # What the user set wins, and so does the id of the fasttrain run being resumed (it is the same W&B run).
    _reset_wandb()
    run = _offline(tmp_path, project="mine", name="my-name", tags=("a",), resume_id="resumed01")
    assert run.id == "resumed01"
    run.finish()
    recorded = _summary(run)
    assert (recorded["project"], recorded["name"], recorded["tags"]) == ("mine", "my-name", ["a"])


@pytest.mark.parametrize("spelling", ["OFFLINE", " offline", "dryrun"])
def test_wandb_mode_in_any_spelling_fasttrain_takes_starts_a_real_offline_run(clean_env, tmp_path, monkeypatch,
                                                                              spelling):  # fmt: skip
    """W&B's own settings read WANDB_MODE too and refuse `OFFLINE`: fasttrain's reading must be the one W&B sees."""
    monkeypatch.setenv("WANDB_MODE", spelling)
    notes = []
    run = start_wandb("auto", config={}, run_dir=tmp_path / "run", system_stats=False, announce=notes.append)
    run.finish()
    assert run.mode == "offline" and notes[0].startswith("W&B offline (WANDB_MODE="), notes
    assert (run.run_dir_path / f"run-{run.id}.wandb").exists()
    assert os.environ["WANDB_MODE"] == spelling  # the user's value, for the next run of the process


def test_without_environment_the_project_is_fasttrain_and_the_name_the_default(clean_env, tmp_path):
    run = _offline(tmp_path, project=None, default_name="resnet9-20261128")
    run.finish()
    recorded = _summary(run)
    assert recorded["project"] == "fasttrain" and recorded["name"] == "resnet9-20261128"
    assert len(run.id) == 8


def test_a_failing_wandb_never_raises_out_of_the_run(clean_env, tmp_path, monkeypatch):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("wandb service went away\nsecond line")

    warnings: list[str] = []
    run = _offline(tmp_path, announce=warnings.append)
    real_log = run._run.log
    calls = []
    monkeypatch.setattr(run._run, "log", lambda *a, **k: (calls.append(a), broken()))
    run.log_row(STEP_ROWS[0])
    run.log_row(STEP_ROWS[1])  # W&B is off after the first failure: no second call
    run.summary(SUMMARY)
    run.log_model(tmp_path / "missing.safetensors", "m", {})
    assert len(calls) == 1
    assert warnings[1:] == ["W&B log failed, W&B is off for the rest of this run: wandb service went away"]
    monkeypatch.setattr(run._run, "log", real_log)
    run.finish()  # the run is still closed, so what was logged before is kept
    assert _summary(run)["state"] == "finished"

    _reset_wandb()
    warnings.clear()
    run = _offline(tmp_path, announce=warnings.append)
    real_finish = run._run.finish
    monkeypatch.setattr(run._run, "finish", broken)
    run.log_row(STEP_ROWS[0])
    run.finish()
    assert warnings[1:] == ["W&B finish failed, W&B is off for the rest of this run: wandb service went away"]
    real_finish()

    # A start that fails (here: wandb.init itself, as an older wandb rejecting a setting does) turns W&B off.
    _reset_wandb()
    warnings.clear()
    monkeypatch.setattr(wandb, "init", broken)
    run = _offline(tmp_path, announce=warnings.append)
    assert run.mode == "disabled" and run.id is None
    assert warnings == ["W&B start failed, W&B is off for this run: wandb service went away"]
    run.log_row(STEP_ROWS[0])
    run.log_model(tmp_path / "missing.safetensors", "m", {})
    run.summary(SUMMARY)
    run.finish()


def test_a_missing_model_file_is_a_warning(clean_env, tmp_path):
    warnings: list[str] = []
    run = _offline(tmp_path, announce=warnings.append)
    run.log_model(tmp_path / "missing.safetensors", "model", {})
    run.finish()
    assert len(warnings) == 2 and warnings[1].startswith("W&B log_model failed")


def _spec_keys(spec: dict) -> tuple[set[str], set[str], list[str]]:
    """(y keys, x keys) of every line plot in a saved-workspace spec, and the runs table's columns."""
    ys, xs = set(), set()
    view = spec["spec"]["section"]
    for section in view["panelBankConfig"]["sections"]:
        for panel in section["panels"]:
            assert panel["viewType"] == "Run History Line Plot", panel["viewType"]
            ys.update(panel["config"]["metrics"])
            xs.add(panel["config"]["xAxis"])
    return ys, xs, view["runSets"][0]["runFeed"]["columnOrder"]


def test_dashboard_builds_offline_and_shows_only_logged_keys(clean_env, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("building the dashboard must not touch the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    workspace = build_workspace("fasttrain-test", entity="team")
    assert (workspace.entity, workspace.project) == ("team", "fasttrain-test")
    ys, xs, columns = _spec_keys(workspace_spec(workspace))
    assert ys <= logged_keys(), ys - logged_keys()
    assert xs <= logged_keys() | {"_step"}, xs - logged_keys()
    watched = {"train/epoch_acc", "val/acc", "train/epoch_loss", "val/loss", "perf/images_per_sec"}
    watched |= {"perf/epoch_images_per_sec", "perf/step_time_ms", "sys/gpu_mem_gb", "train/lr"}
    assert watched <= ys and {"epoch", "time/train_s"} <= xs
    assert columns == ["run:displayName", *(f"summary:{key}" for key in SUMMARY_COLUMNS)]
    assert set(SUMMARY_COLUMNS) <= SUMMARY.keys()


def test_dashboard_command_prints_offline_and_refuses_to_save_without_a_login(clean_env, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    assert main(["--print"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["project"] == "from-env" and spec["displayName"] == "fasttrain"

    assert main(["--project", "p", "--name", "mine"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "wandb login" in captured.err and "--print" in captured.err


def test_sweep_file_searches_lr_and_epochs_on_the_logged_validation_accuracy():
    from fasttrain.config import load_config

    sweep = yaml.safe_load((REPO / "launch" / "sweep.yaml").read_text())
    assert sweep["metric"] == {"name": "val/acc", "goal": "maximize"} and "val/acc" in logged_keys()
    assert set(sweep["parameters"]) == {"train.lr", "train.epochs"} and (REPO / sweep["program"]).is_file()
    command = sweep["command"]
    assert command[command.index("${program}") - 1] == "launch" and command[-1] == "${args}"
    recipe_args = command[command.index("${program}") + 1 : -1]
    for lr in sweep["parameters"]["train.lr"]["values"]:
        for epochs in sweep["parameters"]["train.epochs"]["values"]:
            cfg = load_config([*recipe_args, f"--train.lr={lr}", f"--train.epochs={epochs}"])  # as the agent passes
            assert (cfg.model["name"], cfg.train.lr, cfg.train.epochs) == ("resnet9_ffcv", lr, epochs)


def test_recorded_keys_reads_what_earlier_offline_runs_hold(clean_env, tmp_path, monkeypatch):
    """What a resumed run reads to know which rows W&B already holds (fasttrain.tracking.wandb_history)."""
    monkeypatch.chdir(tmp_path)
    first = _offline(tmp_path, project="fasttrain-test")
    for row in [*STEP_ROWS[:2], EPOCH_ROWS[0]]:  # steps 5 and 10, and epoch 1 merged into step 10
        first.log_row(row)
    first.finish()
    _reset_wandb()
    second = _offline(tmp_path, project="fasttrain-test", resume_id=first.id)  # its own offline directory
    recorded = recorded_keys(tmp_path / "run", first.id, current=second.run_dir_path)
    assert sorted(recorded) == [5, 10]
    assert holds(recorded, STEP_ROWS[0]) and holds(recorded, STEP_ROWS[1]) and holds(recorded, EPOCH_ROWS[0])
    assert not holds(recorded, STEP_ROWS[2]) and not holds(recorded, EPOCH_ROWS[1])
    assert not holds(recorded, {**STEP_ROWS[0], "gpu_mem_gb": 1.0}), "a value W&B lacks at that step"
    second.log_row(STEP_ROWS[2])
    second.finish()
    assert recorded_keys(tmp_path / "run", first.id, current=first.run_dir_path).keys() == {15}


def test_local_run_dirs_include_those_started_within_one_second(tmp_path):
    """wandb names a second directory of one id started in the same second `<...>-<id>-1`; a resumed run must see it."""
    names = ["offline-run-20261201_082440-abc", "offline-run-20261201_082440-abc-1", "offline-run-20261201_082441-abcd",
             "run-20261201_082440-abc", "offline-run-20261201_082442-xabc"]  # fmt: skip
    for name in names:
        (tmp_path / "wandb" / name).mkdir(parents=True)
    found = [p.name for p in local_run_dirs(tmp_path, "abc", kind="offline-run")]
    assert found == ["offline-run-20261201_082440-abc", "offline-run-20261201_082440-abc-1"]
    assert [p.name for p in local_run_dirs(tmp_path, "abc")] == ["run-20261201_082440-abc"]
