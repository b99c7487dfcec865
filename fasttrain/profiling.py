"""Where a training step's time goes: torch.profiler over a few steps, summarised as one JSON-ready dict.

On CUDA it sums the device's own activity (kernels, copies and memsets: what the GPU did) against the wall time of
the profiled steps: a step whose device is busy far less than its wall time is bound by the host (Python, launches,
syncs), not by the kernels, and the top kernels say which work dominates. Work on overlapping streams would be
counted twice (a busy share above 1); a training step's work is on one stream, the stream loader's copies aside.
On a CPU it lists the operators by their own CPU time. Used by `fasttrain bench step|overhead --profile-steps N`,
after the timed repeats, so the profiler's cost is never timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

TOP = 12


def profile_steps(step: Callable[[], None], steps: int, device: torch.device) -> dict[str, Any]:
    """Run `step` `steps` times under torch.profiler and summarise: wall and device-busy time per step, kernels per
    step, and the top kernels (CUDA) or operators (CPU) by their own time per step."""
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        wall_s = time.perf_counter() - t0
    summary: dict[str, Any] = {"steps": steps, "wall_ms_per_step": 1000 * wall_s / steps}
    if on_cuda:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
        top = sorted(by_name.items(), key=lambda item: sum(item[1]), reverse=True)[:TOP]
        summary |= {
            "device_busy_ms_per_step": busy_us / 1000 / steps,
            "device_busy_fraction": busy_us / 1e6 / wall_s,
            "kernels_per_step": len(kernels) / steps,
            "top": [_entry(name, sum(times), len(times), steps, busy_us) for name, times in top],
        }
    else:
        ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total_us = sum(e.self_cpu_time_total for e in ops)
        top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
        summary["top"] = [_entry(e.key, e.self_cpu_time_total, e.count, steps, total_us) for e in top]
    return summary


def _entry(name: str, own_us: float, calls: int, steps: int, total_us: float) -> dict[str, Any]:
    """One kernel or operator: its own time per step, its share of all of them, and its calls per step."""
    return {
        "name": name[:160],
        "ms_per_step": own_us / 1000 / steps,
        "share": own_us / total_us if total_us else 0.0,
        "calls_per_step": calls / steps,
    }


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU): before a host clock is read, in bench's
    timers, the trainer's and the loader benchmark's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
