"""Fault injection: crashes, signals, bad numbers, bad files and dead ranks never lose work and never hang.

Real processes and files throughout: `kill -9`, SIGINT, a truncated .beton, a file-size limit for a full disk.
FASTTRAIN_INJECT_FAULT (fasttrain/distributed.py) only picks the moment: the kill itself is a real SIGKILL.
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import (
    ACCELERATE,
    CPU_2PROC,
    FAST,
    TINY,
    TRAIN,
    checkpoint_steps,
    env_for_tests,
    has_logged,
    launch,
    read_jsonl,
    run_train,
    start_train,
    tree_digest,
    wait_for_step,
)

import fasttrain

pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir(cifar_slice_dir):
    return cifar_slice_dir


def test_kill_9_mid_epoch_then_resume_loses_at_most_an_epoch(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    args = [*FAST, "--data.dir", str(data_dir), "--train.epochs", "3", "--run.dir", str(run_dir)]
    # SIGKILL right after step 16: epoch 2 under way, its checkpoint not yet written (no race with a poll).
    proc = start_train(args, tmp_path, env_extra={"FASTTRAIN_INJECT_FAULT": "step=16,action=kill"})
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_steps(run_dir) == [10], "the epoch-1 checkpoint is the last complete one"
    assert has_logged(run_dir, 14) and not has_logged(run_dir, 15), "killed after step 16, before its row"
    rows_before = read_jsonl(run_dir / "metrics.jsonl")

    out = run_train([*args, "--resume", "auto"], tmp_path).stdout
    assert "resumed from" in out and "step 10" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["epochs"] == 3 and summary["status"] == "finished"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[: len([r for r in rows_before if r["step"] <= 10])] == [r for r in rows_before if r["step"] <= 10], (
        "metrics.jsonl continued: the rows up to the checkpoint are kept as they were"
    )
    steps = [r["step"] for r in rows if r["kind"] == "step"]
    assert steps == sorted(set(steps)), "rows logged after the checkpoint were dropped before training went on"


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    args = [*FAST, "--data.dir", str(data_dir), "--train.epochs", "3", "--run.dir", str(run_dir)]
    proc = start_train(args, tmp_path, env_extra={"FASTTRAIN_INJECT_FAULT": "at=checkpoint,step=20,action=kill"})
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    assert checkpoint_steps(run_dir) == [10]
    assert list(ckpts.glob(".tmp-*")), "the kill struck mid-write: a partial checkpoint exists"
    intact = sorted(ckpts.glob("ckpt-*"))[0]
    before = tree_digest(intact)

    out = run_train([*args, "--resume", "auto", "--checkpoint.keep", "3"], tmp_path).stdout  # keep: none pruned
    assert f"resumed from {intact}" in out
    assert not list(ckpts.glob(".tmp-*")), "the partial checkpoint was cleaned up"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 30
    assert checkpoint_steps(run_dir) == [10, 20, 30]
    assert tree_digest(intact) == before, "the checkpoint resumed from was never modified"


def test_damaged_checkpoints_are_named_skipped_and_kept_by_the_trainer(tmp_path, data_dir):
    """Through the trainer as a user meets it: a truncated model.safetensors in the newest checkpoint is named and
    skipped, the older one resumed; with none intact, exit 2 naming the directory. No traceback, nothing deleted."""
    run_dir = tmp_path / "r"
    args = [*FAST, "--data.dir", str(data_dir), "--train.epochs", "3", "--run.dir", str(run_dir)]
    killed = run_train(args, tmp_path, check=False, env_extra={"FASTTRAIN_INJECT_FAULT": "step=25,action=kill"})
    assert killed.returncode == -signal.SIGKILL and checkpoint_steps(run_dir) == [10, 20]
    older, newest = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    older_weights = (older / "model.safetensors").read_bytes()
    for ckpt in (older, newest):
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])

    refused = run_train([*args, "--resume", "auto"], tmp_path, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"no intact checkpoint in {run_dir / 'checkpoints'}" in refused.stderr
    assert (refused.stdout + refused.stderr).count("skipping damaged checkpoint") == 2

    (older / "model.safetensors").write_bytes(older_weights)
    damaged = tree_digest(newest)
    resumed = run_train([*args, "--resume", "auto"], tmp_path)
    out = resumed.stdout + resumed.stderr
    assert f"skipping damaged checkpoint {newest}" in out and "model.safetensors" in out and "Traceback" not in out
    assert f"resumed from {older}" in out
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 30
    set_aside = run_dir / "checkpoints" / f"damaged-{newest.name}"
    assert set_aside.is_dir() and tree_digest(set_aside) == damaged, "the damaged checkpoint is kept as it was"


def test_sigint_writes_a_checkpoint_and_says_interrupted(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    proc = start_train([*FAST, "--data.dir", str(data_dir), "--train.epochs", "3", "--run.dir", str(run_dir)], tmp_path)
    wait_for_step(run_dir, 14, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "SIGINT received" in out and "--resume auto" in out
    steps = checkpoint_steps(run_dir)
    assert steps[-1] > 10 and steps[-1] % 10, "a checkpoint mid-epoch 2"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == steps[-1]
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] <= steps[-1]


def test_a_stop_at_an_epochs_last_step_checkpoints_its_end_and_one_on_the_target_epoch_lets_the_run_end(
    tmp_path, data_dir
):
    """SIGTERM right after step 10, the last of epoch 1: the checkpoint is the epoch's end, which resumes (a
    checkpoint taken before the epoch's end resumed into an empty epoch). On the epoch that reaches the target, the
    same signal lets the run end as it would have."""
    term_after_step_10 = {"FASTTRAIN_INJECT_FAULT": "step=10,action=term"}
    run_dir = tmp_path / "r"
    args = [*FAST, "--data.dir", str(data_dir), "--train.epochs", "3", "--run.dir", str(run_dir)]
    cut = run_train(args, tmp_path, check=False, env_extra=term_after_step_10)
    assert cut.returncode == 128 + signal.SIGTERM, cut.stdout[-2000:] + cut.stderr[-2000:]
    assert "writing a checkpoint at step 10 (the end of epoch 1)" in cut.stdout
    assert checkpoint_steps(run_dir) == [10]
    run_train([*args, "--resume", "auto"], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["steps"], summary["epochs"]) == ("finished", 30, 3)
    epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and all(r["train_loss"] > 0 for r in epochs)

    target_dir = tmp_path / "target"
    reached = [*FAST, "--data.dir", str(data_dir), "--train.epochs", "3", "--run.dir", str(target_dir)]
    ended = run_train([*reached, "--train.target_acc", "0.05"], tmp_path, check=False, env_extra=term_after_step_10)
    assert ended.returncode == 0, ended.stdout[-2000:] + ended.stderr[-2000:]
    summary = json.loads((target_dir / "summary.json").read_text())
    assert (summary["status"], summary["epochs"]) == ("finished", 1) and summary["time_to_target_s"] is not None


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_good_checkpoint(tmp_path, data_dir, one_epoch_run):
    run_dir = tmp_path / "r"
    base = [*FAST, "--data.dir", str(data_dir), "--run.dir", str(run_dir)]
    shutil.copytree(one_epoch_run, run_dir)
    good = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    digest = tree_digest(good[0])
    # Same run continued with an absurd learning rate: the loss overflows within a couple of steps.
    proc = run_train([*base, "--train.epochs", "2", "--train.lr", "1e30", "--resume", "force"], tmp_path, check=False)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    message = proc.stderr
    assert "loss became NaN/Inf in" in message and "--train.lr" in message
    window = message.split("of optimizer steps ")[1].split(".")[0]  # "11-12": the log window that saw it
    first, last = (int(s) for s in window.split("-"))
    assert 11 <= first <= last <= 13, "stopped at the log step after the blow-up, naming its window"
    assert sorted((run_dir / "checkpoints").glob("ckpt-*")) == good and tree_digest(good[0]) == digest
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "nonfinite_loss"


def test_nonfinite_skip_mode_skips_then_gives_up(tmp_path, data_dir):
    proc = run_train(
        [
            *FAST,
            "--data.dir",
            str(data_dir),
            "--run.dir",
            str(tmp_path / "r"),
            "--train.epochs",
            "1",
            "--train.lr",
            "1e30",
            "--train.schedule",
            "constant",
            "--train.nonfinite",
            "skip",
            "--train.max_skips",
            "3",
            "--train.log_every",
            "1",
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 3
    assert proc.stdout.count("step skipped") == 4 and "more than train.max_skips=3" in proc.stderr
    # Step 1 trains at the initial weights; from step 2 on the loss is NaN and each try of step 2 is skipped.
    assert "step 2: non-finite loss, step skipped (1/3)" in proc.stdout
    rows = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in rows] == [1], "a skipped step writes no row (step 1's is not written again)"


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "missing-manifest"])
def test_damaged_dataset_is_refused_before_training(tmp_path, data_dir, damage):
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    beton = broken / "train.beton"
    if damage == "truncate":
        os.truncate(beton, beton.stat().st_size // 2)
    elif damage == "flip-byte":
        with open(beton, "r+b") as f:
            f.seek(beton.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        (broken / "manifest.json").unlink()
        (broken / "manifest.json").mkdir()  # unreadable, and not replaced by a silent re-conversion
        (tmp_path / "r").mkdir()  # the user's own empty run directory
    proc = run_train([*FAST, "--data.dir", str(broken), "--run.dir", str(tmp_path / "r")], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fasttrain.data.convert" in proc.stderr and "Traceback" not in proc.stderr
    if damage != "missing-manifest":
        assert "train.beton" in proc.stderr
        assert not (tmp_path / "r").exists(), "the failed start removes the run directory it made"
    else:
        assert (tmp_path / "r").is_dir(), "a run directory the start did not make stays"
        assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_missing_dataset_and_source_names_the_option(tmp_path):
    proc = run_train(
        [
            *FAST,
            "--data.source",
            str(tmp_path / "no-such-archive.tar.gz"),
            "--data.dir",
            str(tmp_path / "data"),
        ],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "no-such-archive.tar.gz" in proc.stderr + proc.stdout and "--data.source" in proc.stderr
    assert not (tmp_path / "data").exists(), "nothing half-written"
    assert not list((tmp_path / "runs").iterdir()), "no empty runs/<name>-<time>/ left to look like a run"


def test_resume_with_a_different_config_is_refused_and_forced_names_what_does_not_fit(
    tmp_path, data_dir, one_epoch_run
):
    run_dir = tmp_path / "r"
    base = [*FAST, "--data.dir", str(data_dir), "--run.dir", str(run_dir), "--train.epochs", "1"]
    shutil.copytree(one_epoch_run, run_dir)
    # Named as --resume DIR, into a new run directory: force could not take it there.
    (newest,) = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    other = [*FAST, "--data.dir", str(data_dir), "--run.dir", str(tmp_path / "new"), "--train.epochs", "1"]
    other += ["--model.widths", "8,32", "--train.lr", "0.3", "--resume", str(newest)]
    proc = run_train(other, tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert "was written with other settings (model.widths: [8, 16] -> [8, 32]; train.lr: 0.2 -> 0.3)" in line, line
    assert line.endswith("copy it into a new run's checkpoints/ folder and pass --resume force there")
    # Forced, the checkpoint's weights cannot go into the wider model: one line naming a tensor, not a traceback.
    forced = run_train([*base, "--model.widths", "8,32", "--resume", "force"], tmp_path, check=False)
    assert forced.returncode == 2 and "Traceback" not in forced.stderr, forced.stderr[-3000:]
    last = forced.stderr.strip().splitlines()[-1]
    assert "does not fit this run's model (size mismatch for " in last and "another --run.dir" in last, last


def test_a_run_whose_output_reader_goes_away_trains_to_the_end(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    args = [*FAST, "--data.dir", str(data_dir), "--run.dir", str(run_dir), "--train.epochs", "3"]
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), *args], cwd=tmp_path, env=env_for_tests(tmp_path), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    banner = f"fasttrain {fasttrain.__version__} | torch"  # printed before training starts
    while banner not in (line := proc.stdout.readline()):
        assert line, f"the trainer ended before its banner:\n{proc.communicate(timeout=60)[1][-3000:]}"
    proc.stdout.close()  # `fasttrain train ... | head -3`, or a `tee` that died
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "the reader of this run's output went away; training goes on" in stderr and "Traceback" not in stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert [row["epoch"] for row in read_jsonl(run_dir / "metrics.jsonl") if row["kind"] == "epoch"] == [1, 2, 3]


def test_unwritable_run_dir_is_refused_at_start(tmp_path, data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = run_train([*FAST, "--data.dir", str(data_dir), "--run.dir", str(blocker / "run")], tmp_path, check=False)
    assert proc.returncode == 2 and "cannot write" in proc.stderr and "--run.dir" in proc.stderr


def test_disk_full_at_save_time_keeps_the_previous_checkpoint(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    args = [
        *FAST,
        "--model.widths",
        "16,32",
        "--data.dir",
        str(data_dir),
        "--train.epochs",
        "2",
        "--run.dir",
        str(run_dir),
    ]
    proc = start_train(args, tmp_path)
    wait_for_step(run_dir, 12, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    previous = sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1]
    digest = tree_digest(previous)
    model_bytes = next(previous.glob("model*.safetensors")).stat().st_size

    def small_disk():  # no file may grow past half the model's size: the next model file cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (model_bytes // 2, model_bytes // 2))

    proc = start_train([*args, "--resume", "auto"], tmp_path, preexec_fn=small_disk)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert "could not write checkpoint" in out and f"previous checkpoint {previous} is intact" in out
    assert tree_digest(previous) == digest and not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_disk_full_when_the_run_ends_names_the_failed_write_after_the_final_figures(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    args = [*FAST, "--data.dir", str(data_dir), "--run.dir", str(run_dir), "--train.epochs", "1"]
    args += ["--checkpoint.every", "0", "--checkpoint.final", "false"]  # the final weights are the first large file

    def small_disk():  # the final model.safetensors (about 20 kB) cannot be written; metrics rows can
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    proc = start_train(args, tmp_path, preexec_fn=small_disk)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    final, error = out.index("final: val_acc"), out.index(f"could not write the run's outputs in {run_dir}: ")
    error_line = out[error:].splitlines()[0]
    assert final < error and "File too large" in error_line and "--resume auto" in error_line
    assert len(read_jsonl(run_dir / "metrics.jsonl")) >= 1, "what was written before is kept"


# The trainer, with metrics.jsonl moved away just before the run's outputs are written (someone tidying up).
METRICS_MOVED_AT_THE_END = """
import sys
from fasttrain import train
from fasttrain.tracking.report import Reporter

finish = Reporter.finish
def move_metrics_then_finish(self, *args, **kwargs):
    (self.run_dir / "metrics.jsonl").rename(self.run_dir / "moved.jsonl")
    return finish(self, *args, **kwargs)
Reporter.finish = move_metrics_then_finish
sys.exit(train.main(sys.argv[1:]))
"""


def test_metrics_moved_away_during_the_run_costs_the_curves_only(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    args = [*FAST, "--data.dir", str(data_dir), "--run.dir", str(run_dir), "--train.epochs", "1"]
    proc = run_train(args, tmp_path, timeout=300, script=METRICS_MOVED_AT_THE_END)  # raises if it fails
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"curves.png not drawn: No such file or directory ({run_dir / 'metrics.jsonl'})" in proc.stdout
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert (run_dir / "model.safetensors").exists() and not (run_dir / "curves.png").exists()


def test_torch_saves_failed_write_is_recognised_as_one(tmp_path):
    """torch.save (an optimiser's state in a checkpoint) reports a full disk through its zip writer, not OSError."""
    script = (
        "import torch\n"
        "from fasttrain.files import is_write_failure, write_failure_reason\n"
        "try:\n"
        "    torch.save(torch.zeros(100_000), 'state.bin')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, is_write_failure(e), write_failure_reason(e))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind, recognised, reason = proc.stdout.split(maxsplit=2)
    assert recognised == "True", proc.stdout  # torch 2.14: RuntimeError, "[enforce fail at inline_container.cc...]"
    assert kind == "OSError" or reason.startswith("torch.save could not write its file"), proc.stdout


def test_wandb_unreachable_falls_back_to_offline_once(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40}
    proc = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            *TINY,
            "--data.mode",
            "gpu",
            "--data.dir",
            str(data_dir),
            "--run.dir",
            str(run_dir),
            "--train.epochs",
            "1",
            "--wandb.mode",
            "online",
        ],
        cwd=tmp_path,
        env={**env_for_tests(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("wandb sync") == 1, "says so once, with how to upload later"
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_batch_that_does_not_divide_across_ranks_is_refused(tmp_path, data_dir):
    proc, _ = launch(
        [*FAST, "--data.dir", str(data_dir), "--train.batch_size", "101", "--run.dir", str(tmp_path / "r")],
        tmp_path,
        processes=2,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "train.batch_size" in proc.stderr and "multiple of 2" in proc.stderr


def test_a_rank_killed_with_sigkill_ends_the_job_within_a_minute(tmp_path, data_dir):
    import psutil

    run_dir = tmp_path / "r"
    env = {**env_for_tests(tmp_path), "ACCELERATE_USE_CPU": "1"}

    cmd = [
        str(ACCELERATE),
        "launch",
        "--config_file",
        str(CPU_2PROC),
        "--main_process_port",
        str(29500 + (os.getpid() + 7) % 1000),
        str(TRAIN),
        *FAST,
        "--data.dir",
        str(data_dir),
        "--run.dir",
        str(run_dir),
        "--train.epochs",
        "50",
    ]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, 4, job)
    rank1 = [
        p
        for p in psutil.Process(job.pid).children(recursive=True)
        if p.environ().get("RANK") == "1" and "train.py" in " ".join(p.cmdline())
    ]
    assert len(rank1) == 1
    t0 = time.perf_counter()
    rank1[0].kill()
    out, _ = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.perf_counter() - t0 < 60, "the surviving rank must not hang"
    # torchrun's failure report names the killed worker: rank 1, exit code -9.
    assert re.search(r"rank\s*:\s*1\b.*?exitcode\s*:\s*-9\b", out, re.S), out[-3000:]
