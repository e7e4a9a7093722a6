"""``gradcomp doctor``: report what this machine can run (backends, GPU, torch.compile, the emulated cluster)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List

from gradcomp.cli._common import EXIT_ENV, EXIT_OK, CliError, add_json_flag, format_table, print_json

_REQUIRABLE = ("gloo", "nccl", "mpi", "cuda", "compile", "netns", "netem", "plots")

_EPILOG = """\
examples:
  gradcomp doctor
  gradcomp doctor --check-compile --json
  gradcomp doctor --require gloo --require netns    # exit 3 unless both are there (for scripts)

exit codes: 0 the report was made and every --require is met, 3 a --require is not met.
"""


def register(subparsers) -> None:
    """Add the ``doctor`` subcommand."""
    p = subparsers.add_parser(
        "doctor",
        help="report torch, the distributed backends, GPUs, torch.compile, and whether the emulated cluster can run",
        description=textwrap.fill(
            "Report the torch version, which torch.distributed backends exist (gloo, nccl, mpi), the GPUs, "
            "the CPU count, whether torch.compile works, and whether the emulated cluster of launch/netsim.sh "
            "can run here (root, ip and tc, network namespaces, the netem qdisc for --delay).",
            90,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--check-compile", action="store_true",
                   help="compile and run a tiny kernel with torch.compile (takes 10-60 s) instead of only checking it is present")
    p.add_argument("--no-netns", action="store_true", help="skip creating a test network namespace")
    p.add_argument("--require", action="append", default=[], choices=_REQUIRABLE, metavar="WHAT",
                   help=f"exit 3 unless WHAT is available; one of {', '.join(_REQUIRABLE)}; repeatable")
    add_json_flag(p)
    p.set_defaults(func=run)


def _run(cmd: List[str], timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _netns_check(check_netem: bool) -> Dict[str, Any]:
    """Create and delete a uniquely named network namespace; try tbf and netem qdiscs inside it."""
    out: Dict[str, Any] = {"netns": False, "tbf": False, "netem": False, "detail": ""}
    name = f"gradcomp-doctor-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        r = _run(["ip", "netns", "add", name])
        if r.returncode != 0:
            out["detail"] = f"ip netns add failed: {r.stderr.strip() or r.stdout.strip()}"
            return out
        try:
            out["netns"] = True
            _run(["ip", "-n", name, "link", "set", "lo", "up"])
            r = _run(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit", "burst", "128kb", "latency", "50ms"])
            out["tbf"] = r.returncode == 0
            _run(["tc", "-n", name, "qdisc", "del", "dev", "lo", "root"])
            if check_netem:
                r = _run(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
                out["netem"] = r.returncode == 0
                if r.returncode != 0:
                    out["detail"] = f"netem qdisc unavailable (needed for netsim --delay): {r.stderr.strip()}"
        finally:
            _run(["ip", "netns", "del", name])
    except (OSError, subprocess.SubprocessError) as exc:
        out["detail"] = f"{type(exc).__name__}: {exc}"
    return out


def _compile_check() -> Dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    try:
        fn = torch.compile(lambda x: (x * 2.0 + 1.0).relu().sum(), dynamic=False)
        value = float(fn(torch.arange(8, dtype=torch.float32) - 4.0))
        ok = abs(value - 20.0) < 1e-6
        detail = f"compiled and ran a tiny kernel in {time.perf_counter() - t0:.1f} s" + ("" if ok else f" but got {value}, expected 20")
    except Exception as exc:  # any compiler failure is the answer we report
        ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return {"ok": ok, "detail": detail}


def collect(check_compile: bool = False, netns: bool = True) -> Dict[str, Any]:
    """Gather the report as a dict (the CLI prints it)."""
    import torch
    import torch.distributed as dist

    import gradcomp

    rep: Dict[str, Any] = {
        "gradcomp": getattr(gradcomp, "__version__", "?"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    avail = dist.is_available()
    rep["distributed"] = {
        "available": avail,
        "gloo": bool(avail and dist.is_gloo_available()),
        "nccl": bool(avail and dist.is_nccl_available()),
        "mpi": bool(avail and dist.is_mpi_available()),
    }
    cuda = torch.cuda.is_available()
    devices = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": prop.name, "memory_gib": round(prop.total_memory / 2**30, 1),
                            "capability": f"{prop.major}.{prop.minor}"})
    rep["cuda"] = {"available": cuda, "device_count": len(devices), "devices": devices}
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    rep["cpu"] = {"count": os.cpu_count(), "usable": usable, "torch_threads": torch.get_num_threads()}
    # find_spec instead of importing Inductor: importing it costs seconds, compiling is --check-compile's job
    comp = {"present": hasattr(torch, "compile") and importlib.util.find_spec("torch._inductor") is not None}
    if check_compile:
        comp.update(_compile_check())
    rep["compile"] = comp

    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    ip, tc = shutil.which("ip"), shutil.which("tc")
    script = Path(gradcomp.__file__).resolve().parent.parent / "launch" / "netsim.sh"
    cl: Dict[str, Any] = {"root": is_root, "ip": ip, "tc": tc, "netsim_sh": str(script) if script.is_file() else None}
    if netns and is_root and ip and tc:
        cl.update(_netns_check(check_netem=True))
    else:
        cl.update({"netns": None, "tbf": None, "netem": None,
                   "detail": "skipped" if not netns else "needs root and iproute2 (ip, tc)"})
    cl["can_run"] = bool(is_root and ip and tc and cl.get("netns") and cl.get("tbf"))
    rep["emulated_cluster"] = cl
    extras = {}
    for mod in ("matplotlib", "hypothesis", "safetensors", "tqdm", "numpy"):
        try:
            m = __import__(mod)
            extras[mod] = getattr(m, "__version__", "present")
        except ImportError:
            extras[mod] = None
    rep["packages"] = extras
    return rep


def _have(rep: Dict[str, Any], what: str) -> bool:
    if what in ("gloo", "nccl", "mpi"):
        return rep["distributed"][what]
    if what == "cuda":
        return rep["cuda"]["available"]
    if what == "compile":
        return rep["compile"].get("ok", rep["compile"]["present"])
    if what == "netns":
        return rep["emulated_cluster"]["can_run"]
    if what == "netem":
        return bool(rep["emulated_cluster"]["can_run"] and rep["emulated_cluster"].get("netem"))
    if what == "plots":
        return rep["packages"]["matplotlib"] is not None
    raise CliError(f"--require must be one of {_REQUIRABLE}, got {what!r}")


def _yn(v) -> str:
    return "yes" if v else ("no" if v is not None else "skipped")


def run(args) -> int:
    """Handle ``gradcomp doctor``."""
    if args.check_compile:
        print("checking torch.compile (compiles a tiny kernel, 10-60 s)...", file=sys.stderr)
    rep = collect(check_compile=args.check_compile, netns=not args.no_netns)
    missing = [w for w in args.require if not _have(rep, w)]
    rep["required_missing"] = missing
    if args.json:
        print_json(rep)
    else:
        cl = rep["emulated_cluster"]
        gpus = ", ".join(f"{d['name']} ({d['memory_gib']} GiB)" for d in rep["cuda"]["devices"]) or "none"
        comp = rep["compile"]
        rows = [
            {"check": "gradcomp / python", "result": f"{rep['gradcomp']} / {rep['python']}", "detail": rep["platform"]},
            {"check": "torch", "result": rep["torch"], "detail": f"built with CUDA {rep['torch_cuda']}" if rep["torch_cuda"] else "CPU build"},
            {"check": "gloo", "result": _yn(rep["distributed"]["gloo"]), "detail": "CPU collectives"},
            {"check": "nccl", "result": _yn(rep["distributed"]["nccl"]), "detail": "GPU collectives"},
            {"check": "mpi", "result": _yn(rep["distributed"]["mpi"]), "detail": ""},
            {"check": "cuda", "result": f"{rep['cuda']['device_count']} GPU(s)" if rep["cuda"]["available"] else "no", "detail": gpus},
            {"check": "cpu", "result": f"{rep['cpu']['usable']} usable of {rep['cpu']['count']}", "detail": f"torch threads {rep['cpu']['torch_threads']}"},
            {"check": "torch.compile", "result": _yn(comp.get("ok", comp["present"])),
             "detail": comp.get("detail", "present (run with --check-compile to compile a kernel)")},
            {"check": "root", "result": _yn(cl["root"]), "detail": "needed for network namespaces and tc"},
            {"check": "ip / tc", "result": _yn(cl["ip"] and cl["tc"]), "detail": f"{cl['ip'] or '-'} / {cl['tc'] or '-'}"},
            {"check": "ip netns add", "result": _yn(cl["netns"]), "detail": "created and deleted a test namespace" if cl["netns"] else cl.get("detail", "")},
            {"check": "tc tbf / netem", "result": f"{_yn(cl['tbf'])} / {_yn(cl['netem'])}", "detail": "rate limits / --delay"},
            {"check": "emulated cluster", "result": "can run" if cl["can_run"] else "cannot run",
             "detail": cl["netsim_sh"] or "launch/netsim.sh not found next to the package (use a clone of the repository)"},
            {"check": "plots extra", "result": _yn(rep["packages"]["matplotlib"]), "detail": rep["packages"]["matplotlib"] or "pip install 'gradcomp[plots]'"},
        ]
        print(format_table(rows))
        if missing:
            print(f"\nmissing: {', '.join(missing)}")
    if missing:
        if not args.json:
            print(f"gradcomp doctor: required but not available: {', '.join(missing)}", file=sys.stderr)
        return EXIT_ENV
    return EXIT_OK
