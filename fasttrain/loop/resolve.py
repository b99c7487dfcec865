"""Every automatic decision of a run, made once: the Accelerator, then one frozen `RunPlan` that the banner, W&B,
summary.json and bench all read. Nothing decides "auto" again later."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from fasttrain.config import Config
from fasttrain.data.loaders import refuse_resident_only
from fasttrain.errors import ConfigError
from fasttrain.loop.optim import scaled_lr


@dataclass(frozen=True)
class RunPlan:
    """What this run does, decided from the config and the hardware."""

    device: str  # "cuda:0", "cpu"
    device_name: str  # "NVIDIA H100 80GB HBM3", or the CPU's name
    world_size: int
    mixed_precision: str  # "no" | "bf16" | "fp16"
    compile: bool
    compile_mode: str
    data_mode: str  # "resident" | "stream"
    workers: int  # ffcv threads, after clamping to the CPUs this process may use
    batch_size_global: int
    batch_size_per_device: int
    lr_peak: float  # the train section's peak LR at this global batch (param_groups scale theirs alike)
    channels_last: bool
    fused_optimizer: bool
    cpu_threads: int  # torch's intra-op threads on this process
    notes: tuple[str, ...] = ()  # decisions a user should hear about (clamped workers, ignored launcher settings)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "notes"}


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under SLURM or taskset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def precision_for(requested: str, device: torch.device, launcher: str | None) -> str:
    """`train.mixed_precision` made concrete. "auto" honours `accelerate launch --mixed_precision fp16|bf16`
    (ACCELERATE_MIXED_PRECISION); the launcher's "no" is also its default, so it cannot be told from no choice:
    then bf16 on CUDA, fp32 elsewhere (bf16 autocast is ~10x slower than fp32 on most CPUs)."""
    on_cuda = device.type == "cuda"
    if requested == "auto":
        if launcher in ("fp16", "bf16"):
            requested = launcher
        else:
            # Emulated bf16 (pre-Ampere GPUs) is slower than fp32: only native bf16 counts.
            return "bf16" if on_cuda and torch.cuda.is_bf16_supported(including_emulation=False) else "no"
    if requested == "fp16" and not on_cuda:
        raise ConfigError(
            "train.mixed_precision: fp16 needs a CUDA device (on CPU it would silently run fp32); use bf16 or no"
        )
    return requested


def launched_single_threaded() -> bool:
    """Whether `accelerate launch` without --cpu started this one process per machine with its default of one
    thread: 1.6x slower training on a 2-core CPU than the CPUs allow. With --cpu the launcher chose the threads
    itself (from the cores, or from the OMP_NUM_THREADS it was given), and that choice stands."""
    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set by accelerate launch for every process it starts
    one_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("ACCELERATE_NUM_PROCESSES", "1"))) == 1
    single = os.environ.get("OMP_NUM_THREADS") == "1"
    return launched and not launcher_asked_for_cpu() and one_per_node and single and usable_cpus() > 1


def launcher_asked_for_cpu() -> bool:
    """Whether `accelerate launch --cpu` (or ACCELERATE_USE_CPU) started this process."""
    return os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")


def clamp_workers(requested: int, option: str) -> tuple[int, str | None]:
    """At most the CPUs this process may use of `requested` ffcv threads, and a one-line notice naming `option`
    when that is fewer."""
    cpus = usable_cpus()
    if requested <= cpus:
        return requested, None
    return cpus, f"{option} {requested} clamped to {cpus}: this process may use {cpus} CPUs"


def make_accelerator(cfg: Config, cpu: bool = False) -> tuple[Accelerator, list[str]]:
    """The Accelerator, with precision chosen for the device Accelerate picked (`--cpu`, or `cpu`, means CPU, so
    fp32). Returns it with notes about launcher settings fasttrain overrides."""
    notes = []
    use_cpu = cpu or launcher_asked_for_cpu() or not torch.cuda.is_available()
    device = PartialState(cpu=use_cpu).device
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    precision = precision_for(cfg.train.mixed_precision, device, launcher_precision)
    if launcher_precision in ("fp16", "bf16") and launcher_precision != precision:
        notes.append(f"the launcher asked for {launcher_precision}; train.mixed_precision={precision} wins")
    dynamo = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if dynamo not in ("no", ""):
        notes.append(
            f"ignoring the Accelerate dynamo_backend '{dynamo}': fasttrain compiles the model itself "
            "(train.compile, train.compile_mode); compiling twice would only cost time"
        )
    if device.type == "cpu" and launched_single_threaded():
        torch.set_num_threads(usable_cpus())
        notes.append(
            f"accelerate launch without --cpu gives a CPU run 1 thread (OMP_NUM_THREADS=1); fasttrain uses the "
            f"{usable_cpus()} CPUs this process may use (taskset or --cpu --num_cpu_threads_per_process choose others)"
        )
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=use_cpu,
        dynamo_backend="no",
        # The schedules count optimizer steps of the global batch: step them exactly once per step.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(minutes=10)),
            # DDP's default broadcasts rank 0's BatchNorm statistics before every forward: a collective a step, for
            # what evaluation and checkpoints read from rank 0 anyway (fasttrain.loop.distributed.sync_buffers).
            DistributedDataParallelKwargs(broadcast_buffers=False),
        ],
    )
    return accelerator, notes


def resolve(cfg: Config, accelerator: Accelerator, notes: list[str] = ()) -> RunPlan:
    """The RunPlan for `cfg` on this Accelerator's device and processes. Raises ConfigError for a batch that does
    not divide across processes, or augmentation the chosen data mode cannot do."""
    t, d = cfg.train, cfg.data
    device = accelerator.device
    on_cuda = device.type == "cuda"
    world = accelerator.num_processes
    notes = list(notes)
    if t.batch_size % world:
        raise ConfigError(
            f"train.batch_size: the global batch {t.batch_size} does not divide across {world} processes; "
            f"use a multiple of {world}"
        )
    data_mode = d.mode if d.mode != "auto" else ("resident" if on_cuda else "stream")
    refuse_resident_only(data_mode, d.flip, d.flip_mode, d.translate, d.translate_fill)  # before any work
    workers, clamped = clamp_workers(d.workers, "data.workers")
    if clamped and data_mode == "stream":
        notes.append(clamped)
    compile_on = t.compile == "on" or (t.compile == "auto" and on_cuda)
    return RunPlan(
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if on_cuda else "cpu",
        world_size=world,
        mixed_precision=accelerator.mixed_precision,
        compile=compile_on,
        compile_mode=t.compile_mode,
        data_mode=data_mode,
        workers=workers,
        batch_size_global=t.batch_size,
        batch_size_per_device=t.batch_size // world,
        lr_peak=scaled_lr(t, t.batch_size),
        channels_last=t.channels_last,
        fused_optimizer=on_cuda,
        cpu_threads=torch.get_num_threads(),
        notes=tuple(notes),
    )


def configure_backends(plan: RunPlan) -> None:
    """CUDA settings every fast CIFAR trainer uses: cuDNN picks the fastest conv algorithms for our fixed shapes,
    and fp32 matmuls/convs may use TF32."""
    if plan.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
