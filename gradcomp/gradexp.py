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
    3. Replay: for each :class:`ReplayConfig`, run every bucket through the same arithmetic as the
       hook's two-phase exchange (``gradcomp.comm.collectives``): pad to whole shards, quantize each
       rank's bucket (plus its worker residual), dequantize and sum the ranks in order, divide by P,
       requantize (plus the server residual), dequantize, with the codec's own functions.
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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from gradcomp import codec
from gradcomp.batches import default_loss
from gradcomp.checks import check_int
from gradcomp.comm.collectives import ShardLayout

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
        bits: 2, 4 or 8.
        block_size: elements per fp32 scale.
        stochastic: stochastic instead of round-to-nearest rounding.
        error_feedback: carry the quantization residuals across steps (both quantization points).
        seed: seed of the stochastic rounding noise.

    Example: ``ReplayConfig(4, 256, False, True).name == "int4 b256 nearest ef"``.
    """

    bits: int = 8
    block_size: int = 256
    stochastic: bool = False
    error_feedback: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be one of (2, 4, 8), got {self.bits!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.block_size % (8 // self.bits):
            raise ValueError(f"block_size must be a multiple of {8 // self.bits} for {self.bits}-bit packing, got {self.block_size}")
        if not isinstance(self.stochastic, bool) or not isinstance(self.error_feedback, bool):
            raise TypeError("stochastic and error_feedback must be bools")

    @property
    def name(self) -> str:
        """Short label, e.g. ``int8 b256 nearest ef`` or ``int4 b64 stochastic no-ef``."""
        rnd = "stochastic" if self.stochastic else "nearest"
        return f"int{self.bits} b{self.block_size} {rnd} {'ef' if self.error_feedback else 'no-ef'}"


def config_grid(
    bits: Sequence[int] = (8, 4),
    block_sizes: Sequence[int] = (256,),
    rounding: Sequence[str] = ("nearest", "stochastic"),
    error_feedback: Sequence[bool] = (True, False),
    seed: int = 0,
) -> List[ReplayConfig]:
    """Return every combination of the given settings as :class:`ReplayConfig` objects.

    Example: ``len(config_grid((8, 4), (256,), ("nearest",), (True, False))) == 4``.
    """
    for r in rounding:
        if r not in _ROUNDING:
            raise ValueError(f"rounding must be one of {_ROUNDING}, got {r!r}")
    grid = [
        ReplayConfig(int(b), int(bs), r == "stochastic", bool(ef), seed)
        for b, bs, r, ef in itertools.product(bits, block_sizes, rounding, error_feedback)
    ]
    if not grid:
        raise ValueError("config_grid needs at least one value for each setting, got an empty list")
    return grid


# --------------------------------------------------------------------------------------------
# DDP-like buckets


@dataclass(frozen=True)
class Bucket:
    """A DDP-style gradient bucket.

    Attributes:
        index: bucket number (0 is the first all-reduced, holding the last parameters).
        params: indices of the parameters it holds, in the order they are laid out in it.
        numel: elements in the bucket.
    """

    index: int
    params: Tuple[int, ...]
    numel: int


def ddp_buckets(
    numels: Sequence[int],
    bucket_cap_mb: float = 25.0,
    first_bucket_mb: Optional[float] = 1.0,
    element_size: int = 4,
) -> List[Bucket]:
    """Group parameters into buckets the way DDP does.

    Steps: walk the parameters in reverse registration order (gradients of the last layers are
    ready first); add each to the open bucket; close the bucket once it holds at least its limit
    (``first_bucket_mb`` for the first, as DDP's 1 MiB first bucket, then ``bucket_cap_mb``).
    Sizes are in MiB, as DDP's ``bucket_cap_mb``.

    Example: numels ``[300_000, 300_000, 300_000]`` with a 1 MiB cap (262144 fp32 elements) and
    no first-bucket limit give three buckets ``(2,), (1,), (0,)``.

    Args:
        numels: elements of each parameter, in registration order.
        bucket_cap_mb: bucket limit in MiB.
        first_bucket_mb: limit of the first bucket in MiB; None uses ``bucket_cap_mb``.
        element_size: bytes per gradient element.

    Returns:
        The buckets in the order DDP all-reduces them.
    """
    if not numels:
        raise ValueError("numels must list at least one parameter, got none")
    if bucket_cap_mb <= 0 or (first_bucket_mb is not None and first_bucket_mb <= 0):
        raise ValueError(f"bucket limits must be positive, got bucket_cap_mb={bucket_cap_mb}, first_bucket_mb={first_bucket_mb}")
    limits = [first_bucket_mb if first_bucket_mb is not None else bucket_cap_mb, bucket_cap_mb]
    buckets: List[Bucket] = []
    cur: List[int] = []
    size = 0
    for i in reversed(range(len(numels))):
        cur.append(i)
        size += int(numels[i])
        limit = limits[min(len(buckets), 1)] * (1 << 20)
        if size * element_size >= limit:
            buckets.append(Bucket(len(buckets), tuple(cur), size))
            cur, size = [], 0
    if cur:
        buckets.append(Bucket(len(buckets), tuple(cur), size))
    return buckets


# --------------------------------------------------------------------------------------------
# capture


def _named_trainable(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def iter_gradients(
    model: nn.Module,
    batch_fn: Callable[[int, int], Any],
    steps: int,
    workers: int = 4,
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Iterator[Tuple[torch.Tensor, float]]:
    """Yield each step's per-worker gradients, training the model with their mean as DDP would.

    Args:
        model: the model (its parameters are updated when ``optimizer`` is given).
        batch_fn: ``batch_fn(step, worker)`` returns the batch of that emulated rank.
        steps: steps to run.
        workers: emulated ranks P, each on its own batch.
        loss_fn: ``loss_fn(model, batch)``; :func:`default_loss` when None.
        optimizer: applied to the mean gradient after each step; None keeps the weights fixed.

    Yields:
        ``(grads, loss)``: fp32 ``(workers, N)`` gradients flattened in parameter order (a missing
        gradient counts as zeros) and the mean loss over the workers.
    """
    check_int("steps", steps)
    check_int("workers", workers)
    params = [p for _, p in _named_trainable(model)]
    if not params:
        raise ValueError("model has no trainable parameters")
    loss_fn = loss_fn or default_loss
    n = sum(p.numel() for p in params)
    model.train()
    for step in range(steps):
        grads = torch.empty(workers, n, dtype=torch.float32)
        losses = []
        for w in range(workers):
            for p in params:
                p.grad = None
            loss = loss_fn(model, batch_fn(step, w))
            loss.backward()
            flat = [p.grad.detach().reshape(-1).float() if p.grad is not None else torch.zeros(p.numel()) for p in params]
            torch.cat(flat, out=grads[w])
            losses.append(float(loss.detach()))
        if optimizer is not None:
            mean = grads.mean(dim=0)
            offset = 0
            for p in params:
                p.grad = mean[offset : offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
            optimizer.step()
        for p in params:
            p.grad = None
        yield grads, sum(losses) / len(losses)


@dataclass
class GradientTrace:
    """Captured per-worker gradients of several steps.

    Attributes:
        names: parameter names in registration order.
        shapes: parameter shapes.
        grads: fp32 ``(steps, workers, N)``, each row flattened in parameter order.
        losses: mean loss of each step.
        meta: free-form description (model, data, seeds).
    """

    names: List[str]
    shapes: List[Tuple[int, ...]]
    grads: torch.Tensor
    losses: List[float] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.grads.dim() != 3:
            raise ValueError(f"grads must have shape (steps, workers, N), got {tuple(self.grads.shape)}")
        if len(self.names) != len(self.shapes):
            raise ValueError(f"names and shapes must have the same length, got {len(self.names)} and {len(self.shapes)}")
        n = sum(math.prod(s) for s in self.shapes)
        if n != self.grads.shape[2]:
            raise ValueError(f"the shapes hold {n} elements but grads rows have {self.grads.shape[2]}")

    @property
    def numels(self) -> List[int]:
        """Elements of each parameter."""
        return [math.prod(s) for s in self.shapes]

    @property
    def steps(self) -> int:
        """Captured steps."""
        return self.grads.shape[0]

    @property
    def workers(self) -> int:
        """Emulated ranks."""
        return self.grads.shape[1]

    def save(self, path: "str | os.PathLike") -> None:
        """Write the trace to a safetensors file (gradients) with its names, shapes and meta as metadata."""
        from safetensors.torch import save_file

        meta = {"names": self.names, "shapes": [list(s) for s in self.shapes], "losses": self.losses, "meta": self.meta}
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        save_file({"grads": self.grads.contiguous()}, tmp, metadata={"gradcomp_trace": json.dumps(meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "GradientTrace":
        """Read a trace written by :meth:`save`."""
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no gradient trace at {os.fspath(path)!r}")
        try:
            with safe_open(os.fspath(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get("gradcomp_trace")
                grads = fh.get_tensor("grads")
        except Exception as exc:
            raise ValueError(f"{os.fspath(path)!r} is not a gradient trace file ({type(exc).__name__}: {exc})") from None
        if raw is None:
            raise ValueError(f"{os.fspath(path)!r} is a safetensors file but holds no gradient trace metadata")
        meta = json.loads(raw)
        return cls(meta["names"], [tuple(s) for s in meta["shapes"]], grads, meta.get("losses", []), meta.get("meta", {}))


def capture_gradients(
    model: nn.Module,
    batch_fn: Callable[[int, int], Any],
    steps: int,
    workers: int = 4,
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    progress: Optional[Callable[[int], None]] = None,
    meta: Optional[Dict[str, Any]] = None,
) -> GradientTrace:
    """Run :func:`iter_gradients` and keep every step in a :class:`GradientTrace`.

    Memory: ``steps * workers * N * 4`` bytes; use :func:`replay_stream` on :func:`iter_gradients`
    to replay without keeping them.

    Args:
        model, batch_fn, steps, workers, loss_fn, optimizer: as for :func:`iter_gradients`.
        progress: called with 1 after each step (a progress bar's ``update``).
        meta: description stored with the trace.

    Returns:
        The trace.
    """
    named = _named_trainable(model)
    rows, losses = [], []
    for grads, loss in iter_gradients(model, batch_fn, steps, workers, loss_fn, optimizer):
        rows.append(grads)
        losses.append(loss)
        if progress is not None:
            progress(1)
    return GradientTrace([n for n, _ in named], [tuple(p.shape) for _, p in named], torch.stack(rows), losses, dict(meta or {}))


# --------------------------------------------------------------------------------------------
# replay


class _Simulator:
    """The hook's two-phase exchange for one config over all buckets, with its residuals."""

    def __init__(self, cfg: ReplayConfig, bucket_numels: List[int], workers: int):
        self.cfg = cfg
        self.layouts = [ShardLayout(n, workers, cfg.bits, cfg.block_size) for n in bucket_numels]
        self.worker_res = [torch.zeros(workers, lay.padded_numel) for lay in self.layouts] if cfg.error_feedback else None
        self.server_res = [torch.zeros(lay.padded_numel) for lay in self.layouts] if cfg.error_feedback else None
        self.gen = torch.Generator().manual_seed(cfg.seed) if cfg.stochastic else None
        self.bytes_sent = sum(lay.bytes_sent for lay in self.layouts)

    def _noise(self, shape) -> Optional[torch.Tensor]:
        if self.gen is None:
            return None
        return torch.rand(shape, generator=self.gen)

    def exchange(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Average ``x`` (workers, n) the way the hook does; return (n,)."""
        lay = self.layouts[i]
        W, B = x.shape[0], lay.block_size
        padded = torch.zeros(W, lay.padded_numel)
        padded[:, : lay.numel] = x
        blocks = padded.view(-1, B)
        res = self.worker_res[i].view(-1, B) if self.worker_res is not None else torch.zeros(()).expand_as(blocks)
        packed, scale, err = codec.error_feedback_step(blocks, res.expand_as(blocks), lay.bits, B, noise=self._noise(blocks.shape))
        # dequantize every rank's copy of every shard and sum them in rank order, then divide by P
        reduced = codec.dequantize_sum(packed.view(W, -1), scale.view(W, -1), lay.bits).div_(W)
        sres = self.server_res[i].view(-1, B) if self.server_res is not None else torch.zeros(()).expand_as(reduced)
        packed2, scale2, err2 = codec.error_feedback_step(reduced, sres.expand_as(reduced), lay.bits, B, noise=self._noise(reduced.shape))
        if self.worker_res is not None:
            self.worker_res[i] = err.view(W, -1)
            self.server_res[i] = err2.reshape(-1)
        return codec.dequantize_packed(packed2, scale2, lay.bits).reshape(-1)[: lay.numel]


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
            sims = [_Simulator(c, bucket_sizes, workers) for c in configs]
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
            "config": cfg.name, "bits": cfg.bits, "block_size": cfg.block_size,
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
