"""Benchmarks of fasttrain's parts and of whole runs. Each sub-command prints ONE JSON object (one line) on stdout,
with the environment it ran in; progress and library chatter go to stderr.

    fasttrain bench loader   --data DIR [--mode both|resident|stream --batch-size 512 --workers 8 --epochs 4]
    fasttrain bench step     [--model resnet9_ffcv --batch-size 512 --precision bf16 --compile --steps 50]
    fasttrain bench overhead --data DIR [the options of step]
    fasttrain bench e2e      --config resnet9 [--target-acc 0.91] [-- --data.dir DIR ...trainer options]

loader: images/s of the training loader with training augmentations, for both data modes by default; the first epoch
is warm-up (ffcv's numba JIT; the resident mode's one-time read is `setup_s`), the figure is the median over the
later epochs.
step: training images/s of a model on a fixed synthetic batch already on the device (forward, the trainer's loss,
backward, SGD step): warm-up steps apart (they hold torch.compile's compilation), median over repeats.
`--profile-steps N` (step, overhead) adds a torch.profiler summary of N more steps (fasttrain.profiling).
overhead: fasttrain's step engine (through Accelerate, as the trainer builds it) against a bare PyTorch loop, both
fed by the resident loader's augmented batches of DIR, repeats interleaved in one process; overhead is the median
of the per-repeat relative differences in step time.
e2e: the trainer end to end in a subprocess; reads its summary.json (time to target, accuracies, images/s, times).

step and overhead decide nothing themselves: their flags become the trainer's configuration (`--precision` is
train.mixed_precision, `--compile` train.compile, ...; everything else the defaults), and fasttrain.loop.resolve's
RunPlan for it (precision, compile, fused optimisers, device, data mode, workers) is what they run and report,
under "plan" in the JSON.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

import fasttrain
from fasttrain import models
from fasttrain.config import Config, DataSection, build_config
from fasttrain.data.loaders import MODE_ALIASES
from fasttrain.errors import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_TRAINER_FAILED,
    ConfigError,
    FasttrainError,
    exit_process,
    run_command,
)
from fasttrain.files import dumps, read_json
from fasttrain.loop.optim import build_schedulers
from fasttrain.loop.resolve import RunPlan, clamp_workers, configure_backends, make_accelerator, resolve
from fasttrain.profiling import profile_steps, synchronize
from fasttrain.train import build_model, build_run_loaders, build_run_optimizers

REPO = Path(__file__).resolve().parents[1]


class BenchError(FasttrainError):
    pass


class TrainerFailed(BenchError):
    """The trainer `bench e2e` started failed in a way its own output explains (a crash, a timeout)."""

    exit_code = EXIT_TRAINER_FAILED


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- environment and timing -------------------------------------------------------------------------------------


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    import accelerate

    cuda = device.type == "cuda"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "device_type": device.type,
        "world_size": world_size,
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "accelerate": accelerate.__version__,
        "fasttrain": fasttrain.__version__,
        "git": _git_revision(),
    }


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BenchError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is visible here; use --device cpu")
    return device


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds that `steps` calls of `step` take, measured on the device: CUDA events around the queued work (after
    draining earlier work, so none of it is counted), the wall clock on a CPU."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# --- the run plan, models, batches and the bare training step -----------------------------------------------------

COMPILE_SETTING = {None: "auto", True: "on", False: "off"}  # --compile / --no-compile / neither


def model_overrides(name: str, pairs: Sequence[str]) -> list[tuple[str, str, str]]:
    """`--model-arg widths=8,16` pairs as the trainer's `--model.widths 8,16` overrides (typed by the config)."""
    overrides = []
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            valid = ", ".join(models.describe(name))
            raise ConfigError(f"--model-arg {pair!r}: expected KEY=VALUE with KEY one of {valid}")
        overrides.append(("model", key, value))
    return overrides


def config_from_flags(args: argparse.Namespace) -> Config:
    """The trainer's configuration that the step/overhead flags stand for; every other setting is the default."""
    overrides = [
        ("run", "seed", str(args.seed)),
        ("model", "name", args.model),
        *model_overrides(args.model, args.model_arg),
        ("train", "batch_size", str(args.batch_size)),
        ("train", "mixed_precision", args.precision),
        ("train", "channels_last", str(args.channels_last)),
        ("train", "compile", COMPILE_SETTING[args.compile]),
        ("train", "compile_mode", args.compile_mode),
    ]
    if getattr(args, "data", None) is not None:
        # overhead measures on the resident loader (the trainer's choice on CUDA) on every device
        overrides += [("data", "dir", str(args.data)), ("data", "mode", "resident")]
    return build_config(None, overrides)


def plan_for(cfg: Config, device_flag: str | None) -> tuple[Accelerator, RunPlan]:
    """The Accelerator and the trainer's RunPlan for `cfg` (precision, compile, fused optimisers, ... decided once,
    by fasttrain.loop.resolve) on the device `--device` names, by default where the trainer would run."""
    wanted = resolve_device(device_flag)
    accelerator, notes = make_accelerator(cfg, cpu=wanted.type == "cpu")
    if accelerator.device.type != wanted.type:
        raise BenchError(f"the trainer would run on {accelerator.device}; --device {device_flag} differs")
    plan = resolve(cfg, accelerator, notes)
    configure_backends(plan)
    for note in plan.notes:
        log(f"note: {note}")
    return accelerator, plan


def make_model(cfg: Config, plan: RunPlan) -> tuple[nn.Module, dict[str, Any]]:
    """The configured model as the trainer builds it, on the plan's device in training mode, and its size."""
    torch.manual_seed(cfg.run.seed)
    model, info = build_model(cfg, plan)
    return model.to(plan.device).train(), info


def synthetic_batch(cfg: Config, plan: RunPlan) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(cfg.run.seed)
    images = torch.randn(plan.batch_size_per_device, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (plan.batch_size_per_device,), generator=generator)
    fmt = torch.channels_last if plan.channels_last else torch.contiguous_format
    return images.to(plan.device).contiguous(memory_format=fmt), labels.to(plan.device)


def bare_step(
    forward: Callable,
    optimizer: torch.optim.Optimizer,
    batches: Iterator,
    precision: str,
    label_smoothing: float,
    scheduler=None,
) -> Callable[[], None]:
    """One plain PyTorch training step on the next batch, with the trainer's loss: torch.autocast, backward,
    optimizer step, schedule step."""
    device_type = "cuda" if torch.cuda.is_available() and precision != "no" else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None

    def step() -> None:
        images, labels = next(batches)
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(forward(images).float(), labels, label_smoothing=label_smoothing)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    return step


def repeat_batch(images: torch.Tensor, labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same batch forever (bench step: the model alone, no data)."""
    while True:
        yield images, labels


def endless(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A training loader's batches, epoch after epoch."""
    while True:
        yield from loader


def maybe_compile(module: nn.Module, plan: RunPlan) -> Callable:
    return torch.compile(module, mode=plan.compile_mode, dynamic=False) if plan.compile else module


def warm_up(step: Callable[[], None], args: argparse.Namespace, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup_steps):
        step()
    synchronize(device)
    return time.perf_counter() - t0


def throughput(seconds: list[float], args: argparse.Namespace) -> list[float]:
    return [args.steps * args.batch_size / s for s in seconds]


def compile_seconds(warmup_s: float, step_s: float, args: argparse.Namespace, plan: RunPlan) -> float:
    """Warm-up time beyond what its steps cost at the measured steady rate: compilation, autotuning, graph capture."""
    return max(0.0, warmup_s - args.warmup_steps * step_s) if plan.compile else 0.0


def _model_settings(args: argparse.Namespace, cfg: Config, plan: RunPlan) -> dict[str, Any]:
    return {
        "model": cfg.model["name"],
        "model_args": {key: value for key, value in cfg.model.items() if key != "name"},
        "batch_size": plan.batch_size_global,
        "precision": plan.mixed_precision,
        "channels_last": plan.channels_last,
        "compile": plan.compile,
        "compile_mode": plan.compile_mode if plan.compile else None,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup_steps": args.warmup_steps,
        "device": plan.device,
    }


def _check_counts(args: argparse.Namespace) -> None:
    for key in ("steps", "repeats", "warmup_steps", "batch_size", "profile_steps"):
        least = 0 if key in ("warmup_steps", "profile_steps") else 1
        if getattr(args, key) < least:
            raise BenchError(f"--{key.replace('_', '-')} must be >= {least}")


def _check_warm_up_holds_compilation(args: argparse.Namespace, plan: RunPlan) -> None:
    if plan.compile and args.warmup_steps < 1:
        raise BenchError("compiling needs --warmup-steps >= 1, or compilation would be timed as training")


def profile_or_reason(step: Callable[[], None], steps: int, device: torch.device) -> dict[str, Any]:
    """The profile of `steps` more steps; if the profiler itself fails (no CUPTI, say), why, and the timed figures
    measured before it still stand."""
    try:
        return profile_steps(step, steps, device)
    except Exception as e:  # noqa: BLE001 - the profile is an extra; the measurement must not be lost for it
        log(f"profile: torch.profiler failed: {e!r}")
        return {"error": repr(e)[:500]}


def _train_tflops(info: dict[str, Any], images_per_sec: float) -> float:
    # Backward costs about twice the forward: a training step is ~3x the forward FLOPs.
    return 3 * info["flops_per_image"] * images_per_sec / 1e12


# --- sub-commands ---------------------------------------------------------------------------------------------


def cmd_loader(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    from fasttrain.data.loaders import build_loaders
    from fasttrain.data.throughput import measure_loader

    device = resolve_device(args.device)
    if args.epochs < 2:
        raise BenchError("--epochs must be >= 2: the first epoch is warm-up")
    workers, clamped = clamp_workers(args.workers, "--workers")
    if clamped:
        log(f"loader: {clamped}")
    modes = ["stream", "resident"] if args.mode == "both" else [MODE_ALIASES.get(args.mode, args.mode)]
    per_mode = {}
    for mode in modes:
        log(f"loader: mode {mode}, batch {args.batch_size}, {workers} workers, {args.epochs} epochs on {device}")
        t0 = time.perf_counter()
        train_loader, _ = build_loaders(
            args.data, mode=mode, batch_size=args.batch_size, eval_batch_size=1000, workers=workers, device=device,
            flip=args.flip, translate=args.translate, cutout=args.cutout, seed=args.seed,
            channels_last=args.channels_last,
        )  # fmt: skip
        setup_s = time.perf_counter() - t0
        measured = measure_loader(train_loader, epochs=args.epochs)
        epoch_s, per_epoch = measured["epoch_s"], measured["images_per_epoch"]
        rates = [per_epoch / s for s in epoch_s[1:]]
        per_mode[mode] = {
            "images_per_sec": median(rates), "images_per_sec_epochs": rates, "measured_epochs": len(rates),
            "warmup_s": measured["warmup_s"], "epoch_s": epoch_s, "setup_s": setup_s,
            "images_per_epoch": per_epoch, "batches_per_epoch": len(train_loader),
            "dataset_size": train_loader.dataset_size,
        }  # fmt: skip
        log(
            f"loader: {mode}: {median(rates):.0f} images/s (median of {len(rates)} epochs), "
            f"warm-up {measured['warmup_s']:.1f} s, setup {setup_s:.1f} s"
        )
        del train_loader
    result = {
        "command": "loader", "env": environment(device),
        "settings": {"data": str(args.data), "modes": modes, "batch_size": args.batch_size, "workers": workers,
                     "workers_requested": args.workers, "epochs": args.epochs, "flip": args.flip,
                     "translate": args.translate, "cutout": args.cutout, "channels_last": args.channels_last,
                     "device": str(device)},
        "modes": per_mode,
    }  # fmt: skip
    if len(modes) == 1:
        result.update(per_mode[modes[0]])  # one mode: its figures at the top level too
    return result


def cmd_step(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    _check_counts(args)
    cfg = config_from_flags(args)
    _, plan = plan_for(cfg, args.device)
    _check_warm_up_holds_compilation(args, plan)
    device = torch.device(plan.device)
    model, info = make_model(cfg, plan)
    (optimizer,) = build_run_optimizers(model, cfg, plan)
    step = bare_step(
        maybe_compile(model, plan), optimizer, repeat_batch(*synthetic_batch(cfg, plan)), plan.mixed_precision,
        cfg.train.label_smoothing,
    )  # fmt: skip
    log(
        f"step: {cfg.model['name']} batch {plan.batch_size_global} {plan.mixed_precision} "
        f"channels_last={plan.channels_last} compile={plan.compile} on {device}: {args.warmup_steps} warm-up steps, "
        f"then {args.repeats} x {args.steps}"
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = warm_up(step, args, device)
    seconds = [time_steps(step, args.steps, device) for _ in range(args.repeats)]
    rates = throughput(seconds, args)
    step_s = median(seconds) / args.steps
    result = {
        "command": "step",
        "env": environment(device),
        "settings": _model_settings(args, cfg, plan),
        "plan": plan.as_dict(),
        **info,
        "images_per_sec": median(rates),
        "images_per_sec_repeats": rates,
        "step_time_ms": 1000 * step_s,
        "warmup_s": warmup_s,
        "compile_time_s": compile_seconds(warmup_s, step_s, args, plan),
        "train_tflops_est": _train_tflops(info, median(rates)),
    }
    if device.type == "cuda":
        result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.profile_steps:
        result["profile"] = profile_or_reason(step, args.profile_steps, device)
    log(
        f"step: {result['images_per_sec']:.0f} images/s, {result['step_time_ms']:.2f} ms/step, "
        f"compile {result['compile_time_s']:.1f} s"
    )
    return result


def training_loader(cfg: Config, plan: RunPlan):
    """The trainer's training loader for `cfg` and `plan`: its data mode, augmentation and seed."""
    return build_run_loaders(cfg, plan, cfg.data.dir)[0]


def cmd_overhead(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    from fasttrain.loop.engine import StepEngine, prepare_for_engine

    if args.data is None:
        raise BenchError("overhead needs --data DIR (a converted data set): both loops train on its augmented batches")
    _check_counts(args)
    cfg = config_from_flags(args)
    accelerator, plan = plan_for(cfg, args.device)
    _check_warm_up_holds_compilation(args, plan)
    device, t = torch.device(plan.device), cfg.train
    bare_loader, loop_loader = training_loader(cfg, plan), training_loader(cfg, plan)  # the same batches
    steps_per_epoch = len(bare_loader)
    bare_model, info = make_model(cfg, plan)
    loop_model = copy.deepcopy(bare_model)  # the same initial weights in both loops

    optimizers = build_run_optimizers(loop_model, cfg, plan)
    schedulers = build_schedulers(optimizers, t, cfg.param_groups, steps_per_epoch)
    prepared_model, optimizers, schedulers = prepare_for_engine(accelerator, loop_model, optimizers, schedulers)
    engine = StepEngine(
        prepared_model, optimizers, schedulers, accelerator,
        forward=maybe_compile(prepared_model, plan), label_smoothing=t.label_smoothing,
        loss_reduction=t.loss_reduction, grad_clip=t.grad_clip, nonfinite=t.nonfinite,
    )  # fmt: skip
    loop_batches = endless(loop_loader)

    def fasttrain_step() -> None:
        engine.step(*next(loop_batches))

    (bare_optimizer,) = build_run_optimizers(bare_model, cfg, plan)
    (bare_scheduler,) = build_schedulers([bare_optimizer], t, cfg.param_groups, steps_per_epoch)
    loops = {
        "fasttrain": fasttrain_step,
        "bare": bare_step(
            maybe_compile(bare_model, plan), bare_optimizer, endless(bare_loader), plan.mixed_precision,
            t.label_smoothing, bare_scheduler,
        ),
    }  # fmt: skip
    log(
        f"overhead: {cfg.model['name']} batch {plan.batch_size_global} {plan.mixed_precision} "
        f"channels_last={plan.channels_last} compile={plan.compile} on {device}, accelerate "
        f"{accelerator.distributed_type.value}, data {args.data} ({plan.data_mode}): {args.repeats} interleaved "
        f"repeats x {args.steps} steps per loop"
    )
    warmup_s = {name: warm_up(step, args, device) for name, step in loops.items()}
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.repeats):
        order = list(loops) if r % 2 == 0 else list(loops)[::-1]  # alternate, so a drift hits both loops alike
        for name in order:
            seconds[name].append(time_steps(loops[name], args.steps, device))
        engine.take_window()  # what the trainer reads at a log step
    rates = {name: throughput(s, args) for name, s in seconds.items()}
    paired = [100 * (f / b - 1) for f, b in zip(seconds["fasttrain"], seconds["bare"])]
    result = {
        "command": "overhead",
        "env": environment(device),
        "settings": {**_model_settings(args, cfg, plan), "data": str(args.data)},
        "plan": plan.as_dict(),
        **info,
        "accelerator": {
            "mixed_precision": accelerator.mixed_precision,
            "distributed_type": accelerator.distributed_type.value,
        },
        "fasttrain_images_per_sec": median(rates["fasttrain"]),
        "bare_images_per_sec": median(rates["bare"]),
        "overhead_pct": median(paired),
        "overhead_pct_repeats": paired,
        "fasttrain_images_per_sec_repeats": rates["fasttrain"],
        "bare_images_per_sec_repeats": rates["bare"],
        "fasttrain_step_time_ms": 1000 * median(seconds["fasttrain"]) / args.steps,
        "bare_step_time_ms": 1000 * median(seconds["bare"]) / args.steps,
        "compile_time_s": {
            name: compile_seconds(warmup_s[name], median(seconds[name]) / args.steps, args, plan) for name in loops
        },
        "warmup_s": warmup_s,
        "fasttrain_loop": "StepEngine.step through Accelerate (autocast, backward, optimizer and schedule steps, "
        "device-side statistics) on the resident loader's augmented batches",
        "bare_loop": "torch.autocast, loss.backward, optimizer.step, zero_grad, scheduler.step on the same batches",
    }
    if args.profile_steps:
        result["profile"] = profile_or_reason(fasttrain_step, args.profile_steps, device)  # the trainer's step
    log(
        f"overhead: fasttrain {result['fasttrain_images_per_sec']:.0f} vs bare {result['bare_images_per_sec']:.0f} "
        f"images/s: {result['overhead_pct']:+.2f}% step time (median of {args.repeats})"
    )
    return result


def _option_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _modified_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def cmd_e2e(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    train_py = Path(fasttrain.__file__).resolve().parent / "train.py"
    run_dir = _option_value(extra, "--run.dir")
    if run_dir is None:
        run_dir = args.run_dir or tempfile.mkdtemp(prefix="fasttrain-e2e-")
        extra = ["--run.dir", str(run_dir), *extra]
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise BenchError(f"--run-dir {run_dir} is a file, not a directory; choose another --run-dir")
    if args.launcher == "accelerate":
        launcher = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(args.num_processes),
            "--num_machines",
            "1",
            *(["--multi_gpu"] if args.num_processes > 1 else []),
        ]
    else:
        if args.num_processes != 1:
            raise BenchError("--num-processes > 1 needs --launcher accelerate")
        launcher = [sys.executable]
    cmd = [*launcher, str(train_py), "--config", args.config, *extra]
    if args.target_acc is not None:
        cmd += ["--train.target_acc", str(args.target_acc)]
    summary_path = run_dir / "summary.json"
    earlier_summary = _modified_ns(summary_path)  # a resumed run's, or one the trainer refuses to overwrite
    log(f"e2e: {' '.join(cmd)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno(), env=env, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        raise TrainerFailed(f"the trainer ran past --timeout {args.timeout} s and was stopped") from None
    process_wall_s = time.perf_counter() - t0
    if _modified_ns(summary_path) in (None, earlier_summary):
        # A trainer that refused its options as bad input (2) is bench's bad input too; anything else failed it.
        # (`accelerate launch` reports every failure as 1, so under --launcher accelerate this is always 1.)
        failure = BenchError if proc.returncode == EXIT_BAD_INPUT else TrainerFailed
        raise failure(f"the trainer exited {proc.returncode} without writing {summary_path} (its output is above)")
    summary = read_json(summary_path)
    keys = (
        "status",
        "exit_code",
        "time_to_target_s",
        "target_acc",
        "val_acc",
        "tta_acc",
        "best_val_acc",
        "images_per_sec",
        "train_time_s",
        "compile_time_s",
        "wall_time_s",
        "epochs",
        "steps",
        "world_size",
        "batch_size_global",
        "mixed_precision",
        "compile",
        "data_mode",
        "device_name",
        "tta_level",
        "total_time_s",
        "data_init_s",
        "final_eval_s",
        "model",
        "params",
        "gc_collections",
    )
    result = {
        "command": "e2e",
        "env": {
            **environment(resolve_device(None), summary.get("world_size") or 1),
            "device": summary.get("device_name"),
        },
        "settings": {
            "config": args.config,
            "target_acc": args.target_acc,
            "launcher": args.launcher,
            "num_processes": args.num_processes,
            "trainer_args": extra,
        },
        **{k: summary.get(k) for k in keys},
        "process_wall_s": process_wall_s,
        "process_exit_code": proc.returncode,
        "run_dir": str(run_dir),
        "command_line": cmd,
    }
    log(
        f"e2e: {summary.get('status')}, val_acc {summary.get('val_acc')}, tta_acc {summary.get('tta_acc')}, "
        f"train {summary.get('train_time_s')} s, time to target {summary.get('time_to_target_s')}, "
        f"{process_wall_s:.1f} s wall"
    )
    return result


COMMANDS: dict[str, Callable[[argparse.Namespace, list[str]], dict[str, Any]]] = {
    "loader": cmd_loader,
    "step": cmd_step,
    "overhead": cmd_overhead,
    "e2e": cmd_e2e,
}


# --- command line -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fasttrain bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bool_flag = argparse.BooleanOptionalAction
    data_defaults = DataSection()

    loader = sub.add_parser("loader", help="images/s of the training loader")
    loader.add_argument("--data", required=True, help="a converted data directory (train.beton, test.beton)")
    loader.add_argument(
        "--mode", choices=["both", "resident", "stream", "gpu", "ffcv"], default="both", help="gpu, ffcv: old names"
    )
    loader.add_argument("--batch-size", type=int, default=512)
    loader.add_argument("--workers", type=int, default=data_defaults.workers)
    loader.add_argument("--epochs", type=int, default=4, help="including the first, warm-up epoch (>= 2)")
    loader.add_argument("--flip", action=bool_flag, default=data_defaults.flip)
    loader.add_argument("--translate", type=int, default=data_defaults.translate)
    loader.add_argument("--cutout", type=int, default=data_defaults.cutout)
    loader.add_argument("--channels-last", action=bool_flag, default=True)

    for name, text in (
        ("step", "training images/s of a model on a synthetic batch"),
        ("overhead", "fasttrain's loop (Accelerate) vs a bare PyTorch loop"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--model",
            default="resnet9_ffcv",
            choices=[*models.names(), *models.former_names()],
            metavar="{" + ",".join(models.names()) + "}",
            help="; ".join(f"{old}: the former name of {new}" for old, new in models.former_names().items()),
        )
        p.add_argument(
            "--model-arg",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a model constructor argument, e.g. widths=8,16 (repeatable)",
        )
        p.add_argument("--batch-size", type=int, default=512)
        p.add_argument(
            "--precision",
            choices=["auto", "bf16", "fp16", "no"],
            default="auto",
            help="auto: bf16 on CUDA, no (fp32) on a CPU",
        )
        p.add_argument("--channels-last", action=bool_flag, default=True)
        p.add_argument(
            "--compile",
            action=bool_flag,
            default=None,
            help="torch.compile (default: train.compile auto, on CUDA only)",
        )
        p.add_argument(
            "--compile-mode",
            default="default",
            choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        )
        if name == "overhead":
            p.add_argument("--data", default=None, help="a converted data directory: both loops train on it")
        p.add_argument("--steps", type=int, default=50, help="timed steps per repeat")
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--warmup-steps", type=int, default=3)
        p.add_argument(
            "--profile-steps",
            type=int,
            default=0,
            help="after the timed repeats, profile this many steps (torch.profiler): top kernels, device busy time",
        )

    e2e = sub.add_parser("e2e", help="the trainer end to end; trainer options after --")
    e2e.add_argument("--config", default="resnet9", help="a shipped recipe name or a YAML file")
    e2e.add_argument("--target-acc", type=float, default=None, help="stop at this validation accuracy (0..1)")
    e2e.add_argument("--launcher", choices=["python", "accelerate"], default="python")
    e2e.add_argument("--num-processes", type=int, default=1)
    e2e.add_argument("--run-dir", default=None, help="default: a new temporary directory")
    e2e.add_argument("--timeout", type=float, default=None, help="seconds before the trainer is stopped")

    for p in sub.choices.values():
        p.add_argument("--seed", type=int, default=0)
        if p is not e2e:
            p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return parser


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr meanwhile: whatever libraries print (ffcv, numba, accelerate, C code) cannot
    end up in the JSON on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def command(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if extra and args.command != "e2e":
        parser.error(f"arguments after -- are trainer options, for e2e only: {' '.join(extra)}")
    with stdout_to_stderr():
        result = COMMANDS[args.command](args, extra)
    print(dumps(result), flush=True)
    if args.command == "e2e" and result.get("process_exit_code"):
        return EXIT_TRAINER_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_command("fasttrain bench", command, argv)


if __name__ == "__main__":
    exit_process(main())
