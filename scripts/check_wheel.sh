#!/usr/bin/env bash
# Build the sdist and wheel (python -m build) and check the wheel as a user gets it:
#   bash scripts/check_wheel.sh        # after scripts/setup.sh (uses .venv's python and its `build`)
# 1. the wheel holds the gradcomp package, gradcomp/py.typed and the native kernels (built for the stable
#    ABI), and no tests, benchmarks, launch scripts or pictures; the sdist holds the kernels' C++ sources;
# 2. installed (not editable) into a throwaway venv that reuses the system torch, `import gradcomp`
#    comes from that venv, its exchange runs the native kernels, and the `gradcomp` command runs.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${GRADCOMP_VENV:-.venv}/bin/python"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$py" -m build --outdir "$tmp/dist" . >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
wheel="$(ls "$tmp"/dist/gradcomp-*.whl)"
"$py" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
bad = [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "launch", "docs", "scripts") or n.endswith((".png", ".pt"))]
outside = sorted({n.split("/")[0] for n in names} - {"gradcomp"} - {n.split("/")[0] for n in names if ".dist-info/" in n})
if bad or outside:
    sys.exit(f"wheel holds files it should not: {bad or outside}")
if "gradcomp/py.typed" not in names or "gradcomp/integrations/lightning.py" not in names:
    sys.exit("wheel lacks gradcomp/py.typed or gradcomp/integrations")
if not any(n.startswith("gradcomp/codec/kernels/_native") and n.endswith((".so", ".pyd")) for n in names):
    sys.exit("wheel lacks the native kernels (gradcomp/codec/kernels/_native*): was a C++ compiler found?")
if "-abi3-" not in sys.argv[1]:
    sys.exit(f"wheel is not tagged for Python's stable ABI: {sys.argv[1]}")
print(f"wheel ok: {sys.argv[1].rsplit('/', 1)[-1]}, {len(names)} files")
PY
"$py" - "$(ls "$tmp"/dist/gradcomp-*.tar.gz)" <<'PY'
import sys, tarfile
names = tarfile.open(sys.argv[1]).getnames()
need = ("module.cpp", "body.h", "common.h", "x86_codes.h", "isa_avx512.cpp", "isa_avx2.cpp", "isa_generic.cpp")
missing = [n for n in need if not any(x.endswith("gradcomp/codec/kernels/native/" + n) for x in names)]
if missing:
    sys.exit(f"sdist lacks the native kernels' sources: {missing}")
print("sdist ok")
PY
"${PYTHON:-python3}" -m venv --system-site-packages "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "$wheel" 2>&1 | grep -v "^WARNING: Location" || true
cd "$tmp"  # away from the source tree, so `import gradcomp` must find the installed copy
"$tmp/venv/bin/python" -c "
import gradcomp, sys
assert gradcomp.__file__.startswith(sys.prefix), f'gradcomp imported from {gradcomp.__file__}, not from the venv {sys.prefix}'
from gradcomp.codec import kernels
assert kernels.backend('cpu').startswith('native'), f'the installed wheel runs {kernels.backend(\"cpu\")} kernels, not the native ones'
print('installed wheel ok:', gradcomp.__version__, gradcomp.__file__, kernels.backend('cpu'), 'kernels')"
"$tmp/venv/bin/gradcomp" --help >/dev/null
"$tmp/venv/bin/gradcomp" cost --params 7B --workers 8 --bandwidth 10Gbit/s --no-codec >/dev/null
echo "gradcomp command ok"
