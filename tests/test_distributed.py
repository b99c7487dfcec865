"""Scale-out, proven with real processes: `accelerate launch` with 2 CPU processes on gloo."""

import json
import os
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, TINY, launch, read_jsonl
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture
def data_dir(cifar_slice_dir):
    return cifar_slice_dir


@pytest.mark.parametrize("mode", ["ffcv", "gpu"])
def test_two_processes_share_the_work_and_only_rank0_writes(tmp_path, data_dir, mode):
    run_dir = tmp_path / "run"
    proc, _ = launch(
        [
            *TINY,
            "--data.dir",
            str(data_dir),
            "--data.mode",
            mode,
            "--run.dir",
            str(run_dir),
            "--train.epochs",
            "2",
            "--wandb.mode",
            "offline",
        ],
        tmp_path,
        processes=2,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2, "a run that silently fell back to one process"
    assert summary["batch_size_global"] == 100 and summary["batch_size_per_device"] == 50
    assert "x2" in proc.stdout  # the start-up line names the world size

    rows = read_jsonl(run_dir / "metrics.jsonl")
    epochs = [r for r in rows if r["kind"] == "epoch"]
    # 1,000 training images: each rank reads its 500, in 10 batches of 50 -> 10 global steps per epoch.
    assert [r["step"] for r in epochs] == [10, 20]
    assert all(r["val_count"] == 1000 for r in epochs), "every test image counted exactly once across ranks"
    steps = [r for r in rows if r["kind"] == "step"]
    assert len({r["step"] for r in rows if r["kind"] == "step"}) == len(steps), "only rank 0 writes metrics"
    for r in steps:  # the global rate is the sum of both ranks' own rates (they run in lockstep)
        assert r["images_per_sec"] == pytest.approx(2 * r["images_per_sec_main"], rel=0.3)
        assert r["images_per_sec_per_device"] == pytest.approx(r["images_per_sec"] / 2)

    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1, "only rank 0 starts W&B"
    last = sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1]
    assert sorted(p.name for p in last.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert len(list(last.glob("model*.safetensors"))) == 1


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1]
    return load_file(str(next(last.glob("model*.safetensors"))))


TWO_OPTIMISERS = """
# airbench's split on a BatchNorm-free DeepCNN: Muon for the conv filters, Nesterov SGD for the rest, the biases on
# a schedule that ends early (their parameters frozen from then on)
param_groups:
  filters:
    {params: ["stem.*.weight", "stages.*.weight"], optimizer: muon, lr: 0.05, momentum: 0.6, nesterov: true}
  biases: {params: ["*.bias"], optimizer: sgd, lr: 0.05, momentum: 0.85, nesterov: true, end_epoch: 2}
"""
MUON_PARAMS = yaml.safe_load(TWO_OPTIMISERS)["param_groups"]["filters"]["params"]


# The summed loss's case: its gradients are 1,000 times a mean's on the full 1,000-image batch, so LRs / 1,000. Every
# group on SGD, the optimiser a wrong gradient scale moves (measured without the fix: weights up to 2.6e-3 apart;
# with it 2e-8). Muon ignores the scale, and its bf16 Newton-Schulz would blur the comparison: the gradient's last
# bits differ with the split, and at this scale they flip a rounding in the first step and spread (1e-3 by step 4).
SUMMED_LOSS = [
    "--train.loss_reduction", "sum", "--train.lr", "2e-4", "--param_groups.biases.lr", "2e-4",
    "--param_groups.filters.optimizer", "sgd", "--param_groups.filters.lr", "2e-4",
]  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path, data_dir, reduction):
    """Full-batch steps (global batch = all 1,000 images), no augmentation, no BatchNorm, no dropout, and two
    optimisers with their own schedules (Muon's update is computed from the all-reduced gradient): each step's
    gradient is the same whatever the split, so DDP's averaged gradients must give the 1-process weights, and the
    two ranks must hold the same parameters. With a summed loss each rank sums over its half of the batch and DDP
    averages: the engine scales by the process count, else the SGD groups would step half as far."""
    recipe = tmp_path / "two_optimisers.yaml"
    recipe.write_text(TWO_OPTIMISERS)
    args = [
        "--config", str(recipe), "--model.name", "deepcnn", "--model.widths", "8,16", "--model.blocks", "1,1",
        "--model.batchnorm", "false", "--train.batch_size", "1000", "--train.lr", "0.05", "--train.lr_ref_batch",
        "1000", "--train.lr_peak_epoch", "1", "--train.epochs", "4", "--train.label_smoothing", "0",
        "--train.mixed_precision", "no", "--train.compile", "off", "--train.tta_level", "0", "--data.dir",
        str(data_dir), "--data.mode", "resident", "--data.flip", "false", "--data.translate", "0", "--data.cutout", "0",
        "--wandb.mode", "disabled", *(SUMMED_LOSS if reduction == "sum" else []),
    ]  # fmt: skip
    one, _ = launch([*args, "--run.dir", str(tmp_path / "one")], tmp_path, processes=1)
    assert one.returncode == 0, one.stderr[-4000:]
    two, _ = launch([*args, "--run.dir", str(tmp_path / "two")], tmp_path, processes=2)
    assert two.returncode == 0, two.stderr[-4000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parameters_agree_across_ranks"] is True
    filters = "filters sgd" if reduction == "sum" else "filters muon"
    assert filters in two.stdout and "biases sgd" in two.stdout, "the groups ran the optimisers meant"
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    filter_banks = [key for key in w1 if any(fnmatch(key, pattern) for pattern in MUON_PARAMS)]
    assert len(filter_banks) == 6, filter_banks
    for key in w1:
        if key in filter_banks and reduction == "mean":  # on Muon (SUMMED_LOSS puts them on SGD)
            # One process sums the batch in another order than DDP's all-reduce (so does another thread count), and
            # Muon's bf16 Newton-Schulz turns those last bits into bf16 roundings of the update. Measured on this CPU,
            # the same 1-process run at 1 and at 2 threads: filters up to 1.1e-3 apart, at most 2.7e-4 on average;
            # against a run on 500 of the images (what a rank without the all-reduce steps on): 2.0e-3 to 5.6e-3.
            mean_difference = (w2[key] - w1[key]).abs().mean()
            assert mean_difference <= 6e-4, (key, mean_difference)
        else:
            torch.testing.assert_close(w2[key], w1[key], rtol=1e-3, atol=1e-4)
    loss_one = [r["train_loss"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "epoch"]
    loss_two = [r["train_loss"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert loss_one == pytest.approx(loss_two, rel=1e-4)  # per-image figures, whatever the reduction
    assert loss_one[-1] < loss_one[0], "the runs trained (the comparison is not between two untouched models)"


def test_a_rank_that_raises_ends_the_whole_job_quickly(tmp_path, data_dir):
    proc, seconds = launch(
        [
            *TINY,
            "--data.dir",
            str(data_dir),
            "--data.mode",
            "gpu",
            "--run.dir",
            str(tmp_path / "r"),
            "--train.epochs",
            "3",
            "--wandb.mode",
            "disabled",
        ],
        tmp_path,
        processes=2,
        env_extra={"FASTTRAIN_INJECT_FAULT": "rank=1,step=5"},
        timeout=180,
    )
    assert proc.returncode != 0
    assert "injected fault on rank 1 at step 5" in proc.stderr
    startup_and_run = 60
    assert seconds < startup_and_run, f"the job took {seconds:.0f} s to die"


def test_a_non_finite_loss_on_one_rank_stops_every_rank_together(tmp_path, data_dir):
    """Rank 1 trains step 2 on a batch of NaNs; rank 0's own loss stays finite in that log window (the NaN reaches
    it through the all-reduced gradient only at step 3). The ranks agree at the log step, so both stop there with
    the same message and exit 3: none raises alone while the other waits in a collective."""
    run_dir = tmp_path / "r"
    proc, seconds = launch(
        [*TINY, "--data.dir", str(data_dir), "--data.mode", "resident", "--run.dir", str(run_dir),
         "--train.epochs", "2", "--wandb.mode", "disabled"],
        tmp_path, processes=2, env_extra={"FASTTRAIN_INJECT_FAULT": "at=batch,rank=1,step=2,action=nan"},
        timeout=180,
    )  # fmt: skip
    message = "fasttrain train: error: the loss became NaN/Inf in 1 of optimizer steps 1-2 on rank 1 of 2 processes."
    assert proc.stderr.count(message) == 2, proc.stderr[-4000:]  # once per rank (their lines may interleave)
    assert 'train.py", line' not in proc.stderr, "no rank died of an exception (the launcher's own traceback aside)"
    # Both ranks exit 3; whichever the launcher sees second it may have stopped itself by then (a race of exits).
    assert "exitcode  : 3" in proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "nonfinite_loss"
    assert seconds < 60, f"the job took {seconds:.0f} s to stop"


def test_two_processes_train_repeats_in_one_process_group(tmp_path, data_dir):
    """`--run.repeats 2` under `accelerate launch`: the process group outlives the first run (it ends once, after
    the last), so the second run's collectives work."""
    root = tmp_path / "repeats"
    proc, _ = launch(
        [*TINY, "--data.dir", str(data_dir), "--data.mode", "resident", "--run.dir", str(root), "--train.epochs", "1",
         "--run.repeats", "2", "--wandb.mode", "disabled"],
        tmp_path, processes=2,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((root / "repeats.json").read_text())
    assert result["runs"] == 2 and result["seeds"] == [0, 1] and result["exit_code"] == 0
    for i in range(2):
        summary = json.loads((root / f"repeat-{i}" / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["world_size"] == 2 and summary["steps"] == 10
        assert summary["parameters_agree_across_ranks"] is True


_AGREEMENT = """
import json, sys
from accelerate import Accelerator
from accelerate.launchers import debug_launcher

def agree(out_dir):
    import torch
    from fasttrain import models
    from fasttrain.loop.distributed import any_rank, from_main, parameters_agree, per_rank, sum_across_ranks

    acc = Accelerator(cpu=True)
    rank = acc.process_index
    torch.manual_seed(0)  # the same weights on both ranks
    model = models.create("deepcnn", widths=(8, 16), blocks=(1, 1))
    same = parameters_agree(acc, model)
    if rank == 1:  # one rank stores its filters channels-last: the same values, another layout
        model = model.to(memory_format=torch.channels_last)
    same_values_other_layout = parameters_agree(acc, model)
    if rank == 1:
        with torch.no_grad():
            first = next(model.parameters())
            first[(0,) * first.ndim] += 1e-6  # one element, one rank
    drifted = parameters_agree(acc, model)
    result = {
        "same": same, "layout": same_values_other_layout, "drifted": drifted,
        "any": [any_rank(acc, rank == 1), any_rank(acc, False)],
        "sums": sum_across_ranks(acc, [1.0 + rank, *per_rank(acc, 10.0 * (rank + 1))]),
        "main": from_main(acc, f"value of rank {rank}"),
    }
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)

debug_launcher(lambda: agree(sys.argv[1]), num_processes=2)
"""


def test_what_ranks_agree_on_is_the_same_on_both_and_sees_one_drifted_parameter(tmp_path):
    """The helpers behind summary.json's parameters_agree_across_ranks and the loop's agreed stops, in two real
    gloo processes: a one-element drift on one rank is seen on both; a layout change alone is not a drift."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _AGREEMENT, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1], "every rank gets the same answers"
    assert (ranks[0]["same"], ranks[0]["layout"], ranks[0]["drifted"]) == (True, True, False)
    assert ranks[0]["any"] == [True, False]
    assert ranks[0]["sums"] == [3.0, 10.0, 20.0]  # 1 + 2, then each rank's own slot
    assert ranks[0]["main"] == "value of rank 0"
