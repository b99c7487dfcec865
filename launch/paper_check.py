"""Back-of-envelope check of data-parallel scaling: gradient all-reduce time vs compute time per step.

    .venv/bin/python launch/paper_check.py                       # the assumptions quoted in launch/SCALING.md
    .venv/bin/python launch/paper_check.py --tflops 120 --net-gbits 100,400,3200 --net-efficiency 0.8

Parameter counts and forward FLOPs come from the models themselves; every bandwidth and throughput is an
ASSUMPTION given on the command line, not a measurement. Prints markdown tables.

Model (ring all-reduce): each rank sends and receives 2(N-1)/N x S bytes for a gradient of S bytes, so over the
slowest link, of bus bandwidth B, the all-reduce takes t_ar = 2(N-1)/N x S / B. Within one machine that link is a
GPU's NVLink; across machines it is the machine's network connection, which all of that machine's rings share.
Latency terms (a few microseconds per ring step) are ignored.

Compute: t_c = 3 x forward FLOPs per image x per-GPU batch / achieved FLOP/s (backward ~ 2 x forward).
Without overlap a step takes t_c + t_ar. DDP all-reduces each bucket while the rest of the backward pass runs,
so with ideal overlap a step takes t_fwd + max(t_bwd, t_ar) with t_fwd = t_c/3 and t_bwd = 2 t_c/3: the
all-reduce is hidden as long as t_ar <= t_bwd, i.e. t_c >= 1.5 t_ar. The bucket whose gradients are ready last
(the first layers') can only be sent after the backward pass, so with DDP's buckets a step takes at least
t_fwd + max(t_bwd, t_ar - t_last) + t_last, where t_last is that bucket's share of t_ar. The buckets are computed the
way DDP first assigns them (parameters in reverse order, a 1 MiB first bucket, then --bucket-cap-mb).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch.distributed as dist  # noqa: E402

from fasttrain.models import count_params, create, flops_per_image  # noqa: E402


@dataclass
class Link:
    name: str
    ranks: int  # N in the ring
    bus_gbs: float  # assumed effective bus bandwidth, GB/s (1e9 bytes/s) per direction


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", default="resnet9_ffcv,resnet9_myrtle,resnet18", help="comma-separated fasttrain model names"
    )
    p.add_argument("--batch-per-gpu", type=int, default=512, help="images per GPU per step (weak scaling)")
    p.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="instead: a fixed global batch split over the N GPUs of each row (strong scaling, as "
        "fasttrain's train.batch_size does)",
    )
    p.add_argument(
        "--tflops",
        type=float,
        default=200.0,
        help="ASSUMED achieved training throughput per GPU, TFLOP/s (H100 SXM dense BF16 peak, vendor spec: 989)",
    )
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=2, help="machines in the multi-node rows")
    p.add_argument(
        "--nvlink-gbs",
        type=float,
        default=370.0,
        help="effective NVLink bus bandwidth per GPU, GB/s (H100 NVLink 4 line rate 450 GB/s per "
        "direction, vendor spec; ~370 GB/s after protocol overhead, nccl-tests ring busBw, typical)",
    )
    p.add_argument(
        "--net-gbits",
        default="100,400",
        help="network bandwidth PER MACHINE, Gb/s line rate, comma-separated (8 NICs x 400 Gb/s = 3200)",
    )
    p.add_argument(
        "--net-efficiency", type=float, default=0.9, help="ASSUMED fraction of network line rate that NCCL achieves"
    )
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket_cap_mb (MiB; DDP's default 25)")
    return p.parse_args(argv)


def last_bucket_fraction(model, bucket_cap_mb: float) -> float:
    """Share of the gradient bytes in the bucket DDP can only all-reduce after the backward pass has finished."""
    params = [p for p in reversed(list(model.parameters())) if p.requires_grad]  # roughly the order grads are ready
    limits = [dist._DEFAULT_FIRST_BUCKET_BYTES, int(bucket_cap_mb * 2**20)]
    buckets, _ = dist._compute_bucket_assignment_by_size(params, limits)
    sizes = [sum(params[i].numel() for i in bucket) for bucket in buckets]
    return sizes[-1] / sum(sizes)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    achieved = a.tflops * 1e12
    links = [Link(f"NVLink, 1 x {a.gpus_per_node} GPUs", a.gpus_per_node, a.nvlink_gbs)]
    for gbits in (float(g) for g in a.net_gbits.split(",") if g.strip()):
        links.append(
            Link(
                f"{gbits:g} Gb/s, {a.nodes} x {a.gpus_per_node} GPUs",
                a.nodes * a.gpus_per_node,
                gbits / 8 * a.net_efficiency,
            )
        )

    stats = {}
    for name in names:
        model = create(name)
        stats[name] = (count_params(model), flops_per_image(model), last_bucket_fraction(model, a.bucket_cap_mb))

    batching = (
        f"global batch {a.global_batch} split over the N GPUs"
        if a.global_batch
        else f"{a.batch_per_gpu} images per GPU per step"
    )
    print(
        f"Assumptions: {batching}; {a.tflops:g} TFLOP/s achieved per GPU; "
        f"NVLink bus bandwidth {a.nvlink_gbs:g} GB/s; network {a.net_gbits} Gb/s per machine at "
        f"{a.net_efficiency:.0%} of line rate; DDP buckets of {a.bucket_cap_mb:g} MiB. Ring all-reduce, latency "
        f"ignored. MB = 1e6 bytes.\n"
    )

    print(
        "| model | params | grads fp32 (MB) | grads bf16 (MB) | last DDP bucket | fwd GFLOP/image | "
        "batch on 1 GPU | train TFLOP/step | compute t_c, 1 GPU (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (params, flops, last) in stats.items():
        batch = a.global_batch or a.batch_per_gpu
        step_flops = 3 * flops * batch
        print(
            f"| {name} | {params:,} | {params * 4 / 1e6:.2f} | {params * 2 / 1e6:.2f} | {last:.0%} | "
            f"{flops / 1e9:.3f} | "
            f"{batch} | {step_flops / 1e12:.3f} | {fmt_ms(step_flops / achieved)} |"
        )

    print(
        "\n| model | grads | link | N | batch/GPU | t_c (ms) | sent per rank (MB) | bus GB/s | t_ar (ms) | "
        "hidden while t_c >= (ms) | min batch/GPU to hide | efficiency: no overlap / DDP buckets / ideal |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (params, flops, last) in stats.items():
        seconds_per_image = 3 * flops / achieved
        for dtype, width in (("fp32", 4), ("bf16", 2)):
            size = params * width
            for link in links:
                batch = a.global_batch / link.ranks if a.global_batch else a.batch_per_gpu
                t_c = seconds_per_image * batch
                sent = 2 * (link.ranks - 1) / link.ranks * size
                t_ar = sent / (link.bus_gbs * 1e9)
                eff_serial = t_c / (t_c + t_ar)
                eff_overlap = t_c / (t_c / 3 + max(2 * t_c / 3, t_ar))
                eff_buckets = t_c / (t_c / 3 + max(2 * t_c / 3, t_ar * (1 - last)) + t_ar * last)
                hide_batch = 1.5 * t_ar / seconds_per_image  # t_bwd(B) = t_ar
                print(
                    f"| {name} | {dtype} | {link.name} | {link.ranks} | {batch:g} | {fmt_ms(t_c)} | "
                    f"{sent / 1e6:.1f} | {link.bus_gbs:.1f} | {fmt_ms(t_ar)} | {fmt_ms(1.5 * t_ar)} | "
                    f"{hide_batch:,.0f} | {eff_serial:.0%} / {eff_buckets:.0%} / {eff_overlap:.0%} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
