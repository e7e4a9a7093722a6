"""Widths chosen by error as well as by the network: the error budget of :class:`~gradcomp.comm.policy.PolicyConfig`.

With ``PolicyConfig(error_budget=e)`` a bucket may only use the quantized candidates whose relative
quantization error on the bucket's own gradient is at most ``e``; among those (and plain all-reduce,
which makes no error) the network model picks the fastest, as without a budget. Per bucket:

1. **Measure** (at the bucket's first compressed step, then every ``measure_every`` steps, on the
   training thread, before the bucket is exchanged): lay the bucket out block-aligned as the
   exchange does and quantize it once with each candidate format (the exchange's own kernels, no
   error feedback): ``s = ||g||^2`` and ``e_F = ||Q_F(g) - g||^2`` per format ``F`` (in fp64; a
   rotated format's error is measured in the rotated space, where norms are the same).
2. **Agree**: all-gather every rank's ``(s, e_F...)`` on the bucket's process group and add them in
   rank order, so every rank holds the same numbers bit for bit; ``rel_F = sqrt(sum e_F / sum s)``.
3. **Decide**: ``allowed`` = plain all-reduce (when a candidate) and every format with
   ``rel_F <= e``; the policy's network model picks among them (:meth:`CommPolicy.choose`). When no
   format meets the budget and plain all-reduce is not a candidate, the most accurate format is
   used and a warning says so.

The verdict (:class:`BudgetVerdict`) is logged from rank 0, kept per bucket index, returned by
:attr:`~gradcomp.comm.hook.QuantizedAllReduceState.budget` and saved in checkpoints, so a resumed
run keeps the same formats until the next measurement (which sees the same gradients).

Example: candidates ``(32, "int8", "int4r", "int2r")`` and a budget of 0.2; a bucket whose gradient
measures int8 0.013, int4r 0.15, int2r 0.44 may use plain all-reduce, int8 or int4r, and at 1 Gbit/s
the network model picks int4r. ``gradcomp grads --format ...`` shows such errors offline.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from gradcomp.codec import kernels
from gradcomp.codec.formats import WireFormat, wire_format
from gradcomp.comm.fit import PLAIN, Candidate, candidate, candidate_label
from gradcomp.comm.plan import ExchangePlan
from gradcomp.comm.policy import CommPolicy

logger = logging.getLogger(__name__)

__all__ = ["BudgetVerdict", "local_errors", "agree_errors", "decide", "due", "measure"]


@dataclass(frozen=True)
class BudgetVerdict:
    """What the error budget decided for one bucket, and from what.

    Attributes:
        step: the step whose gradient was measured.
        keys: the bucket's parameter keys (a verdict is only reused for the same parameters).
        errors: ``((format name, relative error), ...)`` agreed over the ranks, in candidate order.
        allowed: the candidates within the budget (plain all-reduce included when it is one).
        choice: the candidate the network model picked among ``allowed`` (short spelling; 32: plain).
    """

    step: int
    keys: Tuple[int, ...]
    errors: Tuple[Tuple[str, float], ...]
    allowed: Tuple[Candidate, ...]
    choice: Candidate

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (for checkpoints and logs); :meth:`from_dict` reads it back."""
        return {"step": self.step, "keys": list(self.keys), "errors": [list(e) for e in self.errors],
                "allowed": list(self.allowed), "choice": self.choice}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BudgetVerdict":
        """Rebuild a verdict from :meth:`to_dict`'s output (``ValueError`` naming what is wrong)."""
        try:
            step = int(d["step"])
            keys = tuple(int(k) for k in d["keys"])
            errors = tuple((wire_format(str(n)).name, float(e)) for n, e in d["errors"])
            allowed = tuple(candidate(c, "allowed") for c in d["allowed"])
            choice = candidate(d["choice"], "choice")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"an error-budget verdict must hold step, keys, errors, allowed and choice, got {d!r} ({exc})") from None
        if step < 0 or choice not in allowed:
            raise ValueError(f"an error-budget verdict needs step >= 0 and its choice among allowed, got {d!r}")
        return cls(step, keys, errors, allowed, choice)

    def describe(self, index: int, numel: int, budget: float) -> str:
        """One line for the log: the measured errors against the budget and the choice."""
        errs = ", ".join(f"{n} {e:.3g}" for n, e in self.errors)
        return (f"bucket {index} ({numel} values) at step {self.step}: rel. error {errs} (budget {budget:g}) "
                f"-> {candidate_label(self.choice)}")


def due(verdict: Optional[BudgetVerdict], step: int, keys: Tuple[int, ...], every: int) -> bool:
    """Whether a bucket must be measured at ``step``: never measured, other parameters, or ``every`` steps since."""
    return verdict is None or verdict.keys != keys or (every > 0 and step - verdict.step >= every)


def local_errors(bucket: torch.Tensor, numels: Sequence[int], formats: Sequence[WireFormat], block_size: int,
                 fused: bool = True) -> torch.Tensor:
    """This rank's ``(||g||^2, ||Q_F(g) - g||^2 for each format F)`` of a flat bucket, as fp64 ``(1 + len(formats),)``.

    The bucket is laid out as the exchange lays it out (every parameter on a block boundary, zero
    padding) and quantized by the exchange's kernels with no residual; the error is the residual
    they leave (in the rotated space for a rotated format: the same norm).
    """
    plan = ExchangePlan.build(tuple(numels), 1, formats[0] if formats else "int8", block_size, chunk_numel=None)
    rows = plan.to_aligned(bucket).view(-1, block_size)
    out = torch.empty(1 + len(formats), dtype=torch.float64)
    out[0] = float(rows.double().square().sum())
    err = torch.empty_like(rows)
    for i, fmt in enumerate(formats):
        kernels.encode_blocks(rows, fmt, residual_out=err, fused=fused)
        out[1 + i] = float(err.double().square().sum())
    return out


def agree_errors(local: torch.Tensor, group, device) -> Tuple[float, ...]:
    """All-gather every rank's :func:`local_errors` and return ``rel_F = sqrt(sum e_F / sum s)`` per format (collective).

    The sums run in rank order on the gathered values, so every rank computes the same floats.
    """
    world = dist.get_world_size(group)
    mine = local.to(device)
    gathered = torch.empty(world * mine.numel(), dtype=mine.dtype, device=device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(gathered, mine, group=group)
    rows = gathered.view(world, -1).cpu().tolist()
    total = [0.0] * len(rows[0])
    for row in rows:  # rank order
        total = [a + b for a, b in zip(total, row)]
    s = total[0]
    return tuple(math.sqrt(e / s) if s > 0 else 0.0 for e in total[1:])


def decide(candidates: Sequence[Candidate], errors: Sequence[float], budget: float) -> Tuple[Tuple[Candidate, ...], bool]:
    """``(allowed, met)``: the candidates within ``budget`` (plain all-reduce always) and whether any was.

    ``errors`` holds the relative error of each quantized candidate, in the order of ``candidates``
    without :data:`PLAIN`. When none is within the budget and plain all-reduce is not a candidate,
    ``allowed`` is the most accurate format alone and ``met`` is False.
    """
    quantized = [c for c in candidates if c != PLAIN]
    if len(quantized) != len(errors):
        raise ValueError(f"need one error per quantized candidate ({len(quantized)}), got {len(errors)}")
    within = {c for c, e in zip(quantized, errors) if e <= budget}
    allowed = tuple(c for c in candidates if c == PLAIN or c in within)
    if allowed:
        return allowed, bool(within) or PLAIN in allowed
    best = min(range(len(quantized)), key=lambda i: errors[i])
    return (quantized[best],), False


def measure(policy: CommPolicy, bucket: torch.Tensor, index: int, keys: Tuple[int, ...], numels: Sequence[int], step: int,
            group, rank: int, block_size: int, fused: bool = True) -> BudgetVerdict:
    """Measure, agree and decide for one bucket (steps 1-3 of the module docstring); rank 0 logs the verdict (collective).

    Args:
        policy: the hook's :class:`~gradcomp.comm.policy.CommPolicy` (its config holds the budget).
        bucket: the bucket's flat gradient (only read); ``keys``, ``numels``: its parameters.
        index, step: the bucket's index and the step (recorded in the verdict).
        group: the bucket's process group (every rank calls this for the same bucket at the same step).
        rank: this rank in ``group``; block_size, fused: the hook's.
    """
    pc = policy.config
    formats = pc.formats
    local = local_errors(bucket, numels, formats, block_size, fused)
    device = bucket.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    errors = agree_errors(local, group, device)
    allowed, met = decide(pc.allowed, errors, pc.error_budget)
    choice = policy.choose(bucket.numel(), allowed)
    verdict = BudgetVerdict(step, keys, tuple((f.name, e) for f, e in zip(formats, errors)), allowed, choice)
    if rank == 0:
        logger.info("gradcomp policy (error budget): %s", verdict.describe(index, bucket.numel(), pc.error_budget))
        if not met:
            logger.warning("gradcomp policy: no candidate of %s meets the error budget %g on bucket %d; using the most accurate, %s",
                           pc.allowed, pc.error_budget, index, candidate_label(choice))
    return verdict
