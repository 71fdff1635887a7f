#!/usr/bin/env bash
# Multi-node torchrun launch of a trainer command; run this script once on every node.
#
#   NNODES=2 NODE_RANK=0 RDZV_HOST=node0 NPROC_PER_NODE=8 examples/launch/torchrun_multinode.sh \
#       megatron-opsd train --config examples/configs/qwen3-32b_opsdc.yaml --set rollout.sidecar_urls=http://node2:8000
#   (and NODE_RANK=1 on the second node). The command after the options runs once per GPU (torchrun --no-python).
#
# Rendezvous: c10d on RDZV_HOST:RDZV_PORT; node 0 hosts the store (is_host, so two "nodes" on one machine
# work too). init_distributed reads the RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT that torchrun sets.
# Address: each node tells the others LOCAL_ADDR (torchrun --local-addr; default this node's address on its route to
# RDZV_HOST), not what its host name resolves to (torchrun's default: 127.x in many containers, any interface on a
# multi-homed node), so MASTER_ADDR is reachable from every node whichever agent gets rendezvous rank 0.
# Logs: one stdout/stderr file per rank under LOG_DIR/node<NODE_RANK>/ (also tee'd to this terminal).
# DRY_RUN=1 prints the command instead of running it.
#
# Sidecars started on their own (`megatron-opsd sidecar --secret-file F ...` creates F readable only by you) need
# the same secret here: OPSD_SIDECAR_SECRET_FILE=F (on a filesystem node 0 sees) or OPSD_SIDECAR_SECRET in the
# environment, never on a command line (docs/sidecar.md, "Access"). Without rollout.sidecar_urls, rank 0 starts a
# local sidecar and makes the run's secret itself.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
RDZV_HOST=${RDZV_HOST:-127.0.0.1}
RDZV_PORT=${RDZV_PORT:-29400}
RDZV_ID=${RDZV_ID:-opsd-${USER:-user}}
RDZV_TIMEOUT=${RDZV_TIMEOUT:-900}
# Rendezvous store timeouts (torchrun's defaults, 60 / 30 s): RDZV_READ_TIMEOUT bounds a wait for a key in node 0's
# store, RDZV_CLOSE_TIMEOUT the closing of the rendezvous after a failure, while node 0 answers. Neither bounds a
# store call on a dead link (a node that lost its link to node 0): its agent waits for TCP to give up, about
# 15 min at the kernel's net.ipv4.tcp_retries2=15, then exits; under slurm, srun --kill-on-bad-exit ends it as soon
# as another node's task fails (docs/scale.md, "Across hosts").
RDZV_READ_TIMEOUT=${RDZV_READ_TIMEOUT:-60}
RDZV_CLOSE_TIMEOUT=${RDZV_CLOSE_TIMEOUT:-30}
LOG_DIR=${LOG_DIR:-logs/torchrun}
LOCAL_ADDR=${LOCAL_ADDR:-$(python3 -c 'import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((socket.gethostbyname(sys.argv[1]), 9))  # a route lookup: no packet is sent
print(s.getsockname()[0])' "$RDZV_HOST" 2>/dev/null || true)}

if [ "$#" -eq 0 ]; then
    echo "usage: [NNODES=.. NODE_RANK=.. RDZV_HOST=..] $0 COMMAND [ARGS...]" >&2
    exit 2
fi

# NCCL / megatron settings (override any of them from the environment).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron: ordered TP/SP comm kernels
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -n "${NCCL_SOCKET_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME   # e.g. eth0 / ib0 when autodetection picks wrong
[ -n "${NCCL_IB_HCA:-}" ] && export NCCL_IB_HCA

if [ -n "${OPSD_SIDECAR_SECRET_FILE:-}" ] && [ "$NODE_RANK" = "0" ]; then  # only global rank 0 calls sidecars
    mode=$(stat -c %a "$OPSD_SIDECAR_SECRET_FILE" 2>/dev/null) || {
        echo "OPSD_SIDECAR_SECRET_FILE: $OPSD_SIDECAR_SECRET_FILE does not exist" >&2; exit 2; }
    if [ "${mode: -2}" != "00" ]; then
        echo "OPSD_SIDECAR_SECRET_FILE: $OPSD_SIDECAR_SECRET_FILE is readable by others (mode $mode);" \
             "chmod 600 $OPSD_SIDECAR_SECRET_FILE" >&2
        exit 2
    fi
    export OPSD_SIDECAR_SECRET_FILE
fi

is_host=0
[ "$NODE_RANK" = "0" ] && is_host=1
cmd=(torchrun
     --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE"
     --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$RDZV_ID"
     --rdzv-conf "is_host=$is_host,join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_READ_TIMEOUT,close_timeout=$RDZV_CLOSE_TIMEOUT"
     ${LOCAL_ADDR:+--local-addr "$LOCAL_ADDR"}
     --max-restarts 0 --log-dir "$LOG_DIR/node$NODE_RANK" --redirects 3 --tee 3
     --no-python "$@")

if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
mkdir -p "$LOG_DIR"
exec "${cmd[@]}"
