#!/usr/bin/env bash
# fasttrain under plain torchrun instead of `accelerate launch`: same training, no Accelerate config file.
#
#   bash launch/torchrun.sh --config resnet9                          # this machine, one process per GPU
#   NPROC_PER_NODE=2 CUDA_VISIBLE_DEVICES= bash launch/torchrun.sh --config cpu_quick    # 2 CPU processes (gloo)
#   # two machines: run on each, NODE_RANK 0 on the machine at MASTER_ADDR and 1 on the other
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash launch/torchrun.sh --config resnet18
#
# Everything after the script goes to fasttrain/train.py. Variables: NNODES (1), NODE_RANK (0), MASTER_ADDR
# (127.0.0.1), MASTER_PORT (29500), NPROC_PER_NODE (the visible CUDA devices, or 1 without CUDA), TORCHRUN (the
# venv's torchrun; FASTTRAIN_VENV picks the venv, default ./.venv).
#
# Why this works: torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; Accelerator() sees
# LOCAL_RANK and calls torch.distributed.init_process_group with them (NCCL on GPUs; gloo when fasttrain asks for
# the CPU because no CUDA device is visible). What `accelerate launch` would add are ACCELERATE_* variables
# (mixed precision, dynamo), and fasttrain sets both itself, so nothing is lost.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="${FASTTRAIN_VENV:-$repo/.venv}"
torchrun="${TORCHRUN:-$venv/bin/torchrun}"

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE="$("$venv/bin/python" -c 'import torch; print(torch.cuda.device_count())')"
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi

exec "$torchrun" \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    fasttrain/train.py "$@"
