#!/usr/bin/env bash
# Create .venv (or reuse it) with torch, gradcomp (editable) and its test, plot and framework extras.
#   bash scripts/setup.sh            # then: . .venv/bin/activate
# An importable torch is reused (the venv sees system site-packages); otherwise torch==$TORCH_VERSION
# (default 2.13.0) is installed. Set GRADCOMP_VENV to use another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GRADCOMP_VENV:-.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv --system-site-packages "$venv"
fi
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "$venv/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$venv/bin/python" -m pip install -q -e ".[test,plots,integrations]"
"$venv/bin/python" -c "import torch, gradcomp; print(f'gradcomp {gradcomp.__version__} ready: torch {torch.__version__}, python in $venv')"
