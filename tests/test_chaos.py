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
import torch
from helpers import (
    FAST,
    checkpoint_steps,
    launch,
    read_jsonl,
    run_train,
    start_train,
    wait_for_step,
    wandb_history,
    wandb_offline_runs,
    wandb_records,
)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS, EPOCH = 30, 10  # 3 epochs of 10 steps on the 1,000-image slice; a checkpoint at each epoch's end
CHAOS = [*FAST, "--train.epochs", "3", "--checkpoint.every", "1", "--model.dropout", "0.1", "--wandb.mode", "offline"]
KINDS = ("step", "eval", "checkpoint", "metrics", "wandb")
BLIND_KILL_S = (0.5, 4.0)  # after the planned kills, one by the clock, before the resumed run can finish
SAME = ("kind", "epoch", "step", "lr", "train_loss", "train_loss_smoothed", "train_acc", "val_loss", "val_acc")


def plan_kills(rng: random.Random) -> list[tuple[str, int]]:
    """One kill of each kind, in a random order, each at a random step the resumed run still reaches."""
    kills, resume_step = [], 0
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


def assert_same_weights(a, b) -> None:
    first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert first.keys() == second.keys()
    unequal = [k for k in first if not torch.equal(first[k], second[k])]
    assert not unequal, f"tensors differ: {unequal}"


@pytest.fixture(scope="module")
def uninterrupted(cifar_slice_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    run_train([*CHAOS, "--data.dir", str(cifar_slice_dir), "--run.dir", str(tmp / "run")], tmp)
    return tmp / "run"


def test_killed_at_random_moments_the_run_resumes_to_the_same_result(uninterrupted, cifar_slice_dir, tmp_path):
    seed = int(os.environ.get("FASTTRAIN_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)
    kills = plan_kills(rng)
    delay = rng.uniform(*BLIND_KILL_S)
    context = f"FASTTRAIN_CHAOS_SEED={seed}, kills (moment, step): {kills}, then a SIGKILL {delay:.2f} s after start"
    print(context)
    run_dir = tmp_path / "run"
    args = [*CHAOS, "--data.dir", str(cifar_slice_dir), "--run.dir", str(run_dir), "--resume", "auto"]
    for kind, step in kills:
        fault = f"at={kind},step={step},action=kill"
        proc = run_train(args, tmp_path, check=False, env_extra={"FASTTRAIN_INJECT_FAULT": fault})
        assert proc.returncode == -signal.SIGKILL, f"{context}: {fault} did not kill the run:\n{proc.stdout[-2000:]}"
    blind = start_train(args, tmp_path)  # wherever the clock finds it: start-up, a step, an evaluation, a write
    time.sleep(delay)
    blind.kill()
    blind.communicate(timeout=60)
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


def test_plan_covers_every_moment_and_only_reachable_steps():
    for seed in range(200):
        kills = plan_kills(random.Random(seed))
        assert sorted(kind for kind, _ in kills) == sorted(KINDS)
        assert all(0 <= step <= STEPS for _, step in kills)


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
