"""The trainer end to end, as users run it: real processes, real .beton files from the shared archive, real W&B
offline files, real checkpoints."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    ACCELERATE,
    REPO,
    TINY,
    TRAIN,
    assert_same_weights,
    checkpoint_steps,
    env_for_tests,
    read_jsonl,
    run_train,
    start_train,
    wait_for_step,
    wandb_history,
    wandb_offline_runs,
    wandb_records,
    wandb_summary,
)

from fasttrain.config import load_config, recipe_names

STEP_KEYS = {
    "epoch",
    "step",
    "time_s",
    "lr",
    "train_loss",
    "train_acc",
    "val_acc",
    "images_per_sec",
    "images_per_sec_per_device",
    "step_time_ms",
}
SUMMARY_KEYS = {
    "val_acc",
    "tta_acc",
    "best_val_acc",
    "train_time_s",
    "compile_time_s",
    "wall_time_s",
    "time_to_target_s",
    "images_per_sec",
    "world_size",
    "mixed_precision",
    "device",
    "model",
    "params",
    "fasttrain_version",
    "torch_version",
}


@pytest.fixture
def data_dir(cifar_slice_dir):
    return cifar_slice_dir


@pytest.fixture(scope="module")
def finished_run(cifar_slice_dir, tmp_path_factory):
    """One short run through `accelerate launch` itself (bf16 autocast on CPU), W&B left on auto: with no credentials
    (env_for_tests), that means offline."""
    tmp = tmp_path_factory.mktemp("run")
    run_dir = tmp / "run"
    proc = run_train(
        [
            *TINY,
            "--data.dir",
            str(cifar_slice_dir),
            "--run.dir",
            str(run_dir),
            "--train.epochs",
            "3",
            "--train.mixed_precision",
            "bf16",
        ],
        tmp,
        launcher=[str(ACCELERATE), "launch", "--num_processes", "1", "--cpu"],
    )
    return run_dir, proc


def test_not_logged_in_means_offline_by_default(finished_run):
    run_dir, proc = finished_run
    assert "W&B offline (not logged in to W&B; run `wandb login` or set WANDB_API_KEY" in proc.stdout
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_run_writes_every_output(finished_run):
    run_dir, proc = finished_run
    rows = read_jsonl(run_dir / "metrics.jsonl")
    step_rows = [r for r in rows if r["kind"] == "step"]
    epoch_rows = [r for r in rows if r["kind"] == "epoch"]
    assert step_rows and len(epoch_rows) == 3
    for row in rows:
        assert row.keys() >= STEP_KEYS, STEP_KEYS - row.keys()
    assert all(r["images_per_sec"] > 0 and r["step_time_ms"] > 0 for r in rows)
    assert all(r["val_acc"] is not None and 0 <= r["val_acc"] <= 1 and r["val_loss"] > 0 for r in epoch_rows)
    assert [r["epoch"] for r in epoch_rows] == [1, 2, 3]
    assert epoch_rows[-1]["step"] == 3 * 10  # 1,000 images / batch 100, drop_last

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS, SUMMARY_KEYS - summary.keys()
    assert summary["world_size"] == 1 and summary["mixed_precision"] == "bf16" and summary["device"] == "cpu"
    assert summary["steps"] == 30 and summary["status"] == "finished"
    assert summary["val_acc"] == epoch_rows[-1]["val_acc"]
    assert summary["val_acc"] > 0.15, "3 epochs on 1,000 real images should beat chance (0.10)"
    assert summary["tta_acc"] is not None and summary["time_to_target_s"] is None
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "config.yaml").exists()
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    assert [c.name for c in checkpoints] == ["ckpt-e0002-s0000020", "ckpt-e0003-s0000030"]  # keep: 2
    assert "epoch" in proc.stdout and "val_acc" in proc.stdout  # the epoch table


def test_wandb_offline_run_recorded_throughput_accuracy_and_the_summary(finished_run):
    run_dir, _ = finished_run
    offline = wandb_offline_runs(run_dir)
    assert len(offline) == 1
    history = wandb_history(wandb_records(next(offline[0].glob("run-*.wandb"))))
    logged = {key for _, values in history for key in values}
    for key in ("perf/images_per_sec", "perf/step_time_ms", "train/acc", "val/acc", "train/lr"):
        assert key in logged, f"{key} missing from W&B history"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert sorted({step for step, _ in history}) == sorted({r["step"] for r in rows})
    recorded = wandb_summary(offline[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    differing = {k: (v, recorded["summary"].get(k)) for k, v in summary.items() if v is not None}
    differing = {k: pair for k, pair in differing.items() if pair[0] != pair[1]}
    assert not differing, f"W&B summary differs from summary.json: {differing}"
    assert recorded["summary"]["val/acc"] == {"max": max(r["val_acc"] for r in rows if r["kind"] == "epoch")}
    # The trainer's console output is in the run's Logs tab (checked in a real run: W&B captures the console of
    # the first run a process starts, which a test process that started W&B before is not).
    console = recorded["console"]
    assert any("val_acc" in line["line"] for line in console), console[-5:]  # the epoch table


def test_gpu_check_reads_the_wandb_run_back_with_the_throughput_and_accuracy_series(finished_run):
    run_dir, _ = finished_run
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "wandb_readback.py"), str(run_dir)], capture_output=True, text=True,
        check=True, timeout=120,
    )  # fmt: skip
    readback = json.loads(proc.stdout)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert readback["logged"]["perf/images_per_sec"] == [[r["step"], r["images_per_sec"]] for r in steps]
    assert readback["logged"]["val/acc"] == [[r["step"], r["val_acc"]] for r in epochs]
    assert readback["history_rows"] == len({r["step"] for r in rows})


def test_bad_config_is_refused_before_any_work(tmp_path, data_dir):
    proc = run_train(
        ["--data.dir", str(data_dir), "--train.dropout", "0.5", "--run.dir", str(tmp_path / "r")], tmp_path, check=False
    )
    assert proc.returncode == 2
    assert "unknown key 'train.dropout'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_out_of_range_model_argument_is_refused(tmp_path, data_dir):
    proc = run_train([*TINY, "--data.dir", str(data_dir), "--model.dropout", "1.5"], tmp_path, check=False)
    assert proc.returncode == 2 and "dropout" in proc.stderr


def test_interrupted_stream_run_resumes_to_the_same_steps_schedule_and_order(tmp_path, data_dir):
    """The stream mode's promise: SIGTERM mid-epoch -> checkpoint + exit 143; --resume auto finishes with the
    uninterrupted run's steps and LRs. ffcv's threaded augmentation is not reproducible from a seed, so with it on
    the weights differ; this run has it off, so the data order is all that is left, and the weights come out equal.
    (With augmentation on, the resume takes the same code path: the loader's epoch and the batches it skips.)"""
    common = [*TINY, "--data.dir", str(data_dir), "--train.epochs", "3", "--wandb.mode", "disabled"]
    common += ["--data.mode", "stream", "--data.flip", "false", "--data.translate", "0", "--data.cutout", "0"]
    reference = tmp_path / "reference"
    run_train([*common, "--run.dir", str(reference)], tmp_path)

    run_dir = tmp_path / "interrupted"
    proc = start_train([*common, "--run.dir", str(run_dir)], tmp_path)
    wait_for_step(run_dir, 14, proc)  # epoch 2 is under way
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM received" in out
    interrupt_ckpt = checkpoint_steps(run_dir)
    assert interrupt_ckpt and interrupt_ckpt[-1] % 10 != 0, "the interrupt checkpoint is mid-epoch"

    run_train([*common, "--run.dir", str(run_dir), "--resume", "auto"], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["epochs"] == 3
    metrics = run_dir / "metrics.jsonl"
    lr_resumed = {r["step"]: r["lr"] for r in read_jsonl(metrics)}
    lr_reference = {r["step"]: r["lr"] for r in read_jsonl(reference / "metrics.jsonl")}
    assert lr_resumed == pytest.approx(lr_reference)
    steps = [r["step"] for r in read_jsonl(metrics) if r["kind"] == "step"]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), "metrics.jsonl continued, not duplicated"
    assert_same_weights(reference, run_dir)  # the same batches in the same order


def test_resume_auto_without_run_dir_takes_the_newest_run_of_that_name_only(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from fasttrain.train import make_run_dir, newest_run_dir

    monkeypatch.chdir(tmp_path)
    assert newest_run_dir("exp") is None
    for name in ("exp-20261130-090000", "exp-20261201-090000", "exp-long-20271231-235959", "exp-20261201-120000"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    for name in ("exp-20261130-090000", "exp-20261201-090000", "exp-long-20271231-235959"):
        (tmp_path / "runs" / name / "checkpoints" / "ckpt-e0001-s0000004").mkdir(parents=True)
    (tmp_path / "runs" / "exp-20261201-130000" / "checkpoints").mkdir(parents=True)
    # exp-long-... is another run's name; exp-20261201-120000 holds repeats (no checkpoints/ of its own);
    # exp-20261201-130000 is what a start that failed before its first checkpoint leaves.
    assert newest_run_dir("exp") == Path("runs") / "exp-20261201-090000"
    cfg = load_config(["--config", "cpu_quick", "--run.name", "exp", "--resume", "auto"])
    assert make_run_dir(cfg, Accelerator(cpu=True)) == (Path("runs") / "exp-20261201-090000", None), "made nothing"
    fresh = load_config(["--config", "cpu_quick", "--run.name", "new", "--run.dir", "new/a/b"])
    assert make_run_dir(fresh, Accelerator(cpu=True)) == (Path("new/a/b"), Path("new/a/b")), "made by this start"


def test_a_second_run_into_a_used_run_directory_without_resume_is_refused(finished_run, data_dir, tmp_path):
    """Without --resume, a second run would overwrite the first's metrics, summary, model and checkpoints."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    again = [*TINY, "--data.dir", str(data_dir), "--run.dir", str(run_dir), "--wandb.mode", "disabled"]
    proc = run_train(again, tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"run.dir {run_dir} already holds a run (config.yaml); continue it with --resume auto" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before


def test_run_dirs_that_are_not_this_runs_to_write_are_refused(finished_run, tmp_path):
    """What a run would overwrite or muddle: a checkpoint or a folder of them, files of a run's names without the run,
    a run that --resume DIR does not continue, a finished run with no checkpoint to resume. Allowed: a new or empty
    folder, one with other files (a recipe, a log, lost+found), and a run's own newest checkpoint as --resume DIR."""
    import shutil

    from fasttrain.loop.checkpoint import newest_intact
    from fasttrain.train import run_dir_problem

    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    newest = newest_intact(run / "checkpoints")
    assert run_dir_problem(run / "checkpoints" / newest.name, "no").endswith(
        "is a checkpoint; to go on from it, pass it to --resume with another --run.dir"
    )
    assert "is a folder of checkpoints; pass one to --resume" in run_dir_problem(run / "checkpoints", "auto")
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("my.yaml", "out.log", "lost+found"):
        (mine / name).write_text("mine")
    assert run_dir_problem(mine, "no") is None and (mine / "checkpoints").is_dir(), "other files may stay beside"
    for name in ("model.safetensors", "curves.png"):
        (mine / name).write_text("mine")
    assert "holds curves.png, model.safetensors but no run; a run would overwrite them" in run_dir_problem(mine, "auto")
    other = tmp_path / "other"
    shutil.copytree(run, other)
    problem = run_dir_problem(run, str(other / "checkpoints" / newest.name))
    assert "already holds a run (config.yaml); --resume DIR goes on from a checkpoint into a new --run.dir" in problem
    assert run_dir_problem(run, str(newest)) is None, "its own newest checkpoint: the same as --resume auto"
    shutil.rmtree(other / "checkpoints")
    assert "holds a finished run and no checkpoint to continue from" in run_dir_problem(other, "auto")
    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / "train.log").write_text("compare writes this first\n")
    assert run_dir_problem(tmp_path / "cell", "auto") is None and run_dir_problem(tmp_path / "new", "no") is None


@pytest.mark.parametrize(
    "setting, words",
    [
        (["--model.num_classes", "5"], "model deepcnn gives 5 outputs per image, but the data set has 10 classes; "
         "set --model.num_classes 10"),
        (["--model.in_channels", "1"], "model deepcnn cannot read the data's 3-channel 32x32 images (Given groups=1"),
    ],
)  # fmt: skip
def test_a_model_that_does_not_fit_the_data_is_refused_before_training(setting, words, data_dir, tmp_path):
    """Else 5 classes crash at the first loss (on a GPU, a device-side assert), and 1 channel at the first conv."""
    proc = run_train([*TINY, "--data.dir", str(data_dir), "--run.dir", str(tmp_path / "r"), *setting], tmp_path,
                     check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert words in proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_a_run_dir_that_cannot_even_be_looked_into_is_one_message(tmp_path):
    """Looking for an earlier run reads the directory first; its OSError (here a name over the filesystem's limit)
    is the same one-line refusal as a failed write."""
    from fasttrain.train import run_dir_problem

    problem = run_dir_problem(tmp_path / ("x" * 300) / "run", "no")
    assert problem is not None and problem.startswith("run.dir: cannot write to") and "too long" in problem


def test_no_config_means_resnet9_on_cuda_and_cpu_quick_elsewhere_said_once_per_machine(monkeypatch, capsys):
    import torch

    from fasttrain.train import default_recipe

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for cuda, recipe in ((True, "resnet9"), (False, "cpu_quick")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert default_recipe() == recipe
        assert f"no --config means the {'GPU' if cuda else 'CPU'} recipe {recipe}" in capsys.readouterr().out
    monkeypatch.setenv("LOCAL_RANK", "1")  # another process of the launch on this machine
    assert default_recipe() == "cpu_quick" and capsys.readouterr().out == ""


def test_target_accuracy_stops_early_and_reports_the_time(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    run_train(
        [
            *TINY,
            "--data.dir",
            str(data_dir),
            "--train.epochs",
            "4",
            "--wandb.mode",
            "disabled",
            "--data.mode",
            "gpu",
            "--run.dir",
            str(run_dir),
            "--train.target_acc",
            "0.12",
        ],
        tmp_path,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    assert summary["epochs"] == len(rows) < 4, "stopped before the 4 epochs asked for"
    assert rows[-1]["val_acc"] >= 0.12 and all(r["val_acc"] < 0.12 for r in rows[:-1]), "at the first to reach it"
    assert summary["time_to_target_s"] == rows[-1]["time_s"] == summary["train_time_s"], "that epoch's training time"


def test_compile_warm_up_covers_every_graph_the_run_uses(tmp_path, data_dir):
    """With torch.compile on, warm-up compiles train and eval graphs (both eval batch sizes, and the training images'
    evaluation) before the timed epochs: nothing recompiles afterwards, and the warm-up is reported apart."""
    run_dir = tmp_path / "r"
    env = {**env_for_tests(tmp_path), "TORCH_LOGS": "recompiles"}
    proc = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            *TINY,
            "--train.compile",
            "on",
            "--data.mode",
            "gpu",
            "--data.eval_batch_size",
            "300",
            "--train.eval_train_images",  # a third batch shape: 100 training images in one batch
            "100",
            "--data.dir",
            str(data_dir),
            "--run.dir",
            str(run_dir),
            "--train.epochs",
            "2",
            "--wandb.mode",
            "disabled",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    during_warm_up, after_warm_up = proc.stdout.split("warm-up, not counted in train time", 1)
    assert "Recompiling" in during_warm_up, "the log shows recompilations (eval mode, eval batch sizes) at all"
    assert "Recompiling" not in after_warm_up, after_warm_up[:3000]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["compile"] is True and summary["compile_time_s"] > 0
    assert summary["tta_acc"] is not None and summary["steps"] == 20
    epochs = [row for row in read_jsonl(run_dir / "metrics.jsonl") if row["kind"] == "epoch"]
    assert all(0 <= row["train_eval_acc"] <= 1 and row["train_eval_loss"] > 0 for row in epochs)


@pytest.fixture(scope="module")
def twenty_images(tmp_path_factory, shared_archive):
    """20 training and 20 test images: one step of any recipe at batch 20."""
    out = tmp_path_factory.mktemp("data20") / "cifar-20"
    subprocess.run(
        [sys.executable, "-m", "fasttrain.data.convert", "--source", str(shared_archive), "--out", str(out),
         "--subset", "20"],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def test_every_recipe_starts_in_stream_mode_on_this_machine(twenty_images, tmp_path):
    """Each shipped recipe as written, its ffcv workers too (resnet9 asks for 8), one epoch of one step on 20 images
    in the stream mode. The recipes start together, each pinned to one CPU, so every one of them asks for more
    workers than it may use. airbench94's alternating flip and reflect padding are done by the resident mode only:
    the stream mode refuses it with a one-line message naming the fix."""
    cpus = sorted(os.sched_getaffinity(0))
    procs = {}
    for i, recipe in enumerate(recipe_names()):
        cpu = cpus[i % len(cpus)]
        args = [
            "--config", recipe, "--data.dir", str(twenty_images), "--data.mode", "stream", "--train.epochs", "1",
            "--train.batch_size", "20", "--train.lr_peak_epoch", "0", "--data.eval_batch_size", "20",
            "--wandb.mode", "disabled", "--checkpoint.final", "false", "--run.dir", str(tmp_path / recipe),
        ]  # fmt: skip
        procs[recipe] = start_train(args, tmp_path, preexec_fn=lambda cpu=cpu: os.sched_setaffinity(0, {cpu}))
    outputs = {recipe: proc.communicate(timeout=300)[0] for recipe, proc in procs.items()}
    for recipe, out in outputs.items():
        code = procs[recipe].returncode
        cfg = load_config(["--config", recipe])
        if cfg.data.flip_mode == "alternating":
            assert code == 2 and "Traceback" not in out, f"{recipe}:\n{out[-2000:]}"
            assert "--data.mode resident" in out.strip().splitlines()[-1], recipe
            continue
        assert code == 0, f"{recipe} exited {code}:\n{out[-3000:]}"
        summary = json.loads((tmp_path / recipe / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["steps"] == 1 and summary["data_mode"] == "stream"
        assert f"data.workers {cfg.data.workers} clamped to 1" in out, f"{recipe}:\n{out[-2000:]}"
