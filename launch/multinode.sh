#!/usr/bin/env bash
# Train on several nodes: run this on every node with the same NNODES, MASTER_ADDR and MASTER_PORT.
#
#   # node 0 (its address is 10.0.0.1)                 # node 1
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 \        NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 \
#     bash launch/multinode.sh --hook int8 --steps 1000   bash launch/multinode.sh --hook int8 --steps 1000
#
#   # the emulated cluster sets NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT/NODE_ADDR itself:
#   bash launch/netsim.sh --hosts 4 --rate 1gbit -- bash launch/multinode.sh --hook int4 --steps 50
#
# torchrun's c10d rendezvous runs on MASTER_ADDR:MASTER_PORT, hosted by node 0 (NODE_RANK only
# decides that; the rendezvous numbers the ranks). Every argument is
# passed through to launch/train.py. Environment:
#   NNODES, NODE_RANK, MASTER_ADDR (required), MASTER_PORT (29500), NPROC (processes per node, 1),
#   MAX_RESTARTS (0; >0 makes the group restart after a failure, use with --resume --ckpt-every),
#   NODE_ADDR (this node's address for the other nodes to reach it; default: torchrun looks it up),
#   RDZV_ID (a job id shared by the nodes, default gradcomp), PYTHON, TRAIN, TORCHRUN_ARGS.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to this node's index, 0..NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC="${NPROC:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
RDZV_ID="${RDZV_ID:-gradcomp}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
TRAIN="${TRAIN:-$HERE/train.py}"

[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "multinode.sh: error: NPROC must be a positive integer (processes per node), got '$NPROC'" >&2; exit 2; }
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || { echo "multinode.sh: error: MAX_RESTARTS must be an integer >= 0, got '$MAX_RESTARTS'" >&2; exit 2; }

# Check the arguments before torchrun starts: one line naming a bad one (exit 2), --help once.
if [[ "$TRAIN" == "$HERE/train.py" ]]; then
  for arg in "$@"; do
    [[ "$arg" == "-h" || "$arg" == "--help" ]] && exec "$PYTHON" "$TRAIN" --help
  done
  "$PYTHON" "$TRAIN" --check-only "$@" || exit $?
fi

# Node 0 hosts the rendezvous store. Say so explicitly: guessing it from the hostname fails where
# several nodes share one (containers, network namespaces).
IS_HOST=false
[[ "$NODE_RANK" == 0 ]] && IS_HOST=true
EXTRA=()
[[ -n "${NODE_ADDR:-}" ]] && EXTRA+=(--local-addr "$NODE_ADDR")

# Workers get a store of their own in every restart round: with torchrun's shared rendezvous store,
# restarted gloo/NCCL workers can read the dead workers' addresses and fail to connect
# (pytorch/pytorch#135712), which breaks --max-restarts.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

# shellcheck disable=SC2086
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --nproc-per-node "$NPROC" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "$RDZV_ID" \
    --rdzv-conf "is_host=$IS_HOST" \
    --max-restarts "$MAX_RESTARTS" \
    "${EXTRA[@]}" \
    ${TORCHRUN_ARGS:-} \
    "$TRAIN" "$@"
