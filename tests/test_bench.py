"""fasttrain.bench on a CPU with tiny settings: each sub-command prints one JSON object with the promised keys and
positive figures (their size is not checked: this is plumbing, not a speed test)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

TINY_MODEL = [
    "--model",
    "deepcnn",
    "--model-arg",
    "widths=8,16",
    "--model-arg",
    "blocks=1,1",
    "--batch-size",
    "32",
    "--steps",
    "3",
    "--repeats",
    "2",
    "--warmup-steps",
    "1",
    "--no-compile",
    "--device",
    "cpu",
]
ENV_KEYS = {"date", "device", "torch", "fasttrain", "world_size"}


def bench(*args: str, timeout: int = 300, check: bool = True) -> tuple[subprocess.CompletedProcess, dict | None]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}  # one thread: conftest.py
    proc = subprocess.run(
        [sys.executable, "-m", "fasttrain.bench", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"bench {args} exited {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0:
        assert len(lines) == 1, f"stdout must hold exactly one JSON line, got:\n{proc.stdout[-2000:]}"
        return proc, json.loads(lines[0])
    return proc, None


def check_common(result: dict, command: str) -> None:
    assert result["command"] == command
    assert result["env"].keys() >= ENV_KEYS, ENV_KEYS - result["env"].keys()
    assert result["env"]["world_size"] == 1 and result["env"]["torch"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_archive) -> Path:
    out = tmp_path_factory.mktemp("bench-data") / "cifar-500"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fasttrain.data.convert",
            "--source",
            str(shared_archive),
            "--out",
            str(out),
            "--subset",
            "500",
        ],
        check=True,
        capture_output=True,
    )
    return out


def test_step_reports_median_throughput_and_compile_time_apart():
    _, result = bench("step", *TINY_MODEL, "--precision", "bf16")
    check_common(result, "step")
    settings = result["settings"]
    assert settings["precision"] == "bf16" and settings["repeats"] == 2 and settings["compile"] is False
    assert len(result["images_per_sec_repeats"]) == 2
    assert result["images_per_sec"] == pytest.approx(statistics.median(result["images_per_sec_repeats"]))
    assert result["images_per_sec"] > 0 and result["step_time_ms"] > 0 and result["warmup_s"] > 0
    assert result["compile_time_s"] == 0.0 and result["params"] > 0 and result["flops_per_image"] > 0
    plan = result["plan"]  # the trainer's RunPlan, which the step ran
    assert (plan["mixed_precision"], plan["compile"], plan["device"]) == ("bf16", False, "cpu")
    assert plan["batch_size_global"] == 32 and plan["fused_optimizer"] is False
    assert "profile" not in result  # only with --profile-steps


def test_overhead_compares_fasttrain_loop_with_bare_loop(data_dir):
    _, result = bench("overhead", *TINY_MODEL, "--precision", "no", "--data", str(data_dir), "--profile-steps", "2")
    check_common(result, "overhead")
    assert result["fasttrain_images_per_sec"] > 0 and result["bare_images_per_sec"] > 0
    assert isinstance(result["overhead_pct"], float) and len(result["overhead_pct_repeats"]) == 2
    assert result["overhead_pct"] == pytest.approx(statistics.median(result["overhead_pct_repeats"]))
    for loop in ("fasttrain", "bare"):
        rates = result[f"{loop}_images_per_sec_repeats"]
        assert len(rates) == 2 and result[f"{loop}_images_per_sec"] == pytest.approx(statistics.median(rates))
    assert result["accelerator"]["mixed_precision"] == "no" == result["plan"]["mixed_precision"]
    assert result["plan"]["data_mode"] == "resident"
    profile = result["profile"]  # torch.profiler over 2 more steps of fasttrain's loop, after the timed ones
    assert profile["steps"] == 2 and profile["wall_ms_per_step"] > 0
    names = [op["name"] for op in profile["top"]]
    assert any("conv" in name for name in names) and any("batch_norm" in name for name in names), names
    times = [op["ms_per_step"] for op in profile["top"]]
    assert times == sorted(times, reverse=True) and sum(op["share"] for op in profile["top"]) <= 1.0 + 1e-9
    assert all(op["ms_per_step"] > 0 and op["calls_per_step"] > 0 for op in profile["top"])


def test_bad_option_is_a_clear_error_without_json(capfd):
    from fasttrain.bench import main

    assert main(["step", *TINY_MODEL, "--precision", "fp16"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and "fp16 needs a CUDA device" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["step", *TINY_MODEL, "--device", "cuda:x"], "--device cuda:x: not a device name; use cpu, cuda or cuda:N"),
        (["e2e", "--run-dir", "{tmp}/a-file"], "--run-dir {tmp}/a-file is a file, not a directory"),
    ],
)
def test_bad_device_or_run_dir_is_a_clear_error_without_json(argv, message, tmp_path, capfd):
    from fasttrain.bench import main

    (tmp_path / "a-file").write_text("")
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    out, err = capfd.readouterr()
    assert out == "" and message.format(tmp=tmp_path) in err and "Traceback" not in err


def test_loader_times_both_modes_after_the_warm_up(data_dir):
    _, result = bench(
        "loader", "--data", str(data_dir), "--mode", "both", "--batch-size", "64", "--workers", "1", "--epochs", "2",
        "--device", "cpu",
    )  # fmt: skip
    check_common(result, "loader")
    assert result["settings"]["modes"] == ["stream", "resident"] == sorted(result["modes"], reverse=True)
    for figures in result["modes"].values():
        assert figures["images_per_sec"] > 0 and figures["warmup_s"] > 0 and figures["measured_epochs"] == 1
        assert figures["images_per_epoch"] == 448  # 500 images, batch 64, drop_last


def test_e2e_runs_the_trainer_and_reads_its_summary(data_dir, tmp_path):
    _, result = bench(
        "e2e",
        "--config",
        "deepcnn",
        "--target-acc",
        "0.05",
        "--run-dir",
        str(tmp_path / "run"),
        "--",
        "--model.widths",
        "8,16",
        "--model.blocks",
        "1,1",
        "--train.epochs",
        "1",
        "--train.batch_size",
        "100",
        "--train.lr_peak_epoch",
        "0.5",
        "--train.mixed_precision",
        "no",
        "--train.compile",
        "off",
        "--wandb.mode",
        "disabled",
        "--data.dir",
        str(data_dir),
        "--data.mode",
        "resident",
        "--data.workers",
        "1",
    )
    check_common(result, "e2e")
    assert result["status"] == "finished" and result["process_exit_code"] == 0
    assert result["epochs"] == 1 and result["steps"] == 5
    # Any classifier scores >= 0.10 on the balanced test slice, so a 0.05 target is always reached.
    assert result["time_to_target_s"] > 0 and result["target_acc"] == 0.05
    assert 0 <= result["val_acc"] <= 1 and 0 <= result["tta_acc"] <= 1
    for key in ("images_per_sec", "train_time_s", "wall_time_s", "process_wall_s", "final_eval_s"):
        assert result[key] > 0, key
    parts = result["data_init_s"] + result["train_time_s"] + result["final_eval_s"]
    assert result["total_time_s"] == pytest.approx(parts), "total_time_s is data init + training + final evaluation"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    keys = ("val_acc", "tta_acc", "steps", "time_to_target_s", "train_time_s", "images_per_sec", "final_eval_s",
            "gc_collections")  # fmt: skip
    for key in keys:
        assert result[key] == summary[key], f"{key}: the trainer's summary.json, as it wrote it"
    # A second measurement into the same directory: the trainer refuses it, and the first run's summary stays.
    again, _ = bench("e2e", "--config", "deepcnn", "--run-dir", str(tmp_path / "run"), check=False)
    assert again.returncode == 2 and "already holds a run (config.yaml)" in again.stderr
    assert "without writing" in again.stderr.splitlines()[-1]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


def test_e2e_exits_1_when_its_trainer_fails_and_2_only_when_it_refused_bad_input(tmp_path):
    # Stopped by --timeout while it imports torch, the trainer writes nothing: that is a failed trainer (1).
    stopped, _ = bench(
        "e2e", "--config", "deepcnn", "--run-dir", str(tmp_path / "run"), "--timeout", "0.2", check=False
    )
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    assert stopped.stderr.splitlines()[-1].endswith("the trainer ran past --timeout 0.2 s and was stopped")
    # An option the trainer does not know is the bench user's bad input (2), in one line after the trainer's own.
    refused, _ = bench("e2e", "--config", "deepcnn", "--run-dir", str(tmp_path / "run2"), "--", "--train.nope", "1",
                       check=False)  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "train.nope" in refused.stderr and "without writing" in refused.stderr.splitlines()[-1]


def test_loader_clamps_workers_to_the_cpus_with_a_one_line_notice_and_takes_the_old_mode_names(data_dir):
    from fasttrain.loop.resolve import usable_cpus

    cpus, asked = usable_cpus(), usable_cpus() + 7
    proc, result = bench(
        "loader", "--data", str(data_dir), "--mode", "gpu", "--batch-size", "250", "--workers", str(asked),
        "--epochs", "2", "--device", "cpu",
    )  # fmt: skip
    assert result["settings"]["modes"] == ["resident"] and result["images_per_sec"] > 0, "gpu: resident's old name"
    notices = [line for line in proc.stderr.splitlines() if "clamped" in line]
    assert notices == [f"[bench] loader: --workers {asked} clamped to {cpus}: this process may use {cpus} CPUs"]
    assert (result["settings"]["workers"], result["settings"]["workers_requested"]) == (cpus, asked)
