"""Train the byte-level GPT on the stdlib corpus with DDP and a choice of gradient communication hook.

The model (``gradcomp.examples.tasks.TinyGPT``) and the data (the Python standard library's own source, read
from the running interpreter) are real and available offline on every machine.

Run it (always through torchrun, or through the scripts next to this file)::

    # one node, 2 processes on the CPU (gloo), int8 gradients with error feedback
    bash launch/run.sh --hook int8 --steps 200
    NPROC=4 bash launch/run.sh --hook int4 --steps 500 --out-dir runs/int4
    # the same without the script
    torchrun --standalone --nproc-per-node 2 launch/train.py --hook int8 --steps 200
    # the PyTorch baselines
    bash launch/run.sh --hook allreduce --steps 200
    bash launch/run.sh --hook fp16 --steps 200
    bash launch/run.sh --hook powersgd --powersgd-rank 4 --steps 200
    # several nodes (run on every node; node 0's address in MASTER_ADDR)
    NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/multinode.sh --hook int8 --steps 1000
    # elastic: restart the group up to 3 times after a failure, resuming from the latest checkpoint
    MAX_RESTARTS=3 bash launch/run.sh --hook int8 --steps 1000 --ckpt-every 50 --resume
    # the benchmark's presets: a 19.1M-parameter transformer whose gradient comes in several buckets,
    # and the communication-bound 17.6M-parameter one with a single big bucket
    bash launch/run.sh --model gpt20m --batch-size 2 --hook int8 --steps 100
    bash launch/run.sh --model comm17m --batch-size 4 --hook int4 --steps 100
    # FSDP2 (fully_shard per block and the root) instead of DDP: int8 gradients, int8 weights
    bash launch/run.sh --fsdp --grad-bits 8 --weight-bits 8 --steps 200
    bash launch/run.sh --fsdp --steps 200                       # FSDP2's own fp32 collectives
    bash launch/run.sh --fsdp --reduce-dtype bf16 --steps 200   # FSDP2 with bf16 gradient reduction

What it writes under ``--out-dir`` (default ``runs/<hook>``; when that holds an earlier run, the first free
``runs/<hook>-2``, ``-3``, ... unless ``--resume`` continues it or ``--overwrite`` replaces it):
    ``metrics.jsonl``   one JSON object per step from rank 0: loss, step time, wall time since the hook's
                        setup began (``elapsed_s``), bytes, lr, val_loss;
    ``summary.json``    the run's result: final losses, median step time, bytes per step, overlap trace;
    ``checkpoints/``    ``step_XXXXXXXX/`` directories (model, optimizer, scheduler, every rank's hook
                        state and data-sampler state) and a ``latest`` pointer, every ``--ckpt-every`` steps.

A checkpoint is complete before ``latest`` points at it: every file is written to a temporary name in
the same directory, fsynced and renamed, and ``latest`` is renamed into place only after all ranks
have finished theirs, so a crash at any moment leaves the previous checkpoint as the latest one.
Resuming restores the data sampler's state too, so an interrupted and resumed run takes exactly the
steps an uninterrupted one would. ``checkpoints/`` must be on a filesystem all nodes share for
multi-node resume.

Hooks:
    ``allreduce``  DDP's default fp32 all-reduce;
    ``fp16``       PyTorch's ``fp16_compress_hook``;
    ``powersgd``   PyTorch's PowerSGD (``--powersgd-rank``, ``--powersgd-start-iter``);
    ``int8``/``int4``/... gradcomp's quantized all-reduce in that wire format: any registered
                   format name (``int8``, ``int4``, ``int2``, ``fp8_e4m3``, ``fp8_e5m2``, ``mxint8``,
                   ``mxfp8``, ``mxfp4``, each also rotated: ``int2r``, ``mxfp4r``, ...;
                   ``--quant-block``, ``--no-error-feedback``, ``--warmup-steps``,
                   ``--stochastic-rounding``, ``--no-fused``, ``--policy``, ``--error-budget``);
    ``local``      no communication at all: every rank keeps its own gradient (the ranks drift
                   apart). Not training: the benchmark's floor, the step time without the network.

FSDP2 (``--fsdp``, no DDP hook): ``gradcomp.register_fsdp`` with ``--grad-bits 8|4`` (quantized
reduce-scatter) and ``--weight-bits 8`` (quantized parameter all-gather); 32 keeps FSDP2's own
collective (still counted). ``--quant-block``, ``--no-error-feedback``, ``--quantize-1d-weights``, ``--warmup-steps``,
``--min-compress-numel`` and ``--no-fused`` apply. Checkpoints hold full (unsharded) model and
optimizer state dicts and every rank's residuals; ``--resume`` works as with DDP. The default
run directory is ``runs/fsdp_g<bits>_w<bits>[_bf16]``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gradcomp.codec.formats import FORMATS, format_names
from gradcomp.examples.tasks import GPT_PRESETS, TinyGPT, evaluate, get_batch, make_optimizer, split_corpus, text_corpus
from gradcomp.files import atomic_write
from gradcomp.files import atomic_write_text as _atomic_write_text

logger = logging.getLogger("gradcomp.launch.train")

HOOKS = ("allreduce", "fp16", "powersgd", *format_names(), "local")  # every registered wire format is a gradcomp hook


# --------------------------------------------------------------------------------------------
# arguments


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line: what is wrong and what is allowed, exit code 2."""

    def error(self, message: str):
        """Print ``train.py: error: MESSAGE`` and exit with code 2 (argparse would print the usage first)."""
        self.exit(2, f"train.py: error: {message} (see python launch/train.py --help)\n")


def _fsdp_width(text: str):
    """``--grad-bits`` / ``--weight-bits``: 32 (FSDP2's own), the bits of an int format, or a format name."""
    if text.strip().isdigit():
        bits = int(text)
        if bits == 32 or f"int{bits}" in FORMATS:
            return bits
        raise argparse.ArgumentTypeError(f"expected 32, 8, 4, 2 or a format name from {format_names()}, got {text!r}")
    if text not in FORMATS:
        raise argparse.ArgumentTypeError(f"expected 32, 8, 4, 2 or a format name from {format_names()}, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the training job."""
    p = _Parser(prog="train.py", description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("task")
    g.add_argument("--model", choices=sorted(GPT_PRESETS), default="small", help="TinyGPT preset")
    g.add_argument("--steps", type=int, default=200, help="total optimizer steps")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per rank per step")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warm-up then cosine to 10%%)")
    g.add_argument("--lr-warmup", type=int, default=20, help="linear learning-rate warm-up steps")
    g.add_argument("--schedule-steps", type=int, default=None,
                   help="length of the learning-rate schedule (default --steps); later steps keep its final rate")
    g.add_argument("--target-val-loss", type=float, default=None,
                   help="stop after the first evaluation at or below this validation loss (every rank stops there)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="model init and data seed (the data stream differs per rank)")
    g.add_argument("--corpus-bytes", type=int, default=4 << 20, help="stdlib corpus size in bytes")

    g = p.add_argument_group("communication hook")
    g.add_argument("--hook", choices=HOOKS, default="allreduce")
    g.add_argument("--quant-block", type=int, default=256, help="int8/int4: elements per fp32 scale")
    g.add_argument("--no-error-feedback", action="store_true", help="int8/int4: disable error feedback")
    g.add_argument("--warmup-steps", type=int, default=10, help="int8/int4: plain all-reduce steps first")
    g.add_argument("--min-compress-numel", type=int, default=16384, help="int8/int4: smaller buckets go uncompressed")
    g.add_argument("--stochastic-rounding", action="store_true", help="int8/int4: stochastic instead of nearest rounding")
    g.add_argument("--no-fused", "--no-compile", dest="no_fused", action="store_true",
                   help="int8/int4: run the eager reference kernels (default: the fused ones, native on CPU)")
    g.add_argument(
        "--hierarchical", action="store_true",
        help="int8/int4: fp32 inside a node, quantized between nodes (node layout from torchrun's LOCAL_WORLD_SIZE)",
    )
    g.add_argument("--policy", action="store_true", help="int8/int4: choose plain/int8/int4 per bucket from the probed network")
    g.add_argument("--policy-min-bits", type=int, choices=(2, 4, 8, 32), default=4, help="--policy: never quantize below this")
    g.add_argument("--policy-candidates", default="32,8,4",
                   help="--policy: widths or format names to choose from (32 = plain fp32 all-reduce), e.g. 32,int8,int4r,int2r")
    g.add_argument("--error-budget", type=float, default=None,
                   help="--policy: only formats whose relative error on the bucket's own gradient is at most this (e.g. 0.2)")
    g.add_argument("--measure-every", type=int, default=100, help="--error-budget: steps between two measurements (0: once)")
    g.add_argument("--policy-fit", default=None, metavar="JSON",
                   help="--policy: decide from these network figures instead of probing (a run's summary.json or a NetworkFit)")
    g.add_argument("--powersgd-rank", type=int, default=4, help="powersgd: matrix approximation rank")
    g.add_argument("--powersgd-start-iter", type=int, default=10, help="powersgd: plain all-reduce steps first (>= 2)")
    g.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP bucket size in MB (default: DDP's own, 25 MB with a 1 MB first bucket)")

    g = p.add_argument_group("FSDP2 (instead of DDP)")
    g.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard per block and the root) instead of DDP")
    g.add_argument("--grad-bits", type=_fsdp_width, default=32,
                   help="--fsdp: gradient reduce-scatter format, 8/4/2 or a format name such as mxfp8 or int4r (32: FSDP2's own)")
    g.add_argument("--weight-bits", type=_fsdp_width, default=32,
                   help="--fsdp: parameter all-gather format, 8 or an 8-bit format name such as fp8_e4m3 (32: FSDP2's own)")
    g.add_argument("--reduce-dtype", choices=("fp32", "bf16"), default="fp32", help="--fsdp: MixedPrecisionPolicy reduce_dtype")
    g.add_argument("--quantize-1d-weights", action="store_true",
                   help="--fsdp --weight-bits 8: quantize 1-D parameters (norms, biases) too (default: sent unquantized)")

    g = p.add_argument_group("system")
    g.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto: nccl with CUDA, else gloo")
    g.add_argument("--threads", type=int, default=1, help="torch.set_num_threads per rank")
    g.add_argument("--dist-timeout", type=float, default=300.0, help="seconds before a stuck collective fails")

    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default=None,
                   help="run directory (default runs/<hook>; when that holds an earlier run, the first free runs/<hook>-2, -3, ...)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run in the run directory (its metrics, summary and checkpoints) instead of "
                        "starting a new numbered one")
    g.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps (rank 0)")
    g.add_argument("--eval-every", type=int, default=0, help="validation loss every N steps (0: only at the end)")
    g.add_argument("--eval-batches", type=int, default=8, help="validation batches of --batch-size*2 windows")
    g.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    g.add_argument("--keep-ckpts", type=int, default=2, help="keep the latest N checkpoints")
    g.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --out-dir if there is one")
    g.add_argument("--netdev", default="auto", help="network interface whose counters give wire bytes ('auto', a name, or 'none')")
    g.add_argument("--time-after", type=int, default=None, help="steps excluded from the timing summary (default: hook warm-up + 3)")
    g.add_argument("--trace-overlap", action="store_true", help="time the hook calls against the backward pass")
    g.add_argument("--check-only", action="store_true",
                   help="check the arguments and exit (0: valid; 2: one line naming the bad argument) without training; "
                        "launch/run.sh and multinode.sh run this before starting torchrun")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject inconsistent arguments with a message that says what was expected."""
    positive = {"steps": args.steps, "batch_size": args.batch_size, "threads": args.threads, "keep_ckpts": args.keep_ckpts}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("ckpt_every", "eval_every", "log_every", "warmup_steps", "lr_warmup"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.schedule_steps is not None and args.schedule_steps < 1:
        raise ValueError(f"--schedule-steps must be >= 1, got {args.schedule_steps}")
    if args.target_val_loss is not None and not (math.isfinite(args.target_val_loss) and args.target_val_loss > 0):
        raise ValueError(f"--target-val-loss must be a positive finite loss, got {args.target_val_loss}")
    if args.overwrite and args.resume:
        raise ValueError("--overwrite and --resume contradict each other: --resume continues the run in the run directory, "
                         "--overwrite replaces it; give at most one")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if not math.isfinite(args.dist_timeout) or args.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    if args.hook == "powersgd" and args.powersgd_start_iter < 2:
        raise ValueError(f"--powersgd-start-iter must be >= 2 (PyTorch's PowerSGD needs it with error feedback), got {args.powersgd_start_iter}")
    if args.fsdp and args.hook != "allreduce":
        raise ValueError(f"--fsdp replaces DDP and its hooks; use --grad-bits/--weight-bits instead of --hook {args.hook}")
    if not args.fsdp and (args.grad_bits != 32 or args.weight_bits != 32 or args.reduce_dtype != "fp32"):
        raise ValueError("--grad-bits, --weight-bits and --reduce-dtype need --fsdp (with DDP use --hook int8/int4)")
    if args.backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("--backend nccl needs CUDA, which is not available here; use gloo or auto")
    if not args.policy and (args.error_budget is not None or args.policy_fit is not None):
        raise ValueError("--error-budget and --policy-fit need --policy (they narrow or inform the policy's choice)")
    if args.weight_bits != 32:
        from gradcomp.comm.fsdp import WEIGHT_FORMATS  # the 8-bit formats

        if (f"int{args.weight_bits}" if isinstance(args.weight_bits, int) else args.weight_bits) not in WEIGHT_FORMATS:
            raise ValueError(f"--weight-bits must be 32 or an 8-bit format ({', '.join(WEIGHT_FORMATS)}), got {args.weight_bits}")


# --------------------------------------------------------------------------------------------
# files


def load_checkpoint_file(path: Path) -> Any:
    """Load a checkpoint file of this script with ``weights_only=True``: tensors and plain values, never code.

    Raises:
        ValueError: naming the file when it holds anything else (for instance a crafted pickle).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for a crafted file; others for a torn one
        raise ValueError(
            f"checkpoint {path} could not be loaded as data (torch.load with weights_only=True): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Save ``obj`` so that ``path`` holds either the old file or the complete new one, never a torn one.

    ``gradcomp.files.atomic_write``: a temporary file in the same directory, fsynced, given the
    umask's mode (mkstemp's 0600 would leave results readable by their owner only), renamed over
    ``path``, and the directory fsynced so the rename is durable too.
    """
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file atomically (temporary file, fsync, the umask's mode, rename)."""
    _atomic_write_text(path, text)


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """Return the directory ``checkpoints/latest`` points at, or None when there is no checkpoint."""
    pointer = ckpt_root / "latest"
    if not pointer.exists():
        return None
    target = ckpt_root / pointer.read_text().strip()
    if not (target / "train.pt").exists():
        raise FileNotFoundError(f"{pointer} points at {target}, which holds no train.pt; the checkpoint directory was modified by hand")
    return target


# --------------------------------------------------------------------------------------------
# hooks


class PayloadCounter:
    """Bytes a baseline hook sends per rank and step, counted the way gradcomp's ``stats()`` counts them.

    A ring all-reduce of ``n`` bytes sends ``2 (P - 1) / P * n`` bytes from every rank; for PowerSGD,
    ``n`` is the size of the low-rank factors plus the tensors it leaves uncompressed.
    ``buckets_step`` counts the buckets DDP handed to the hook in the last step, as gradcomp's does.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.acc = 0
        self.acc_fp32 = 0
        self.acc_buckets = 0
        self.bytes_sent_step = 0
        self.fp32_bytes_step = 0
        self.buckets_step = 0

    def add(self, payload_bytes: int, fp32_bytes: int, last: bool) -> None:
        ring = 2 * (self.world_size - 1) / self.world_size
        self.acc += int(payload_bytes * ring)
        self.acc_fp32 += int(fp32_bytes * ring)
        self.acc_buckets += 1
        if last:
            self.bytes_sent_step, self.fp32_bytes_step, self.buckets_step = self.acc, self.acc_fp32, self.acc_buckets
            self.acc = self.acc_fp32 = self.acc_buckets = 0

    def stats(self) -> Dict[str, Any]:
        ratio = self.fp32_bytes_step / self.bytes_sent_step if self.bytes_sent_step else float("nan")
        return {
            "bytes_sent_step": self.bytes_sent_step, "fp32_bytes_step": self.fp32_bytes_step,
            "compression_ratio": ratio, "buckets_step": self.buckets_step,
        }


class HookSetup:
    """The registered hook of a run: its state (for checkpoints) and a ``stats()`` for bytes per step."""

    def __init__(self, name: str, state: Any, stats: Callable[[], Dict[str, Any]]):
        self.name = name
        self.state = state
        self.stats = stats

    def state_dict(self) -> Any:
        """Return this rank's hook state for a checkpoint (None for stateless hooks)."""
        if self.name in FORMATS or self.name == "fsdp":
            return self.state.state_dict()
        if self.name == "powersgd":
            sd = dict(self.state.__getstate__())
            # the numpy generator as plain values, so the checkpoint loads with weights_only=True
            kind, keys, pos, has_gauss, cached = sd.pop("rng").get_state()
            sd["rng_state"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
            return sd
        return None

    def load_state_dict(self, sd: Any) -> None:
        """Restore what ``state_dict`` returned on this rank."""
        if self.name in FORMATS or self.name == "fsdp":
            self.state.load_state_dict(sd)
        elif self.name == "powersgd":
            import numpy as np

            sd = dict(sd)
            kind, keys, pos, has_gauss, cached = sd.pop("rng_state")
            rng = np.random.RandomState()
            rng.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            sd["rng"] = rng
            group = self.state.process_group
            self.state.__setstate__(sd)
            self.state.process_group = group

    def close(self) -> None:
        """Finish the hook's work in flight and join its threads (before the process groups go)."""
        close = getattr(self.state, "close", None)
        if close is not None:
            close()


class OverlapTracer:
    """Timestamps of one backward pass: when DDP hands each bucket to the hook, when it is done, the end.

    DDP calls the hook for a bucket as soon as all its gradients are computed, so the call of the
    last bucket marks the end of the gradient computation. Communication of earlier buckets that
    finishes before that point overlapped the backward pass; what runs after it is exposed. A hook
    whose call itself lasts long (``call_blocked_ms``) blocks the autograd thread and serialises
    computation and communication.
    """

    def __init__(self):
        self.steps: List[Dict[str, Any]] = []
        self.current: Optional[Dict[str, Any]] = None

    def begin(self) -> None:
        self.current = {"t0": time.perf_counter(), "buckets": []}

    def wrap(self, hook: Callable) -> Callable:
        tracer = self

        # no annotations: DDP checks them as objects and this module uses postponed annotations
        def traced(state, bucket):
            cur = tracer.current
            t_call = time.perf_counter()
            fut = hook(state, bucket)
            t_ret = time.perf_counter()
            rec = {"index": bucket.index(), "numel": bucket.buffer().numel(), "call": t_call, "returned": t_ret, "done": None}
            if cur is not None:
                cur["buckets"].append(rec)

            def finish(f):
                rec["done"] = time.perf_counter()
                return f.value()

            return fut.then(finish)

        return traced

    def end(self) -> None:
        cur, self.current = self.current, None
        if cur is None:
            return
        t_end = time.perf_counter()
        t0 = cur["t0"]
        buckets = cur["buckets"]
        compute_end = max([b["call"] for b in buckets], default=t0)
        comm = sum((b["done"] or t_end) - b["call"] for b in buckets)
        overlapped = sum(max(0.0, min(b["done"] or t_end, compute_end) - b["call"]) for b in buckets)
        self.steps.append(
            {
                "backward_s": t_end - t0,
                "compute_s": compute_end - t0,
                "exposed_comm_s": max(0.0, t_end - compute_end),
                "hook_call_s": sum(b["returned"] - b["call"] for b in buckets),
                "comm_s": comm,
                "overlapped_comm_s": overlapped,
                "buckets": [
                    {
                        "index": b["index"],
                        "numel": b["numel"],
                        "call_ms": 1e3 * (b["call"] - t0),
                        "call_blocked_ms": 1e3 * (b["returned"] - b["call"]),
                        "done_ms": 1e3 * ((b["done"] or t_end) - t0),
                    }
                    for b in buckets
                ],
            }
        )

    def summary(self) -> Dict[str, Any]:
        """Median timings over the traced steps, and the per-bucket timeline of the last one."""
        if not self.steps:
            return {}
        keys = ("backward_s", "compute_s", "exposed_comm_s", "hook_call_s", "comm_s", "overlapped_comm_s")
        out: Dict[str, Any] = {k: statistics.median(s[k] for s in self.steps) for k in keys}
        out["traced_steps"] = len(self.steps)
        out["overlap_fraction"] = out["overlapped_comm_s"] / out["comm_s"] if out["comm_s"] > 0 else float("nan")
        out["last_step_buckets"] = self.steps[-1]["buckets"]
        return out


def setup_hook(args: argparse.Namespace, ddp: DDP, world_size: int, tracer: Optional[OverlapTracer]) -> HookSetup:
    """Register the hook named by ``args.hook`` on ``ddp`` and return its ``HookSetup``."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    wrap = tracer.wrap if tracer is not None else (lambda h: h)
    if args.hook in FORMATS:
        import gradcomp
        from gradcomp.comm import PolicyConfig, Topology

        topology = Topology.from_env(os.environ) if args.hierarchical else None
        policy = None
        if args.policy:
            candidates = tuple(int(c) if c.strip().isdigit() else c.strip() for c in args.policy_candidates.split(","))
            fit = None
            if args.policy_fit is not None:
                from gradcomp.comm import NetworkFit

                try:
                    saved = json.loads(Path(args.policy_fit).read_text())
                    fit = NetworkFit.from_dict(saved.get("policy_fit", saved))  # a run's summary.json, or the fit itself
                except (OSError, ValueError, TypeError, KeyError) as exc:
                    raise SystemExit(f"--policy-fit {args.policy_fit}: expected a NetworkFit as JSON (or a summary.json "
                                     f"holding policy_fit): {exc}") from None
            try:
                policy = PolicyConfig(candidates=candidates, min_bits=args.policy_min_bits, error_budget=args.error_budget,
                                      measure_every=args.measure_every, fit=fit)
            except ValueError as exc:
                raise SystemExit(f"--policy-candidates / --error-budget: {exc}") from None
        state = gradcomp.QuantizedAllReduceState(
            None,
            format=args.hook,
            block_size=args.quant_block,
            error_feedback=not args.no_error_feedback,
            warmup_steps=args.warmup_steps,
            min_compress_numel=args.min_compress_numel,
            stochastic_rounding=args.stochastic_rounding,
            seed=args.seed,
            fused=not args.no_fused,
            log_every=0,
            topology=topology,
            policy=policy,
            timeout=args.dist_timeout,
        )
        # what gradcomp.register() does, done by hand so the hook can be wrapped for tracing:
        # residuals keyed by parameter index follow their parameters across bucket rebuilds and resumes
        state.track_parameters(ddp.module)
        ddp.register_comm_hook(state, wrap(gradcomp.quantized_allreduce_hook))
        return HookSetup(args.hook, state, state.stats)

    counter = PayloadCounter(world_size)
    if args.hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=args.powersgd_rank,
            start_powerSGD_iter=args.powersgd_start_iter,
            random_seed=args.seed,
        )

        def counted(st, bucket):
            before = st.total_numel_after_compression
            fut = powerSGD_hook.powerSGD_hook(st, bucket)
            after = st.total_numel_after_compression
            n = bucket.buffer().numel()
            # PowerSGD only counts once it compresses; before that it all-reduces the whole bucket
            payload = (after - before) if after != before else n
            counter.add(4 * payload, 4 * n, bucket.is_last())
            return fut

        ddp.register_comm_hook(state, wrap(counted))
        return HookSetup("powersgd", state, counter.stats)

    if args.hook == "local":

        def local(st, bucket):
            # the step without communication: the bucket goes back as it is
            counter.add(0, 4 * bucket.buffer().numel(), bucket.is_last())
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, wrap(local))
        return HookSetup("local", None, counter.stats)

    base = default_hooks.fp16_compress_hook if args.hook == "fp16" else default_hooks.allreduce_hook
    elem = 2 if args.hook == "fp16" else 4

    def counted_default(st, bucket):
        n = bucket.buffer().numel()
        counter.add(elem * n, 4 * n, bucket.is_last())
        return base(st, bucket)

    ddp.register_comm_hook(None, wrap(counted_default))
    return HookSetup(args.hook, None, counter.stats)


def _policy_view(hook: "HookSetup", what: str) -> Any:
    """A gradcomp policy's network figures (``fit``) or error-budget verdicts (``budget``), as plain data; None without."""
    state = getattr(hook, "state", None)
    policy = getattr(state, "policy", None)
    if policy is None:
        return None
    return policy.fit.to_dict() if what == "fit" else state.budget


def run_label(args: argparse.Namespace) -> str:
    """Name of the run's communication: the hook, or ``fsdp_g<bits>_w<bits>[_bf16]`` with ``--fsdp``."""
    if not args.fsdp:
        return args.hook
    return f"fsdp_g{args.grad_bits}_w{args.weight_bits}" + ("_bf16" if args.reduce_dtype == "bf16" else "")


def shard_fsdp(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Apply FSDP2's ``fully_shard`` to every transformer block, then to the root; return the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16 if args.reduce_dtype == "bf16" else None)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def setup_fsdp_comm(args: argparse.Namespace, model: torch.nn.Module) -> HookSetup:
    """Install gradcomp's FSDP2 collectives (FSDP2's own ones, counted, for width 32) and return a ``HookSetup``."""
    import gradcomp

    state = gradcomp.register_fsdp(
        model,
        grad_bits=None if args.grad_bits == 32 else args.grad_bits,
        weight_bits=None if args.weight_bits == 32 else args.weight_bits,
        block_size=args.quant_block,
        error_feedback=not args.no_error_feedback,
        exact_1d_weights=not args.quantize_1d_weights,
        warmup_steps=args.warmup_steps,
        min_compress_numel=args.min_compress_numel,
        fused=not args.no_fused,
    )

    def stats() -> Dict[str, Any]:
        s = state.stats()
        sent = s["grad_bytes_step"] + s["weight_bytes_step"]
        fp32 = s["grad_fp32_bytes_step"] + s["weight_fp32_bytes_step"]
        return {**s, "bytes_sent_step": sent, "fp32_bytes_step": fp32, "compression_ratio": fp32 / sent if sent else float("nan")}

    return HookSetup("fsdp", state, stats)


# --------------------------------------------------------------------------------------------
# wire counters


def resolve_netdev(name: str) -> Optional[str]:
    """Return the interface to read byte counters from: the given one, the only non-loopback one, or None."""
    if name == "none":
        return None
    root = Path("/sys/class/net")
    if name != "auto":
        if not (root / name / "statistics" / "tx_bytes").exists():
            raise ValueError(f"--netdev {name}: no such interface (have {sorted(p.name for p in root.iterdir()) if root.exists() else []})")
        return name
    if not root.exists():
        return None
    devs = [p.name for p in root.iterdir() if p.name != "lo" and (p / "statistics" / "tx_bytes").exists()]
    return devs[0] if len(devs) == 1 else None


def read_netdev(dev: Optional[str]) -> Optional[Dict[str, int]]:
    """Return the tx/rx byte counters of ``dev`` (None when there is no device)."""
    if dev is None:
        return None
    base = Path("/sys/class/net") / dev / "statistics"
    return {k: int((base / k).read_text()) for k in ("tx_bytes", "rx_bytes")}


# --------------------------------------------------------------------------------------------
# the job


def _holds_run(folder: Path) -> bool:
    """Whether ``folder`` exists and is not an empty directory (an earlier run, or anything else put there)."""
    if not folder.exists():
        return False
    return not folder.is_dir() or any(folder.iterdir())


def choose_out_dir(args: argparse.Namespace, label: str, root: Path = Path("runs")) -> Tuple[Path, str]:
    """Pick and claim the run directory on one rank; return it and a line for the log ('' when nothing to say).

    ``--out-dir`` is used as given (a warning says when an earlier run there is replaced). By default
    the directory is ``runs/<label>``, unless it already holds an earlier run: then ``--resume``
    continues it and ``--overwrite`` replaces it, and otherwise the first free ``runs/<label>-N``
    (N = 2, 3, ...) is created, so no result is ever overwritten without being asked to. A numbered
    directory is claimed with an exclusive ``mkdir``, so two runs started together never share one.
    """
    if args.out_dir:
        out = Path(args.out_dir)
        if not args.resume and not args.overwrite and ((out / "summary.json").exists() or (out / "metrics.jsonl").exists()):
            return out, (f"--out-dir {out} holds an earlier run: its metrics.jsonl and summary.json are replaced "
                         "(--resume continues it instead)")
        return out, ""
    base = root / label
    if args.resume or args.overwrite or not _holds_run(base):
        return base, ""
    for n in range(2, 100000):
        candidate = root / f"{label}-{n}"
        try:
            candidate.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        return candidate, f"{base} holds an earlier run, so this one goes to {candidate} (--overwrite replaces {base} instead)"
    raise FileExistsError(f"no free run directory {root}/{label}-N; pass --out-dir")  # pragma: no cover


class Job:
    """One rank of a training run: model, optimizer, hook, data stream, checkpoints and metrics."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{self.local_rank}") if dist.get_backend() == "nccl" else torch.device("cpu")
        self.label = run_label(args)
        self.out_dir = self._agree_out_dir()
        self.ckpt_root = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.cfg = GPT_PRESETS[args.model]

        data = text_corpus(max_bytes=args.corpus_bytes)
        self.train_data, self.val_data = split_corpus(data)
        torch.manual_seed(args.seed)
        model = TinyGPT.from_config(self.cfg).to(self.device)
        self.n_params = model.num_parameters()
        if args.fsdp:
            self._init_fsdp(model)
            return
        bucket_cap_mb = args.bucket_cap_mb
        model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        if args.hook == "powersgd" and dist.get_backend() == "gloo" and (bucket_cap_mb is None or bucket_cap_mb < model_mb + 1):
            # PowerSGD's callback blocks a gloo worker thread on a nested all-reduce; gloo has two,
            # so two buckets in flight deadlock the step. One bucket cannot (DDP's default has a
            # small first bucket, so it is replaced too).
            bucket_cap_mb = math.ceil(model_mb + 1)
            if self.rank == 0:
                logger.warning(
                    "powersgd on gloo: bucket cap raised from %s to %d MB (one bucket) because PyTorch's "
                    "PowerSGD deadlocks gloo with two or more buckets in flight",
                    "DDP's default" if args.bucket_cap_mb is None else f"{args.bucket_cap_mb:g} MB", bucket_cap_mb,
                )
        self.ddp = DDP(model, device_ids=[self.device] if self.device.type == "cuda" else None, bucket_cap_mb=bucket_cap_mb)
        self.opt = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
        steps, warm = args.schedule_steps or args.steps, max(1, args.lr_warmup)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        )
        self.gen = torch.Generator().manual_seed(args.seed * 1_000_003 + self.rank)
        self.tracer = OverlapTracer() if args.trace_overlap else None
        # the run's wall time counts from here: the hook's registration and whatever it starts
        self.hook_t0 = time.perf_counter()
        self.hook = setup_hook(args, self.ddp, self.world_size, self.tracer)
        self.hook_setup_s = time.perf_counter() - self.hook_t0
        self.netdev = resolve_netdev(args.netdev)
        self.start_step = 0
        self.resumed_from: Optional[str] = None

    def _init_fsdp(self, model: torch.nn.Module) -> None:
        """The ``--fsdp`` version of the rest of ``__init__``: shard, optimizer, schedule, collectives."""
        args = self.args
        # self.ddp is the FSDP root here: called like the DDP wrapper, and itself the module
        self.ddp = shard_fsdp(args, model, self.device)
        self.opt = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
        steps, warm = args.steps, max(1, args.lr_warmup)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        )
        self.gen = torch.Generator().manual_seed(args.seed * 1_000_003 + self.rank)
        self.tracer = None
        self.hook_t0 = time.perf_counter()
        self.hook = setup_fsdp_comm(args, self.ddp)
        self.hook_setup_s = time.perf_counter() - self.hook_t0
        self.netdev = resolve_netdev(args.netdev)
        self.start_step = 0
        self.resumed_from = None

    def _agree_out_dir(self) -> Path:
        """Rank 0 picks (and claims) the run directory; every rank gets its choice."""
        choice: List[Any] = [None, ""]
        if self.rank == 0:
            out, note = choose_out_dir(self.args, self.label)
            if self.args.overwrite:
                # only what this script writes there: the earlier run's results and checkpoints
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                for name in ("summary.json", "metrics.jsonl"):
                    (out / name).unlink(missing_ok=True)
            choice = [str(out), note]
        dist.broadcast_object_list(choice, src=0)
        if self.rank == 0 and choice[1]:
            logger.warning("%s", choice[1])
        return Path(choice[0])

    @property
    def module(self) -> torch.nn.Module:
        """The model itself (under DDP, the wrapped module; under FSDP2, the sharded root)."""
        return self.ddp if self.args.fsdp else self.ddp.module

    def _full_state(self) -> tuple:
        """Return the full model and optimizer state dicts (with ``--fsdp`` a collective; rank 0 gets them)."""
        if not self.args.fsdp:
            return self.ddp.module.state_dict(), self.opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.ddp, options=opts), get_optimizer_state_dict(self.ddp, self.opt, options=opts)

    def _load_full_state(self, model_sd: Dict[str, Any], optim_sd: Dict[str, Any]) -> None:
        """Load what ``_full_state`` returned (with ``--fsdp`` every rank loads it and keeps its shards)."""
        if not self.args.fsdp:
            self.ddp.module.load_state_dict(model_sd)
            self.opt.load_state_dict(optim_sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.ddp, model_sd, options=opts)
        set_optimizer_state_dict(self.ddp, self.opt, optim_sd, options=opts)

    # ---- checkpoints

    def save_checkpoint(self, step: int) -> None:
        """Write checkpoint ``step`` from every rank, then point ``latest`` at it and prune old ones."""
        name = f"step_{step:08d}"
        folder = self.ckpt_root / name
        hook_sd = self.hook.state_dict()  # waits for the hook's pending work first
        model_sd, optim_sd = self._full_state()
        if self.rank == 0:
            atomic_torch_save(
                {
                    "step": step,
                    "world_size": self.world_size,
                    "hook": self.label,
                    "model_preset": self.args.model,
                    "model": model_sd,
                    "optimizer": optim_sd,
                    "scheduler": self.sched.state_dict(),
                },
                folder / "train.pt",
            )
        atomic_torch_save(
            {"step": step, "rank": self.rank, "hook_state": hook_sd, "data_rng": self.gen.get_state(), "torch_rng": torch.get_rng_state()},
            folder / f"rank{self.rank}.pt",
        )
        dist.barrier()  # every rank's file is durable before the checkpoint becomes the latest
        if self.rank == 0:
            atomic_write_text(self.ckpt_root / "latest", name + "\n")
            old = sorted(p for p in self.ckpt_root.glob("step_*") if p.is_dir() and p.name != name)
            for p in old[: max(0, len(old) - (self.args.keep_ckpts - 1))]:
                shutil.rmtree(p, ignore_errors=True)
            logger.info("checkpoint %s written", folder)
        dist.barrier()  # nobody reads a directory that rank 0 is pruning

    def _prime_buckets(self) -> None:
        """Run one forward/backward of zeros so DDP rebuilds its buckets before the first real step.

        DDP starts with buckets in parameter order and rebuilds them in gradient-ready order after
        its first iteration. PyTorch's PowerSGD keys its error-feedback memory and factors by bucket
        index in the rebuilt layout, so without this the first step after a resume applies them to
        the wrong elements and the run drifts from the uninterrupted one (measured: the loss differs
        from the second resumed step on). gradcomp's hook relocates its residuals by parameter itself
        and does not need it. The zero loss changes no parameter and no random stream.
        """
        x = torch.zeros(1, self.cfg.block_size, dtype=torch.long, device=self.device)
        _, loss = self.ddp(x, x)
        (loss * 0.0).backward()
        self.opt.zero_grad(set_to_none=True)

    def maybe_resume(self) -> None:
        """Load the latest checkpoint of ``--out-dir`` when ``--resume`` is given and one exists."""
        if not self.args.resume:
            return
        folder = latest_checkpoint(self.ckpt_root)
        if folder is None:
            if self.rank == 0:
                logger.info("--resume: no checkpoint in %s yet, starting from step 0", self.ckpt_root)
            return
        # weights_only: a checkpoint file is data, never code (a crafted pickle is refused here)
        train = load_checkpoint_file(folder / "train.pt")
        if train["world_size"] != self.world_size or train["hook"] != self.label or train["model_preset"] != self.args.model:
            raise ValueError(
                f"checkpoint {folder} is for {train['world_size']} ranks, hook {train['hook']}, model {train['model_preset']}; "
                f"this run has {self.world_size} ranks, hook {self.label}, model {self.args.model}"
            )
        mine = load_checkpoint_file(folder / f"rank{self.rank}.pt")
        if self.args.hook == "powersgd":
            self._prime_buckets()
        self._load_full_state(train["model"], train["optimizer"])
        self.sched.load_state_dict(train["scheduler"])
        self.hook.load_state_dict(mine["hook_state"])
        self.gen.set_state(mine["data_rng"])
        torch.set_rng_state(mine["torch_rng"])
        self.start_step = int(train["step"])
        self.resumed_from = folder.name
        if self.rank == 0:
            logger.info("resumed from %s (step %d)", folder, self.start_step)

    # ---- metrics

    def _prepare_metrics(self) -> None:
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.start_step == 0:
            self.metrics_path.write_text("")
            return
        # drop the records of steps after the checkpoint: they are about to be taken again
        kept = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= self.start_step:
                    kept.append(line)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in kept))

    # ---- training

    def run(self) -> Dict[str, Any]:
        """Train to ``--steps``; return the summary that rank 0 also writes to ``summary.json``."""
        args = self.args
        self.maybe_resume()
        self._prepare_metrics()
        time_after = args.time_after
        if time_after is None:
            warm = args.warmup_steps if args.hook in FORMATS else {"powersgd": args.powersgd_start_iter}.get(args.hook, 0)
            if args.fsdp and (args.grad_bits != 32 or args.weight_bits != 32):
                warm = args.warmup_steps
            time_after = warm + 3
        # short runs: time at least the last step
        first_timed = max(self.start_step, min(time_after, args.steps - 1))
        if self.rank == 0:
            logger.info(
                "TinyGPT '%s' (%.2fM parameters) on %d rank(s), backend %s, hook %s, %d steps of %d x %d bytes per rank",
                args.model, self.n_params / 1e6, self.world_size, dist.get_backend(), self.label,
                args.steps, args.batch_size, self.cfg.block_size,
            )
            if args.hook in FORMATS:
                logger.info(
                    "gradients travel as %s (blocks of %d values, error feedback %s); "
                    "the first %d steps use plain fp32 all-reduce while DDP settles its buckets",
                    FORMATS[args.hook].describe(), args.quant_block, "off" if args.no_error_feedback else "on", args.warmup_steps,
                )
        step_times: List[float] = []
        sent_hook: List[int] = []
        wire_start = wire_end = None
        recent: List[float] = []
        val_loss = float("nan")
        stopped_at: Optional[int] = None
        t_run = time.perf_counter()
        metrics = open(self.metrics_path, "a") if self.rank == 0 else None
        try:
            for step in range(self.start_step, args.steps):
                if step == first_timed:
                    wire_start = read_netdev(self.netdev)
                t0 = time.perf_counter()
                x, y = get_batch(self.train_data, args.batch_size, self.cfg.block_size, self.gen)
                x, y = x.to(self.device), y.to(self.device)
                _, loss = self.ddp(x, y)
                self.opt.zero_grad(set_to_none=True)
                if self.tracer is not None and step >= first_timed:
                    self.tracer.begin()
                loss.backward()
                if self.tracer is not None:
                    self.tracer.end()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.ddp.parameters(), args.grad_clip)
                self.opt.step()
                lr = self.sched.get_last_lr()[0]
                self.sched.step()
                loss_value = loss.item()  # also waits for the device
                dt = time.perf_counter() - t0
                stats = self.hook.stats()
                done = step + 1
                if step >= first_timed:
                    step_times.append(dt)
                    sent_hook.append(int(stats["bytes_sent_step"]))
                    wire_end = read_netdev(self.netdev)
                recent = (recent + [loss_value])[-20:]
                rec: Dict[str, Any] = {
                    "step": done,
                    "loss": loss_value,
                    "lr": lr,
                    "step_time_s": dt,
                    "elapsed_s": time.perf_counter() - self.hook_t0,
                    "bytes_sent_step": int(stats["bytes_sent_step"]),
                    "fp32_bytes_step": int(stats["fp32_bytes_step"]),
                }
                if self.netdev is not None:
                    rec["wire_tx_bytes"] = read_netdev(self.netdev)["tx_bytes"]
                evaluated = (args.eval_every and done % args.eval_every == 0) or done == args.steps
                if evaluated:
                    if self.rank == 0 or args.fsdp:  # an FSDP2 forward needs every rank
                        val_loss = evaluate(self.module, self.val_data, batch_size=2 * args.batch_size, max_batches=args.eval_batches)
                        rec["val_loss"] = val_loss
                    if args.target_val_loss is not None and done < args.steps:
                        # rank 0 evaluates; every rank must stop at the same step
                        flag = torch.tensor([float(self.rank == 0 and val_loss <= args.target_val_loss)])
                        dist.broadcast(flag, 0)
                        if flag.item():
                            stopped_at = done
                if metrics is not None:
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                if self.rank == 0 and args.log_every and (done % args.log_every == 0 or done == args.steps or step == self.start_step):
                    self._log_progress(rec, stats)
                if args.ckpt_every and done % args.ckpt_every == 0 and done < args.steps:
                    if metrics is not None:
                        os.fsync(metrics.fileno())
                    self.save_checkpoint(done)
                if stopped_at is not None:
                    if self.rank == 0:
                        logger.info("validation loss %.4f reached the target %.4f at step %d: stopping", val_loss, args.target_val_loss, done)
                    break
        finally:
            if metrics is not None:
                metrics.close()
        if args.ckpt_every:
            self.save_checkpoint(stopped_at or args.steps)
        summary = self._summarise(step_times, sent_hook, wire_start, wire_end, recent, val_loss, time.perf_counter() - t_run, first_timed, stopped_at)
        return summary

    def _log_progress(self, rec: Dict[str, Any], stats: Dict[str, Any]) -> None:
        sent, fp32 = rec["bytes_sent_step"], rec["fp32_bytes_step"]
        if sent and sent != fp32:
            what = "fp32 FSDP2 collectives" if self.args.fsdp else "fp32 all-reduce"
            ratio = f" ({what}: {fp32 / 1e6:.3f} MB, {fp32 / sent:.1f}x compression)"
        else:
            ratio = " (uncompressed)"
        val = f" | val loss {rec['val_loss']:.4f}" if "val_loss" in rec else ""
        logger.info(
            "step %5d/%d | loss %.4f%s | %6.1f ms/step | sent %.3f MB/step per rank%s",
            rec["step"], self.args.steps, rec["loss"], val, 1e3 * rec["step_time_s"], sent / 1e6, ratio,
        )

    def _summarise(
        self, step_times, sent_hook, wire_start, wire_end, recent, val_loss, wall, first_timed, stopped_at=None,
    ) -> Dict[str, Any]:
        args = self.args
        wire = None
        if wire_start is not None and wire_end is not None and step_times:
            n = len(step_times)
            wire = {k: (wire_end[k] - wire_start[k]) / n for k in ("tx_bytes", "rx_bytes")}
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, {"rank": self.rank, "wire_per_step": wire, "device": self.netdev})
        summary = {
            "hook": self.label,
            "model": args.model,
            "parameters": self.n_params,
            "world_size": self.world_size,
            "backend": dist.get_backend(),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "resumed_from": self.resumed_from,
            "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            "final_val_loss": val_loss,
            "stopped_at_step": stopped_at,
            "final_train_loss_avg20": sum(recent) / len(recent) if recent else float("nan"),
            "timed_steps": len(step_times),
            "timed_from_step": first_timed + 1,
            "median_step_time_s": statistics.median(step_times) if step_times else float("nan"),
            "mean_step_time_s": statistics.fmean(step_times) if step_times else float("nan"),
            "hook_bytes_per_step": statistics.fmean(sent_hook) if sent_hook else float("nan"),
            "hook_stats": {k: v for k, v in self.hook.stats().items() if isinstance(v, (int, float))},
            # the kernels gradcomp's exchange ran: "native (avx512)", "compiled" or "eager"
            "kernels": getattr(getattr(self.hook, "state", None), "kernels", None),
            # the policy's network figures (reuse them with --policy-fit) and the error budget's verdicts
            "policy_fit": _policy_view(self.hook, "fit"),
            "budget": _policy_view(self.hook, "budget"),
            "hook_setup_s": self.hook_setup_s,
            "wire_per_step": gathered,
            "wall_s": wall,
            "overlap": self.tracer.summary() if self.tracer is not None else None,
            "args": vars(args),
        }
        if self.rank == 0:
            atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
            hs = summary["hook_stats"]
            ratio = hs.get("compression_ratio", float("nan"))
            logger.info(
                "done: %d steps, final val loss %.4f, median %.1f ms/step, %.3f MB sent per step per rank "
                "(fp32 all-reduce: %.3f MB, compression %s); results in %s",
                args.steps, val_loss, 1e3 * summary["median_step_time_s"], summary["hook_bytes_per_step"] / 1e6,
                hs.get("fp32_bytes_step", 0) / 1e6, f"{ratio:.2f}x" if math.isfinite(ratio) else "n/a", self.out_dir,
            )
        return summary


def init_distributed(args: argparse.Namespace) -> None:
    """Join the process group torchrun describes in the environment (a single process without torchrun)."""
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    else:
        init_file = Path(tempfile.mkdtemp(prefix="gradcomp-train-")) / "init"
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=0, world_size=1, timeout=timeout)


def main(argv: Optional[List[str]] = None) -> int:
    """Parse the arguments, train, and return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    if args.check_only:
        return 0
    torch.set_num_threads(args.threads)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    init_distributed(args)
    job = None
    finished = False
    try:
        job = Job(args)
        job.run()
        finished = True
    finally:
        if job is not None:
            job.hook.close()
        if finished:
            # no rank tears its groups down while a peer still has collectives in flight: FSDP2 on
            # gloo aborts at exit ("terminate called without an active exception") otherwise
            dist.barrier()
        job = None
        gc.collect()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
