"""Decisions made once per run: precision from the config, the launcher and the device; CPU threads under
`accelerate launch`."""

import pytest
import torch

from fasttrain.config import load_config
from fasttrain.errors import ConfigError
from fasttrain.loop.resolve import launched_single_threaded, make_accelerator, precision_for, resolve, usable_cpus

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "requested,launcher,expected",
    [
        ("auto", None, "no"),  # fp32 on a CPU: bf16 autocast is ~10x slower there
        ("auto", "no", "no"),
        ("auto", "bf16", "bf16"),  # `accelerate launch --mixed_precision bf16` is honoured
        ("no", "bf16", "no"),  # an explicit config wins over the launcher
        ("bf16", None, "bf16"),
    ],
)
def test_precision_follows_config_then_launcher_then_device(requested, launcher, expected):
    assert precision_for(requested, CPU, launcher) == expected


@pytest.mark.parametrize("requested,launcher", [("fp16", None), ("auto", "fp16")])
def test_fp16_on_a_cpu_is_refused_not_silently_fp32(requested, launcher):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        precision_for(requested, CPU, launcher)


@pytest.fixture
def accelerate_launch_env(monkeypatch):
    """The environment `accelerate launch` without --cpu gives its one process on a machine without a GPU."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    if usable_cpus() < 2:
        pytest.skip("needs 2 CPUs")


def test_accelerate_launchs_one_thread_default_is_recognised(accelerate_launch_env, monkeypatch):
    assert launched_single_threaded()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes share the CPUs: their threads are theirs to choose
    assert not launched_single_threaded()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a user's choice (--cpu --num_cpu_threads_per_process 2)
    assert not launched_single_threaded()
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # python fasttrain/train.py with OMP_NUM_THREADS=1: not ours to undo
    assert not launched_single_threaded()


def test_a_cpu_run_under_accelerate_launch_uses_the_cpus_it_may_use(accelerate_launch_env):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(["--config", "cpu_quick"])
        accelerator, notes = make_accelerator(cfg)
        plan = resolve(cfg, accelerator, notes)
        assert plan.cpu_threads == usable_cpus() == torch.get_num_threads()
        assert plan.mixed_precision == "no" and plan.device == "cpu"
        assert any("OMP_NUM_THREADS=1" in note for note in plan.notes)
    finally:
        torch.set_num_threads(threads)
