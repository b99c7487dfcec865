"""Chaos resume: a run killed with SIGKILL at random moments, each time continued with --resume auto, ends exactly
where the uninterrupted run ends: the same weights (torch.equal), every metrics row once with the same numbers,
each W&B step once, a complete summary.json. Real processes, real SIGKILLs, real W&B offline files.

FASTTRAIN_CHAOS_SEED picks the moments (default: a fresh seed, printed); a failure names the seed and the moments.
"""

import json
import os
import random
import signal
import time

import pytest
from helpers import (
    FAST,
    assert_same_weights,
    checkpoint_steps,
    has_logged,
    launch,
    read_jsonl,
    run_train,
    start_train,
    wait_for_step,
    wandb_history,
    wandb_offline_runs,
    wandb_records,
)

pytestmark = pytest.mark.slow

STEPS, EPOCH = 30, 10  # 3 epochs of 10 steps on the 1,000-image slice; a checkpoint at each epoch's end
CHAOS = [*FAST, "--train.epochs", "3", "--checkpoint.every", "1", "--model.dropout", "0.1", "--wandb.mode", "offline"]
KINDS = ("step", "eval", "checkpoint", "metrics", "wandb")
# First a kill by the clock, wherever it finds the training (a step, an evaluation, a checkpoint, a write): at a random
# moment after the first metrics row, before the uninterrupted run took to reach this step, so the planned kills
# still find steps to reach.
BLIND_KILL_BEFORE_STEP = 26
SAME = ("kind", "epoch", "step", "lr", "train_loss", "train_loss_smoothed", "train_acc", "val_loss", "val_acc")


def plan_kills(rng: random.Random, resume_step: int = 0) -> list[tuple[str, int]]:
    """One kill of each kind, in a random order, each at a random step the resumed run still reaches (the run starts
    from the checkpoint of `resume_step`)."""
    kills = []
    for kind in rng.sample(KINDS, len(KINDS)):
        later = range(resume_step + 1, STEPS + 1)
        choices = {
            "step": list(later),
            "eval": [s for s in later if s % EPOCH == 0],
            "checkpoint": [s for s in later if s % EPOCH == 0],
            "metrics": [s for s in later if s % 2 == 0],  # log_every 2: a row at every even step
            "wandb": [resume_step],  # W&B starts at the step the run resumes from
        }[kind]
        step = rng.choice(choices)
        kills.append((kind, step))
        if kind != "wandb":  # the newest checkpoint written before the kill (epoch ends before `step`)
            resume_step = max([c for c in range(EPOCH, STEPS, EPOCH) if c < step] + [resume_step])
    return kills


def wandb_history_steps(run_dir) -> list[int]:
    """The step of every history record in every W&B offline run of `run_dir`, repeats kept."""
    return [
        step for run in wandb_offline_runs(run_dir) for record_file in run.glob("run-*.wandb")
        for step, _ in wandb_history(wandb_records(record_file))
    ]  # fmt: skip


def same_rows(rows: list[dict]) -> list[tuple]:
    return [tuple(row.get(key) for key in SAME) for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(cifar_slice_dir, tmp_path_factory):
    """The run uninterrupted, and the seconds from its first metrics row to step BLIND_KILL_BEFORE_STEP."""
    tmp = tmp_path_factory.mktemp("whole")
    proc = start_train([*CHAOS, "--data.dir", str(cifar_slice_dir), "--run.dir", str(tmp / "run")], tmp)
    wait_for_step(tmp / "run", 1, proc)
    t0 = time.perf_counter()
    wait_for_step(tmp / "run", BLIND_KILL_BEFORE_STEP, proc)
    seconds = time.perf_counter() - t0
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return tmp / "run", seconds


def test_killed_at_random_moments_the_run_resumes_to_the_same_result(uninterrupted, cifar_slice_dir, tmp_path):
    uninterrupted, before_s = uninterrupted
    seed = int(os.environ.get("FASTTRAIN_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)
    delay = rng.uniform(0.0, before_s)
    context = f"FASTTRAIN_CHAOS_SEED={seed}, a SIGKILL {delay:.2f} s after the first metrics row"
    context += f" (the uninterrupted run went from there to step {BLIND_KILL_BEFORE_STEP} in {before_s:.1f} s)"
    print(context, flush=True)
    run_dir = tmp_path / "run"
    args = [*CHAOS, "--data.dir", str(cifar_slice_dir), "--run.dir", str(run_dir), "--resume", "auto"]
    blind = start_train(args, tmp_path)
    wait_for_step(run_dir, 1, blind)
    deadline = time.perf_counter() + delay
    while time.perf_counter() < deadline and not has_logged(run_dir, BLIND_KILL_BEFORE_STEP):  # a faster run: earlier
        time.sleep(0.005)
    blind.kill()
    blind.communicate(timeout=60)
    resume_step = max(checkpoint_steps(run_dir), default=0) if (run_dir / "checkpoints").is_dir() else 0
    kills = plan_kills(rng, resume_step)
    context += f", checkpoint at step {resume_step}, then kills (moment, step): {kills}"
    print(context)
    for kind, step in kills:
        fault = f"at={kind},step={step},action=kill"
        proc = run_train(args, tmp_path, check=False, env_extra={"FASTTRAIN_INJECT_FAULT": fault})
        assert proc.returncode == -signal.SIGKILL, f"{context}: {fault} did not kill the run:\n{proc.stdout[-2000:]}"
    run_train(args, tmp_path)

    assert_same_weights(uninterrupted, run_dir)
    rows, expected = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(uninterrupted / "metrics.jsonl")
    assert same_rows(rows) == same_rows(expected), context
    steps, whole_steps = wandb_history_steps(run_dir), wandb_history_steps(uninterrupted)
    assert whole_steps and sorted(whole_steps) == sorted(set(whole_steps)), "the uninterrupted run's W&B history"
    # Every step once over all the W&B offline runs: a SIGKILL loses what wandb had not written yet, and the
    # resumed run sends that again, but nothing W&B already holds.
    assert sorted(steps) == sorted(whole_steps), f"{context}: W&B steps {sorted(steps)}"
    summary = json.loads((run_dir / "summary.json").read_text())
    whole = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["status"] == "finished" and summary.keys() == whole.keys(), context
    for key in ("val_acc", "tta_acc", "best_val_acc", "epochs", "steps"):
        assert summary[key] == whole[key], f"{context}: {key}"


@pytest.mark.parametrize("resume_step", [0, 10, 20])
def test_plan_covers_every_moment_and_only_reachable_steps(resume_step):
    for seed in range(200):
        kills = plan_kills(random.Random(seed), resume_step)
        assert sorted(kind for kind, _ in kills) == sorted(KINDS)
        newest = resume_step  # the checkpoint each run resumes from: the epoch-end ones (10, 20) a kill came after
        for kind, step in kills:
            if kind == "wandb":
                assert step == newest, "W&B starts at the step the run resumes from"
            else:
                assert newest < step <= STEPS, "a step the resumed run still trains"
                newest = max([c for c in (10, 20) if c < step] + [newest])
            if kind in ("eval", "checkpoint"):
                assert step % EPOCH == 0, "evaluations and checkpoints come at epoch ends"
            if kind == "metrics":
                assert step % 2 == 0, "rows are logged every 2 steps"


def test_sigterm_to_a_two_process_launch_checkpoints_both_ranks_at_one_step(cifar_slice_dir, tmp_path):
    common = [*FAST, "--data.dir", str(cifar_slice_dir), "--train.epochs", "2", "--checkpoint.every", "1"]
    common += ["--model.dropout", "0.1"]  # each rank's dropout masks continue from its own saved RNG state
    whole, _ = launch([*common, "--run.dir", str(tmp_path / "whole")], tmp_path, processes=2)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run_dir = tmp_path / "cut"
    proc = launch([*common, "--run.dir", str(run_dir)], tmp_path, processes=2, background=True)
    wait_for_step(run_dir, 12, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    steps = checkpoint_steps(run_dir)
    assert steps and 10 < steps[-1] < 20, f"a mid-epoch checkpoint: {steps}\n{out[-3000:]}"
    newest = sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1]
    assert {p.name for p in newest.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert json.loads((newest / "meta.json").read_text())["world_size"] == 2

    resumed, _ = launch([*common, "--run.dir", str(run_dir), "--resume", "auto"], tmp_path, processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "whole", run_dir)


def test_sigterm_to_a_two_process_launch_with_fewer_steps_than_log_every_stops_at_the_epochs_end(
    cifar_slice_dir, tmp_path
):
    """Two processes agree on a stop signal in a collective; with train.log_every beyond the run's 500 steps the
    epoch's end is the only one, and there both ranks checkpoint and stop, rather than train on to the end."""
    run_dir = tmp_path / "r"
    args = [*FAST, "--data.dir", str(cifar_slice_dir), "--train.epochs", "50", "--train.log_every", "1000"]
    proc = launch([*args, "--run.dir", str(run_dir), "--checkpoint.every", "0"], tmp_path, processes=2, background=True)
    wait_for_step(run_dir, 10, proc)  # the first epoch's row
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "SIGTERM received: writing a checkpoint at step" in out, out[-3000:]
    steps = checkpoint_steps(run_dir)
    assert len(steps) == 1 and steps[0] % 10 == 0 and 10 <= steps[0] < 500, f"{steps}\n{out[-3000:]}"
    newest = sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1]
    assert {p.name for p in newest.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
