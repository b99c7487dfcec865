"""Small helpers for what every rank must agree on. Process groups themselves belong to Accelerate."""

from __future__ import annotations

import hashlib
import os
import signal
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import broadcast_object_list, gather_object

from fasttrain.errors import StopNow


def sum_across_ranks(accelerator, values: list[float] | torch.Tensor) -> list[float]:
    """Sum a few numbers over all ranks (one all-reduce); returns Python floats, identical on every rank."""
    t = torch.as_tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


def per_rank(accelerator, value: float) -> list[float]:
    """`value` in this rank's slot of a list with one slot per rank, zeros elsewhere: appended to the values of a
    `sum_across_ranks` it tells every rank what each rank had, in the same collective."""
    slots = [0.0] * accelerator.num_processes
    slots[accelerator.process_index] = float(value)
    return slots


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if `flag` is true on any of them. One process needs no collective (and no device sync)."""
    if accelerator.num_processes == 1:
        return flag
    return sum_across_ranks(accelerator, [float(flag)])[0] > 0


def from_main(accelerator, value: Any) -> Any:
    """The main process's `value`, on every rank (e.g. a run directory with a timestamp in it)."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def parameters_agree(accelerator, model: torch.nn.Module) -> bool | None:
    """Whether every rank holds bit for bit the same parameters (a digest of their bytes, gathered once at the end of
    a run); None with one process. DDP promises it; Muon and several optimisers are where it could break."""
    if accelerator.num_processes == 1:
        return None
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        digest.update(name.encode())
        flat = p.detach().cpu().reshape(-1).clone(memory_format=torch.contiguous_format)  # any layout: stride 1
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return len(set(gather_object([digest.hexdigest()]))) == 1


def sync_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics, so all ranks evaluate the same model."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so it can checkpoint and exit cleanly.

    A second signal raises StopNow (a KeyboardInterrupt) at once: a user pressing Ctrl-C twice wants out now.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise StopNow(signum)
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def inject_fault(rank: int, step: int, at: str = "step") -> bool:
    """Fault injection for the reliability tests, off unless FASTTRAIN_INJECT_FAULT is set:
    "rank=1,step=5" makes rank 1 raise after 5 optimizer steps, as a crashing rank would;
    "at=checkpoint,step=20,action=kill" makes the process SIGKILL itself while writing the checkpoint of step 20,
    after its files are written and before they are renamed into place; "action=term" sends SIGTERM instead.
    Other moments: at=eval (an evaluation starts), at=metrics (half of a metrics.jsonl line is written),
    at=wandb (W&B has just started), at=batch (the batch of optimizer step `step` is about to be trained).
    "at=batch,rank=1,step=2,action=nan" returns True there: the loop then trains that rank on a batch of NaNs, so
    only that rank's loss goes non-finite at that step. Returns False otherwise."""
    spec = os.environ.get("FASTTRAIN_INJECT_FAULT")
    if not spec:
        return False
    target = dict(part.split("=", 1) for part in spec.split(","))
    if target.get("at", "step") != at or int(target.get("rank", 0)) != rank or int(target["step"]) != step:
        return False
    action = target.get("action", "raise")
    if action == "nan":
        return True
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "term":  # as `kill PID` would: the loop checkpoints at its next check and exits 143
        os.kill(os.getpid(), signal.SIGTERM)
        return False
    raise RuntimeError(f"injected fault on rank {rank} at step {step} (FASTTRAIN_INJECT_FAULT={spec})")
