"""Gradient experiments: capture real gradients of a model and replay them through the quantized exchange offline.

The question answered: how much error does int8/int4/int2 add to the gradients of *my* model, per
layer and per DDP bucket, with and without error feedback, with deterministic or stochastic
rounding, at which block size, and does the error accumulate over many steps?

Steps:
    1. Capture: run the model on ``workers`` different batches per step (one per emulated rank),
       record every rank's flat gradient, apply the mean gradient with an optimizer (as DDP would),
       repeat for ``steps`` steps. :func:`iter_gradients` streams them; :func:`capture_gradients`
       keeps them in a :class:`GradientTrace` that can be saved and reloaded.
    2. Bucket: group the parameters like DDP (reverse parameter order, a small first bucket,
       then ``bucket_cap_mb`` buckets), see :func:`ddp_buckets`.
    3. Replay: for each :class:`ReplayConfig`, run every bucket through the hook's own exchange steps
       (:func:`gradcomp.comm.exchange.exchange_local`: encode each rank's bucket plus its worker
       residual, reduce each owned shard in rank order and requantize it plus the server residual,
       decode), with the hook's per-parameter block alignment and stochastic-rounding noise.
    4. Measure against the exact mean gradient: relative error ``||e|| / ||g||``, SQNR, the
       projection bias ``<e, g> / ||g||^2`` (negative: the transmitted gradient is shrunk along the
       true one), and the drift ``||sum_t out_t - sum_t g_t|| / ||sum_t g_t||`` of the accumulated
       update, per step, per layer and per bucket.

Error feedback bounds the drift: the accumulated error equals minus the current residuals, so the
drift falls like ``1/T``; without it, deterministic rounding repeats its bias and the drift stays
flat, and stochastic rounding's independent errors make it fall like ``1/sqrt(T)``.

Example::

    >>> trace = capture_gradients(model, batch_fn, steps=8, workers=4)
    >>> result = replay(trace, config_grid(bits=(8, 4)), steps=64)
    >>> result.summary[0]["rel_error"]
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from gradcomp.analysis.capture import Bucket, GradientTrace, capture_gradients, ddp_buckets, iter_gradients
from gradcomp.batches import default_loss
from gradcomp.codec.formats import WireFormat, wire_format
from gradcomp.comm.exchange import exchange_local, param_noise
from gradcomp.comm.buffers import ExchangeBuffers
from gradcomp.comm.plan import ExchangePlan

logger = logging.getLogger(__name__)

__all__ = [
    "ReplayConfig",
    "config_grid",
    "Bucket",
    "ddp_buckets",
    "GradientTrace",
    "iter_gradients",
    "capture_gradients",
    "GradExpResult",
    "replay",
    "replay_stream",
    "default_loss",
]

_ROUNDING = ("nearest", "stochastic")


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ReplayConfig:
    """One way to quantize the gradients in the replay.

    Args:
        bits: the wire format: a registered name (``"int8"``, ``"int4"``, ``"int2"``) or its bits
            (8, 4, 2); kept in the shorter spelling (:attr:`~gradcomp.codec.formats.WireFormat.short`).
        block_size: elements per scale (a whole number of code bytes in the format).
        stochastic: stochastic instead of round-to-nearest rounding.
        error_feedback: carry the quantization residuals across steps (both quantization points).
        seed: seed of the stochastic rounding noise.

    Example: ``ReplayConfig(4, 256, False, True).name == "int4 b256 nearest ef"``.
    """

    bits: Union[int, str] = 8
    block_size: int = 256
    stochastic: bool = False
    error_feedback: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        fmt = wire_format(self.bits, "bits")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        fmt.check_block_size(self.block_size)
        if not isinstance(self.stochastic, bool) or not isinstance(self.error_feedback, bool):
            raise TypeError("stochastic and error_feedback must be bools")
        object.__setattr__(self, "bits", fmt.short)

    @property
    def format(self) -> WireFormat:
        """The :class:`~gradcomp.codec.formats.WireFormat` the gradients are sent in."""
        return wire_format(self.bits)

    @property
    def name(self) -> str:
        """Short label, e.g. ``int8 b256 nearest ef`` or ``int4 b64 stochastic no-ef``."""
        rnd = "stochastic" if self.stochastic else "nearest"
        return f"{self.format.name} b{self.block_size} {rnd} {'ef' if self.error_feedback else 'no-ef'}"


def config_grid(
    bits: Sequence[Union[int, str]] = (8, 4),
    block_sizes: Sequence[int] = (256,),
    rounding: Sequence[str] = ("nearest", "stochastic"),
    error_feedback: Sequence[bool] = (True, False),
    seed: int = 0,
) -> List[ReplayConfig]:
    """Return every combination of the given settings as :class:`ReplayConfig` objects.

    ``bits`` lists wire formats by bits or name (``(8, "int4")``).

    Example: ``len(config_grid((8, 4), (256,), ("nearest",), (True, False))) == 4``.
    """
    for r in rounding:
        if r not in _ROUNDING:
            raise ValueError(f"rounding must be one of {_ROUNDING}, got {r!r}")
    grid = [
        ReplayConfig(b, int(bs), r == "stochastic", bool(ef), seed)
        for b, bs, r, ef in itertools.product(bits, block_sizes, rounding, error_feedback)
    ]
    if not grid:
        raise ValueError("config_grid needs at least one value for each setting, got an empty list")
    return grid


# --------------------------------------------------------------------------------------------
# replay


class _Simulator:
    """The hook's exchange for one config over all buckets, with every rank's residuals, in one process.

    It runs :func:`gradcomp.comm.exchange.exchange_local`: the hook's own encode / reduce_shard /
    decode steps on the same per-bucket plans (every parameter block-aligned, keyed by its index),
    with stochastic-rounding noise drawn per parameter exactly as the hook draws it
    (:func:`gradcomp.comm.exchange.param_noise`, step ``first_step + t`` at replay step ``t``).

    Args:
        cfg: the :class:`ReplayConfig`.
        buckets: ``(keys, numels)`` of each bucket's parameters, in the order they are laid out in it.
        workers: emulated ranks P.
        first_step: the hook step of the first replayed step (for the stochastic-rounding noise).
    """

    def __init__(self, cfg: ReplayConfig, buckets: Sequence[Tuple[Sequence[int], Sequence[int]]], workers: int, first_step: int = 0):
        self.cfg = cfg
        self.workers = workers
        self.plans = [ExchangePlan.build(numels, workers, cfg.format, cfg.block_size, keys=keys) for keys, numels in buckets]
        self.bufs = [[ExchangeBuffers.allocate(p) for _ in range(workers)] for p in self.plans]
        ef = cfg.error_feedback
        self.worker_res = [torch.zeros(workers, p.padded_numel) for p in self.plans] if ef else None
        self.server_res = [torch.zeros(workers, p.server_numel) for p in self.plans] if ef else None
        self.step = first_step
        self.bytes_sent = sum(p.bytes_sent for p in self.plans)

    def exchange(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Average bucket ``i`` of every rank (``x``: ``(workers, n)``) the way the hook does; return ``(n,)``."""
        plan, W, cfg = self.plans[i], self.workers, self.cfg
        buckets = [x[r].contiguous() for r in range(W)]
        noises = server_noises = None
        if cfg.stochastic:
            noises = [param_noise(plan, cfg.seed, r, self.step, 0) for r in range(W)]
            full = param_noise(plan, cfg.seed, -1, self.step, 1)
            server_noises = [plan.server_of(full, r) for r in range(W)]
        out, _ = exchange_local(
            plan, buckets,
            residuals=None if self.worker_res is None else list(self.worker_res[i]),
            server_residuals=None if self.server_res is None else list(self.server_res[i]),
            noises=noises, server_noises=server_noises, bufs=self.bufs[i],
        )
        return out

    def next_step(self) -> None:
        """Advance the step the stochastic-rounding noise is drawn for."""
        self.step += 1


class _Accumulator:
    """Running sums of squared error and of error times signal per segment (layer or bucket)."""

    def __init__(self, seg_ids: torch.Tensor, nseg: int):
        self.seg = seg_ids
        self.nseg = nseg
        self.sums = torch.zeros(2, nseg, dtype=torch.float64)  # rows: sum e^2, sum e*g

    def add(self, stacked: torch.Tensor) -> None:
        """Add a ``(2, N)`` stack of ``e^2`` and ``e * g``."""
        self.sums.index_add_(1, self.seg, stacked)

    def rows(self, sig2: torch.Tensor, sum_true: torch.Tensor, sum_out: torch.Tensor) -> List[Dict[str, float]]:
        d = sum_out - sum_true
        both = torch.zeros(2, self.nseg, dtype=torch.float64).index_add_(1, self.seg, torch.stack([d * d, sum_true * sum_true]))
        return [
            _metrics(float(self.sums[0, k]), float(sig2[k]), float(self.sums[1, k]), float(both[0, k]), float(both[1, k]))
            for k in range(self.nseg)
        ]


def _metrics(err2: float, sig2: float, dot: float, drift2: float, sum2: float) -> Dict[str, float]:
    """Relative error, SQNR (dB), projection bias and drift from sums of squares."""
    rel = math.sqrt(err2 / sig2) if sig2 > 0 else (0.0 if err2 == 0 else math.inf)
    if err2 == 0:
        sqnr = math.inf
    elif sig2 == 0:
        sqnr = -math.inf
    else:
        sqnr = 10 * math.log10(sig2 / err2)
    bias = dot / sig2 if sig2 > 0 else 0.0
    drift = math.sqrt(drift2 / sum2) if sum2 > 0 else (0.0 if drift2 == 0 else math.inf)
    return {"rel_error": rel, "sqnr_db": sqnr, "bias": bias, "drift": drift}


@dataclass
class GradExpResult:
    """What a replay measured.

    Attributes:
        meta: model size, workers, steps, buckets and the trace's description.
        summary: one row per config: its settings, ``rel_error`` (mean over steps of
            ``||e_t|| / ||g_t||``), ``rel_error_rms`` (``sqrt(sum ||e||^2 / sum ||g||^2)``),
            ``sqnr_db``, ``bias``, ``drift`` (final), ``bytes_per_rank`` and ``compression``
            (fp32 ring bytes over quantized bytes).
        per_layer: one row per config and parameter (rms relative error, SQNR, bias, final drift).
        per_bucket: the same per config and DDP bucket.
        curves: ``{config: {"rel_error": [...], "drift": [...]}}`` per step.
    """

    meta: Dict[str, Any]
    summary: List[Dict[str, Any]]
    per_layer: List[Dict[str, Any]]
    per_bucket: List[Dict[str, Any]]
    curves: Dict[str, Dict[str, List[float]]]

    def to_dict(self) -> Dict[str, Any]:
        """Return the result as plain JSON-ready data (non-finite floats stay floats)."""
        return asdict(self)

    def save_json(self, path: "str | os.PathLike") -> None:
        """Write :meth:`to_dict` as JSON (``inf`` written as the string ``"inf"``)."""

        def fix(o):
            if isinstance(o, float) and not math.isfinite(o):
                return str(o)
            if isinstance(o, dict):
                return {k: fix(v) for k, v in o.items()}
            if isinstance(o, list):
                return [fix(v) for v in o]
            return o

        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(fix(self.to_dict()), fh, indent=1)
        os.replace(tmp, path)


def replay_stream(
    grad_steps: Iterable[torch.Tensor],
    names: Sequence[str],
    numels: Sequence[int],
    configs: Sequence[ReplayConfig],
    bucket_cap_mb: float = 25.0,
    first_bucket_mb: Optional[float] = 1.0,
    progress: Optional[Callable[[int], None]] = None,
    meta: Optional[Dict[str, Any]] = None,
) -> GradExpResult:
    """Replay a stream of per-worker gradients through every config's quantized exchange.

    Args:
        grad_steps: iterable of fp32 ``(workers, N)`` tensors (or ``(grads, loss)`` pairs as
            :func:`iter_gradients` yields), flattened in parameter order.
        names: parameter names (for the per-layer rows).
        numels: elements per parameter, summing to ``N``.
        configs: the :class:`ReplayConfig` objects to compare.
        bucket_cap_mb, first_bucket_mb: DDP bucketing, see :func:`ddp_buckets`.
        progress: called with 1 after each step.
        meta: extra description copied into the result.

    Returns:
        A :class:`GradExpResult`.
    """
    configs = list(configs)
    if not configs:
        raise ValueError("configs must hold at least one ReplayConfig, got none")
    for c in configs:
        if not isinstance(c, ReplayConfig):
            raise TypeError(f"configs must be ReplayConfig objects, got {type(c).__name__}")
    if len(names) != len(numels):
        raise ValueError(f"names and numels must have the same length, got {len(names)} and {len(numels)}")
    numels = [int(n) for n in numels]
    n_total = sum(numels)
    buckets = ddp_buckets(numels, bucket_cap_mb, first_bucket_mb)
    offsets = [0]
    for k in numels:
        offsets.append(offsets[-1] + k)
    # perm lays the flat parameter-order vector out bucket after bucket
    perm = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for b in buckets for i in b.params])
    bucket_sizes = [b.numel for b in buckets]
    layer_ids = torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(numels))
    bucket_ids = torch.empty(n_total, dtype=torch.long)
    bucket_ids[perm] = torch.repeat_interleave(torch.arange(len(buckets)), torch.tensor(bucket_sizes))

    sims: List[_Simulator] = []
    acc_layer: List[_Accumulator] = []
    acc_bucket: List[_Accumulator] = []
    sum_out: List[torch.Tensor] = []
    sum_true = torch.zeros(n_total, dtype=torch.float64)
    sig2_layer = torch.zeros(len(numels), dtype=torch.float64)
    sig2_bucket = torch.zeros(len(buckets), dtype=torch.float64)
    curves: Dict[str, Dict[str, List[float]]] = {}
    steps = 0
    workers = None
    for item in grad_steps:
        grads = item[0] if isinstance(item, tuple) else item
        if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or grads.shape[1] != n_total:
            got = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
            raise ValueError(f"each step must be a (workers, {n_total}) tensor, got {got}")
        grads = grads.float()
        if workers is None:
            workers = grads.shape[0]
            layout = [(b.params, [numels[k] for k in b.params]) for b in buckets]
            sims = [_Simulator(c, layout, workers) for c in configs]
            acc_layer = [_Accumulator(layer_ids, len(numels)) for _ in configs]
            acc_bucket = [_Accumulator(bucket_ids, len(buckets)) for _ in configs]
            sum_out = [torch.zeros(n_total, dtype=torch.float64) for _ in configs]
            curves = {c.name: {"rel_error": [], "drift": []} for c in configs}
        elif grads.shape[0] != workers:
            raise ValueError(f"every step must have {workers} workers, got {grads.shape[0]}")
        # the exact mean, summed in rank order like the exchange
        true = grads.sum(dim=0).div_(workers)
        true64 = true.double()
        t2 = true64 * true64
        sig2_layer.index_add_(0, layer_ids, t2)
        sig2_bucket.index_add_(0, bucket_ids, t2)
        sum_true += true64
        true_norm = math.sqrt(float(t2.sum()))
        sum_norm = float(sum_true.norm())
        parts = grads[:, perm].split(bucket_sizes, dim=1)
        for cfg, sim, al, ab, s_out in zip(configs, sims, acc_layer, acc_bucket, sum_out):
            out = torch.empty(n_total)
            out[perm] = torch.cat([sim.exchange(i, p) for i, p in enumerate(parts)])
            sim.next_step()
            out64 = out.double()
            err = out64 - true64
            stacked = torch.stack([err * err, err * true64])
            al.add(stacked)
            ab.add(stacked)
            s_out += out64
            curves[cfg.name]["rel_error"].append(math.sqrt(float(stacked[0].sum())) / true_norm if true_norm > 0 else 0.0)
            curves[cfg.name]["drift"].append(float((s_out - sum_true).norm()) / sum_norm if sum_norm > 0 else 0.0)
        steps += 1
        if progress is not None:
            progress(1)
    if steps == 0:
        raise ValueError("grad_steps yielded no steps")

    fp32_bytes = sum(2 * (workers - 1) * -(-n // workers) * 4 for n in bucket_sizes)
    summary, per_layer, per_bucket = [], [], []
    for cfg, sim, al, ab, s_out in zip(configs, sims, acc_layer, acc_bucket, sum_out):
        whole = _metrics(float(al.sums[0].sum()), float(sig2_layer.sum()), float(al.sums[1].sum()),
                         float(((s_out - sum_true) ** 2).sum()), float((sum_true**2).sum()))
        rc = curves[cfg.name]["rel_error"]
        summary.append({
            "config": cfg.name, "bits": cfg.bits, "format": cfg.format.name, "block_size": cfg.block_size,
            "rounding": "stochastic" if cfg.stochastic else "nearest", "error_feedback": cfg.error_feedback,
            "rel_error": sum(rc) / len(rc), "rel_error_rms": whole["rel_error"], "sqnr_db": whole["sqnr_db"],
            "bias": whole["bias"], "drift": whole["drift"], "bytes_per_rank": sim.bytes_sent,
            "compression": (fp32_bytes / sim.bytes_sent) if sim.bytes_sent else math.inf,
        })
        for k, row in enumerate(al.rows(sig2_layer, sum_true, s_out)):
            per_layer.append(dict({"config": cfg.name, "layer": names[k], "numel": numels[k]}, **row))
        for k, row in enumerate(ab.rows(sig2_bucket, sum_true, s_out)):
            per_bucket.append(dict({"config": cfg.name, "bucket": k, "numel": bucket_sizes[k],
                                    "params": len(buckets[k].params)}, **row))
    info = {
        "params": n_total, "layers": len(numels), "workers": workers, "steps": steps,
        "buckets": [{"index": b.index, "numel": b.numel, "params": [names[i] for i in b.params]} for b in buckets],
        "bucket_cap_mb": bucket_cap_mb, "first_bucket_mb": first_bucket_mb,
    }
    info.update(meta or {})
    logger.info("replayed %d steps of %d workers x %d elements through %d configs", steps, workers, n_total, len(configs))
    return GradExpResult(info, summary, per_layer, per_bucket, curves)


def replay(
    trace: GradientTrace,
    configs: Sequence[ReplayConfig],
    steps: Optional[int] = None,
    bucket_cap_mb: float = 25.0,
    first_bucket_mb: Optional[float] = 1.0,
    progress: Optional[Callable[[int], None]] = None,
) -> GradExpResult:
    """Replay a captured trace through every config (see :func:`replay_stream`).

    Args:
        trace: the captured gradients.
        configs: the configs to compare.
        steps: steps to replay; more than were captured cycles through the trace again
            (default: the captured steps once).
        bucket_cap_mb, first_bucket_mb, progress: as for :func:`replay_stream`.

    Returns:
        A :class:`GradExpResult`.
    """
    if not isinstance(trace, GradientTrace):
        raise TypeError(f"trace must be a GradientTrace, got {type(trace).__name__}")
    total = trace.steps if steps is None else steps
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    stream = (trace.grads[t % trace.steps] for t in range(total))
    meta = {"captured_steps": trace.steps, "trace": trace.meta}
    return replay_stream(stream, trace.names, trace.numels, configs, bucket_cap_mb, first_bucket_mb, progress, meta)
