"""Per-group optimisers and schedules across a `--resume force`: the resumed run's groups follow its own config."""

import json

import pytest
import torch
from helpers import read_jsonl, run_train

# The airbench94 recipe narrowed to seconds on a CPU: widths 8/16/16, batch 100 (10 steps per epoch on the
# 1,000-image slice), Muon for the filters and one SGD optimiser for its three bias/head groups.
TINY_AIRBENCH = [
    "--config", "airbench94", "--model.widths", "8,16,16", "--train.batch_size", "100", "--train.compile", "off",
    "--train.mixed_precision", "no", "--data.eval_batch_size", "500", "--train.tta_level", "0",
    "--train.log_every", "5", "--checkpoint.every", "1", "--checkpoint.keep", "5", "--wandb.mode", "disabled",
]  # fmt: skip
# What the resumed run changes: every group's peak LR, the whitening bias's end, the run's length.
CHANGED = {"filters": 0.1, "whiten_bias": 0.03, "norm_biases": 0.02, "head": 0.3}
CHANGED_ARGS = [
    *(arg for name, lr in CHANGED.items() for arg in (f"--param_groups.{name}.lr", str(lr))),
    "--param_groups.whiten_bias.end_epoch", "2.5", "--train.epochs", "3",
]  # fmt: skip


def saved_groups(checkpoint) -> dict[str, dict]:
    """Every parameter group of the checkpoint's optimisers by name: its LR and LambdaLR's stored peak."""
    groups = {}
    for optimizer_file in sorted(checkpoint.glob("optimizer*.bin")):
        for g in torch.load(optimizer_file, weights_only=False)["param_groups"]:
            groups[g["group"]] = {"lr": g["lr"], "initial_lr": g["initial_lr"]}
    return groups


def test_resume_force_with_changed_lrs_puts_every_group_on_the_new_schedule(tmp_path, cifar_slice_dir):
    """1 epoch, then --resume force for 3 epochs with new peak LRs and a new end for the whitening bias: at step 20
    every group's LR is its new peak x (1 - step / (end_epoch x 10)) (the recipe: no warm-up, linear decay to 0 at
    its end epoch; the whitening bias ends at 2.5 epochs, the others at the run's 3), not the checkpoint's."""
    run_dir = tmp_path / "run"
    base = [*TINY_AIRBENCH, "--data.dir", str(cifar_slice_dir), "--run.dir", str(run_dir)]
    run_train([*base, "--train.epochs", "1"], tmp_path)
    before = saved_groups(run_dir / "checkpoints" / "ckpt-e0001-s0000010")
    assert before.keys() == CHANGED.keys(), "both optimisers' four groups are checkpointed"
    assert before["filters"]["initial_lr"] == 0.24 and before["head"]["initial_lr"] == 0.67  # the recipe's peaks

    resumed = run_train([*base, *CHANGED_ARGS, "--resume", "force"], tmp_path)
    assert "resumed from" in resumed.stdout and "step 10" in resumed.stdout
    end_step = {"filters": 30, "whiten_bias": 25, "norm_biases": 30, "head": 30}
    after = saved_groups(run_dir / "checkpoints" / "ckpt-e0002-s0000020")
    for name, peak in CHANGED.items():
        assert after[name]["lr"] == pytest.approx(peak * (1 - 20 / end_step[name]), rel=1e-12), name
        assert after[name]["initial_lr"] == peak, name
    scheduler_peaks = [
        torch.load(f, weights_only=False)["base_lrs"]
        for f in sorted(run_dir.glob("checkpoints/ckpt-e0002-*/scheduler*.bin"))
    ]
    assert sorted(sum(scheduler_peaks, [])) == sorted(CHANGED.values())
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 30
    logged = {r["step"]: r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "step"}
    assert logged[15] == pytest.approx(CHANGED["filters"] * (1 - 15 / 30))  # rows log the first group's LR
