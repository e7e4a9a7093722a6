#!/usr/bin/env bash
# Build the sdist and wheel (python -m build) and check the wheel as a user gets it:
#   bash scripts/check_wheel.sh        # after scripts/setup.sh (uses .venv's python and its `build`)
# 1. the wheel holds the gradcomp package, gradcomp/py.typed and the native kernels (built for the stable
#    ABI), and no tests, benchmarks, launch scripts or pictures; the sdist holds the kernels' C++ sources;
# 2. installed (not editable) into a throwaway venv that reuses the system torch, `import gradcomp`
#    comes from that venv, its exchange runs the native kernels, and the `gradcomp` command runs.
# The throwaway venv reuses the torch that .venv imports (a .pth file puts its folder on the path) and
# the install is constrained to that exact torch version: it never downloads another torch (an
# unpinned `torch>=2.2` on a machine without torch would pull the newest CUDA build, several GB).
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
# the folder .venv's torch is imported from, its exact version, and every site-packages folder .venv
# sees (torch's own dependencies may live in the system's)
read -r torch_dir torch_version < <("$py" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)), torch.__version__)")
"$py" -m venv "$tmp/venv"  # from .venv's python: the same interpreter, so its site-packages fit
site="$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
"$py" -c "import site; print('\n'.join(site.getsitepackages()))" >"$site/local-torch.pth"
echo "torch==$torch_version" >"$tmp/torch-constraint.txt"
"$tmp/venv/bin/python" -m pip install -c "$tmp/torch-constraint.txt" "$wheel" >"$tmp/install.log" 2>&1 \
  || { cat "$tmp/install.log"; exit 1; }
echo "installed into the throwaway venv: $("$tmp/venv/bin/python" -m pip list --path "$site" --format freeze 2>/dev/null | tr '\n' ' ')"
"$tmp/venv/bin/python" - "$torch_dir" "$torch_version" <<'PY'
import os, sys, torch
want_dir, want_version = sys.argv[1], sys.argv[2]
got_dir = os.path.dirname(os.path.dirname(torch.__file__))
if (got_dir, torch.__version__) != (want_dir, want_version):
    sys.exit(f"the wheel's install brought another torch: {torch.__version__} in {got_dir}, not {want_version} in {want_dir}")
print(f"torch reused: {torch.__version__} from {got_dir}")
PY
cd "$tmp"  # away from the source tree, so `import gradcomp` must find the installed copy
"$tmp/venv/bin/python" -c "
import gradcomp, sys
assert gradcomp.__file__.startswith(sys.prefix), f'gradcomp imported from {gradcomp.__file__}, not from the venv {sys.prefix}'
from gradcomp.codec import kernels
assert kernels.backend('cpu').startswith('native'), f'the installed wheel runs {kernels.backend(\"cpu\")} kernels, not the native ones'
print('installed wheel ok:', gradcomp.__version__, gradcomp.__file__, kernels.backend('cpu'), 'kernels')"
"$tmp/venv/bin/gradcomp" --help >/dev/null
"$tmp/venv/bin/python" -m gradcomp --help >/dev/null
"$tmp/venv/bin/gradcomp" cost --params 7B --workers 8 --bandwidth 10Gbit/s --no-codec >/dev/null
echo "gradcomp command ok"
