"""Decisions made once per run: precision from the config, the launcher and the device; CPU threads under
`accelerate launch`."""

from types import SimpleNamespace

import pytest
import torch

from fasttrain.config import load_config
from fasttrain.errors import ConfigError
from fasttrain.loop import resolve as resolve_module
from fasttrain.loop.resolve import launched_single_threaded, make_accelerator, precision_for, resolve, usable_cpus

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # a device object only: nothing here runs on it
AUTO_PRECISION = ["--config", "cpu_quick", "--train.mixed_precision", "auto"]


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


@pytest.fixture
def gpu_present(monkeypatch):
    """torch reports a bf16-capable GPU (this machine may have none), and the launcher's settings are unset."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    for name in ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "requested,launcher,expected",
    [
        ("auto", None, "bf16"),  # bf16 on a GPU that has it
        ("auto", "no", "bf16"),  # the launcher's default "no" is no choice
        ("auto", "fp16", "fp16"),  # `accelerate launch --mixed_precision fp16` is honoured
        ("bf16", "fp16", "bf16"),  # an explicit config wins over the launcher
        ("fp16", None, "fp16"),
    ],
)
def test_precision_on_a_cuda_device(gpu_present, requested, launcher, expected):
    assert precision_for(requested, CUDA, launcher) == expected


def test_without_bf16_a_cuda_device_defaults_to_fp32(gpu_present, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert precision_for("auto", CUDA, None) == "no"


def test_a_cuda_device_that_only_emulates_bf16_defaults_to_fp32(gpu_present, monkeypatch):
    """A V100 or T4: torch says bf16 is supported when emulation counts (its default), and not otherwise."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert precision_for("auto", CUDA, None) == "no"


def test_cpu_flag_means_fp32_where_a_gpu_is_present(gpu_present, fresh_accelerate_state, monkeypatch):
    """`accelerate launch --cpu` (ACCELERATE_USE_CPU) on a machine with a bf16 GPU: the run is on the CPU, so "auto"
    is fp32 there, and every other automatic decision follows the CPU too, not the GPU torch can see."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    cfg = load_config(AUTO_PRECISION)
    accelerator, notes = make_accelerator(cfg)
    plan = resolve(cfg, accelerator, notes)
    assert accelerator.device.type == "cpu" and plan.device == "cpu" and plan.device_name == "cpu"
    assert accelerator.mixed_precision == "no" and plan.mixed_precision == "no"
    assert not plan.fused_optimizer and plan.compile is False  # compile "off" in cpu_quick; see the next case too
    cfg.train.compile = "auto"
    assert resolve(cfg, accelerator).compile is False


@pytest.mark.parametrize("launcher,config,expected", [("fp16", "auto", "fp16"), ("bf16", "auto", "bf16"),
                                                     ("no", "auto", "bf16"), ("fp16", "no", "no")])  # fmt: skip
def test_the_launchers_precision_reaches_the_accelerator_on_a_cuda_device(gpu_present, monkeypatch, launcher,
                                                                          config, expected):  # fmt: skip
    """make_accelerator on a CUDA device (Accelerate's state and Accelerator stand-ins: no GPU needed) builds the
    Accelerator with the precision the launcher or config chose, and names a launcher setting it overrides."""
    built = {}
    monkeypatch.setattr(resolve_module, "PartialState", lambda cpu: SimpleNamespace(device=CUDA))
    monkeypatch.setattr(resolve_module, "Accelerator", lambda **kwargs: built.update(kwargs) or "accelerator")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    _, notes = make_accelerator(load_config(["--config", "cpu_quick", "--train.mixed_precision", config]))
    assert built["mixed_precision"] == expected and built["cpu"] is False
    assert any("the launcher asked for fp16" in note for note in notes) == (config == "no")


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
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # --cpu: the launcher's own choice of threads, from the cores
    assert not launched_single_threaded()  # or from the OMP_NUM_THREADS=1 it was given
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")  # what the launcher sets without --cpu
    assert launched_single_threaded()
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


def test_the_plan_and_the_loaders_refuse_the_same_stream_settings(fresh_accelerate_state):
    """Alternating flips and reflect padding are the resident loader's: the stream mode refuses them where they
    would act, before any work, and allows them where they would not (no flips, no translation)."""
    accelerator, _ = make_accelerator(load_config(["--config", "cpu_quick"]))

    def plan(*overrides):
        return resolve(load_config(["--config", "cpu_quick", "--data.mode", "stream", *overrides]), accelerator)

    with pytest.raises(ConfigError, match="data.flip_mode alternating exists only in the device-resident loader"):
        plan("--data.flip_mode", "alternating")
    with pytest.raises(ConfigError, match="data.translate_fill reflect exists only in the device-resident loader"):
        plan("--data.translate_fill", "reflect")
    assert plan("--data.flip_mode", "alternating", "--data.flip", "false").data_mode == "stream"
    assert plan("--data.translate_fill", "reflect", "--data.translate", "0").data_mode == "stream"


def test_ddp_leaves_batchnorm_statistics_to_evaluation(fresh_accelerate_state):
    """DDP's default would broadcast rank 0's BatchNorm buffers before every forward, a collective a step; the
    trainer gives every rank rank 0's statistics only when it evaluates (sync_buffers), and saves rank 0's."""
    accelerator, _ = make_accelerator(load_config(["--config", "cpu_quick"]))
    assert accelerator.ddp_handler.to_kwargs() == {"broadcast_buffers": False}
