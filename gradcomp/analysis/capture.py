"""Capture real gradients of a model as DDP would reduce them: buckets, per-rank gradients, a trace on disk.

* :func:`ddp_buckets`: group parameters like DDP (reverse order, a small first bucket, then
  ``bucket_cap_mb`` buckets);
* :func:`iter_gradients` / :func:`capture_gradients`: run the model on ``workers`` different batches
  per step (one per emulated rank), record every rank's flat gradient, apply the mean with an
  optimizer; :class:`GradientTrace` keeps them and saves / loads them (safetensors).

The replay through the exchange is :mod:`gradcomp.analysis.gradexp`; import these names from there too.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from gradcomp.batches import default_loss
from gradcomp.checks import check_int
from gradcomp.files import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["Bucket", "ddp_buckets", "GradientTrace", "iter_gradients", "capture_gradients"]


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
        atomic_write(path, lambda tmp: save_file({"grads": self.grads.contiguous()}, tmp, metadata={"gradcomp_trace": json.dumps(meta)}))

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
