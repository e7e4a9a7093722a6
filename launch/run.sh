#!/usr/bin/env bash
# Train on one node: NPROC processes (default 2) through torchrun, on a free local port.
#
#   bash launch/run.sh --hook int8 --steps 200                 # 2 CPU processes, gloo
#   NPROC=4 bash launch/run.sh --hook int4 --steps 500          # 4 processes
#   MAX_RESTARTS=3 bash launch/run.sh --hook int8 --ckpt-every 50 --resume --steps 1000
#   TRAIN=path/to/other_script.py bash launch/run.sh ...        # another entry point
#
# Every argument is passed through to launch/train.py (see `bash launch/run.sh --help`); they are
# checked before torchrun starts (a bad one: one line naming it, exit code 2).
# Environment: NPROC (2), MAX_RESTARTS (0), PYTHON (python3 on PATH, or the active venv's),
# TRAIN (launch/train.py), TORCHRUN_ARGS (extra torchrun flags).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NPROC="${NPROC:-2}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
TRAIN="${TRAIN:-$HERE/train.py}"

[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: error: NPROC must be a positive integer (processes on this node), got '$NPROC'" >&2; exit 2; }
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || { echo "run.sh: error: MAX_RESTARTS must be an integer >= 0, got '$MAX_RESTARTS'" >&2; exit 2; }

# Check the arguments once, here, before torchrun starts a process per rank: a bad value gives one
# line naming the argument and what is allowed (exit 2), --help prints the options once.
if [[ "$TRAIN" == "$HERE/train.py" ]]; then
  for arg in "$@"; do
    [[ "$arg" == "-h" || "$arg" == "--help" ]] && exec "$PYTHON" "$TRAIN" --help
  done
  "$PYTHON" "$TRAIN" --check-only "$@" || exit $?
fi

# A free port from the kernel; a c10d store on localhost:0 would also pick one, but an explicit
# port keeps torchrun's log readable and works with older torchrun versions.
PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"

# Workers get a store of their own in every restart round: with torchrun's shared rendezvous store,
# restarted gloo/NCCL workers can read the dead workers' addresses and fail to connect
# (pytorch/pytorch#135712), which breaks --max-restarts.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

# shellcheck disable=SC2086
exec "$PYTHON" -m torch.distributed.run \
    --nnodes 1 \
    --nproc-per-node "$NPROC" \
    --rdzv-backend c10d \
    --rdzv-endpoint "127.0.0.1:$PORT" \
    --rdzv-id "gradcomp-$$" \
    --max-restarts "$MAX_RESTARTS" \
    ${TORCHRUN_ARGS:-} \
    "$TRAIN" "$@"
