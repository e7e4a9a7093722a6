"""Activation statistics, observers, calibration and fake quantization of layer inputs.

Activations are made afresh at every forward pass, depend on the input and differ widely from layer
to layer, so they are measured before they are quantized. This module has three parts:

1. **Capture** (:func:`capture_activations`, :func:`analyze_activation_dynamics`): forward hooks on
   chosen modules feed running per-layer statistics (min, max, mean, std, kurtosis, percentiles,
   share of outliers, per-channel ranges, a per-batch trace) without keeping any activation tensor.
   The result is an :class:`ActivationReport` (table rows, JSON, plots in ``gradcomp.plots.activations``).
2. **Observers** with the ``torch.ao`` contract: ``obs(x)`` records ``x`` and returns it unchanged,
   ``obs.calculate_qparams()`` returns ``(scale, zero_point)`` computed by
   :func:`gradcomp.codec.choose_qparams`, and ``state_dict``/``load_state_dict`` round-trip the
   state. Min-max, moving-average min-max, per-channel and per-token min-max, percentile,
   histogram with MSE-optimal clipping and entropy (KL) calibration.
3. **Fake quantization of layer inputs** (:func:`prepare_activation_quant_`, :func:`calibrate_`,
   :func:`convert_activation_quant_`): an :class:`ActivationQuantizer` child and a forward pre-hook
   on every chosen Linear/Conv layer; static scales from calibration or dynamic per-token scales
   computed on the fly; a clipped straight-through gradient so the same wrappers serve
   quantization-aware fine-tuning.

Percentiles over many batches use a fixed-bin histogram (:class:`RunningHistogram`, 2048 bins by
default) that re-bins when a batch falls outside the current range: the old counts are spread over
the new, wider bins by linear interpolation of the cumulative counts (mass assumed uniform within a
bin). A percentile read from it is exact up to the position inside one bin, so its error is at most
one final bin width ``(max - min) / bins`` plus the smearing of the re-binnings, each of which moves
mass by less than one old bin width (also less than one final bin width). ``tests/test_activations.py``
checks the bound against ``torch.quantile`` over the concatenated data.

The quantize-dequantize arithmetic is the codec's (:func:`gradcomp.codec.quantize_codes_with_qparams`
then :func:`gradcomp.codec.dequantize_codes`); nothing here rounds or clamps on its own.

Example::

    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> batches = [torch.randn(8, 16) for _ in range(4)]
    >>> report = analyze_activation_dynamics(model, batches)
    >>> names = prepare_activation_quant_(model, ActQuantConfig(bits=8, observer="mse"))
    >>> calibrate_(model, batches)
    >>> qparams = convert_activation_quant_(model)      # the model now fake-quantizes Linear inputs
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from gradcomp.codec import (
    SUPPORTED_BITS,
    choose_qparams,
    dequantize_codes,
    qrange,
    quantize_codes_with_qparams,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TYPES",
    "default_layer_types",
    "RunningHistogram",
    "LayerStats",
    "ActivationReport",
    "ActivationCapture",
    "capture_activations",
    "analyze_activation_dynamics",
    "run_batches",
    "ActivationObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PerChannelMinMaxObserver",
    "PerTokenMinMaxObserver",
    "PercentileObserver",
    "HistogramObserver",
    "EntropyObserver",
    "OBSERVERS",
    "make_observer",
    "fold_abs_histogram",
    "mse_clip_range",
    "kl_threshold",
    "fake_quantize_with_qparams",
    "fake_quantize_ste",
    "ActQuantConfig",
    "ActivationQuantizer",
    "prepare_activation_quant_",
    "calibrate_",
    "convert_activation_quant_",
    "quantize_activations_",
    "remove_activation_quant_",
    "measure_activation_sqnr",
]

DEFAULT_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TYPES: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_layer_types() -> Tuple[type, ...]:
    """Return the layer classes chosen when ``types`` is None.

    ``nn.Linear`` and ``nn.Conv1d/2d/3d``, plus the packed ``QuantizedLinear`` and ``QuantizedConv2d``
    of :mod:`gradcomp.weights`, so that activation quantization applied after ``weights.quantize_``
    finds the swapped layers (W8A8, W4A8).
    """
    try:
        from gradcomp.weights import QuantizedConv2d, QuantizedLinear
    except ImportError:  # pragma: no cover - weights is part of the package
        return DEFAULT_TYPES
    return DEFAULT_TYPES + (QuantizedLinear, QuantizedConv2d)
_QUANTIZER_ATTR = "input_quantizer"


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _finite_flat(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` flattened as fp32 without its non-finite entries (statistics ignore inf/nan)."""
    flat = x.detach().reshape(-1).float()
    finite = torch.isfinite(flat)
    if bool(finite.all()):
        return flat
    return flat[finite]


def _interp(xq: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``fp(xp)`` at ``xq`` (``xp`` non-decreasing), clamped at the ends."""
    n = xp.numel()
    idx = torch.searchsorted(xp, xq, right=True).clamp(1, n - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    dx = x1 - x0
    t = torch.where(dx > 0, (xq - x0) / torch.where(dx > 0, dx, torch.ones_like(dx)), torch.ones_like(dx))
    out = f0 + t.clamp(0.0, 1.0) * (f1 - f0)
    out = torch.where(xq <= xp[0], fp[0].expand_as(out), out)
    return torch.where(xq >= xp[-1], fp[-1].expand_as(out), out)


# --------------------------------------------------------------------------------------------
# running histogram


class RunningHistogram(nn.Module):
    """Fixed-bin histogram over a range that grows with the data; counts in fp64.

    Steps of :meth:`update`:
        1. Drop non-finite values; find the batch min and max.
        2. If they fall outside ``[lo, hi]``, widen the range to cover them and re-bin the old
           counts onto the new bins by linear interpolation of the cumulative counts at the new
           edges (mass is assumed uniform inside an old bin).
        3. Add ``torch.histc`` of the batch over the (new) range.

    Example: 2048 bins over ``[-4, 12]`` have width ``16 / 2048 = 0.0078``; any percentile read from
    it is within about one such width of the exact one.

    Args:
        bins: number of bins (>= 2).
    """

    def __init__(self, bins: int = 2048):
        super().__init__()
        _check_positive_int("bins", bins, 2)
        self.bins = bins
        self.register_buffer("counts", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("lo", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("hi", torch.tensor(-math.inf, dtype=torch.float64))

    @property
    def total(self) -> float:
        """Number of finite values seen."""
        return float(self.counts.sum())

    @property
    def empty(self) -> bool:
        """Whether no value has been seen yet."""
        return not bool(torch.isfinite(self.lo))

    def edges(self) -> torch.Tensor:
        """Return the ``bins + 1`` bin edges (fp64)."""
        if self.empty:
            raise ValueError("the histogram is empty: update it with at least one finite value first")
        return torch.linspace(float(self.lo), float(self.hi), self.bins + 1, dtype=torch.float64)

    def cdf(self) -> torch.Tensor:
        """Return cumulative counts at the edges (``bins + 1`` values, starting at 0)."""
        return torch.cat([self.counts.new_zeros(1), torch.cumsum(self.counts, 0)])

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the finite values of ``x`` (any shape) to the histogram."""
        flat = _finite_flat(x)
        if flat.numel() == 0:
            return
        bmin, bmax = torch.aminmax(flat)
        bmin, bmax = float(bmin), float(bmax)
        lo, hi = float(self.lo), float(self.hi)
        new_lo, new_hi = min(lo, bmin), max(hi, bmax)
        if new_hi <= new_lo:
            # a constant tensor: give the range a tiny width so that bins are defined
            new_hi = new_lo + max(abs(new_lo) * 1e-6, 1e-12)
        if (new_lo, new_hi) != (lo, hi):
            if not self.empty and self.total > 0:
                new_edges = torch.linspace(new_lo, new_hi, self.bins + 1, dtype=torch.float64)
                cdf_new = _interp(new_edges, self.edges(), self.cdf())
                moved = torch.diff(cdf_new)
                # differences of large cumulative sums leave round-off dust in empty bins: drop it
                self.counts.copy_(torch.where(moved > 1e-9 * float(cdf_new[-1]), moved, 0.0))
            self.lo.fill_(new_lo)
            self.hi.fill_(new_hi)
        hist = torch.histc(flat, bins=self.bins, min=float(self.lo), max=float(self.hi))
        self.counts.add_(hist.double())

    def quantile(self, q: Union[float, torch.Tensor]) -> torch.Tensor:
        """Return the values below which a share ``q`` (in [0, 1]) of the mass lies (fp64 tensor)."""
        qt = torch.as_tensor(q, dtype=torch.float64)
        if bool(((qt < 0) | (qt > 1)).any()):
            raise ValueError(f"quantiles must lie in [0, 1], got {q}")
        cdf = self.cdf()
        return _interp(qt.reshape(-1) * cdf[-1], cdf, self.edges()).reshape(qt.shape)

    def mass_between(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Return the (interpolated) counts in ``[a, b]`` for tensors of bounds."""
        cdf, edges = self.cdf(), self.edges()
        return _interp(b.double(), edges, cdf) - _interp(a.double(), edges, cdf)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "counts"
        if key in state_dict and state_dict[key].shape != self.counts.shape:
            self.bins = int(state_dict[key].numel())
            self.counts = torch.zeros_like(state_dict[key], dtype=torch.float64)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bins={self.bins}"


def fold_abs_histogram(hist: RunningHistogram, bins: Optional[int] = None) -> Tuple[torch.Tensor, float]:
    """Fold a signed histogram into a histogram of ``|x|`` over ``[0, max|x|]``.

    The mass with ``|x| <= u`` is ``CDF(u) - CDF(-u)``, read by interpolation at the new edges.

    Example: a histogram of values in ``[-1, 3]`` folds onto ``[0, 3]``; the bin ``[0, 0.5]`` of the
    folded histogram holds the mass of ``[-0.5, 0.5]``.

    Args:
        hist: a non-empty :class:`RunningHistogram`.
        bins: bins of the folded histogram (default: those of ``hist``).

    Returns:
        ``(counts (bins,) fp64, max|x|)``.
    """
    bins = hist.bins if bins is None else bins
    amax = max(abs(float(hist.lo)), abs(float(hist.hi)))
    if amax == 0.0:
        amax = 1e-12
    u = torch.linspace(0.0, amax, bins + 1, dtype=torch.float64)
    inside = hist.mass_between(-u, u)
    inside[-1] = hist.total
    return torch.diff(inside).clamp_min(0.0), amax


# --------------------------------------------------------------------------------------------
# range searches on histograms


def _check_counts(counts: torch.Tensor) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.numel() < 1:
        raise ValueError(f"counts must be a non-empty 1-D tensor, got {getattr(counts, 'shape', type(counts).__name__)}")
    c = counts.double()
    if bool((c < 0).any()) or not bool(torch.isfinite(c).all()):
        raise ValueError("counts must be finite and non-negative")
    return c


def _tail_sums(counts: torch.Tensor, centers: torch.Tensor, width: float):
    """Suffix sums over bins i >= k of n, n*c and n*(c^2 + w^2/12), for k = 0..B (B+1 values each)."""
    zero = counts.new_zeros(1)

    def suffix(v):
        return torch.cat([torch.flip(torch.cumsum(torch.flip(v, [0]), 0), [0]), zero])

    return suffix(counts), suffix(counts * centers), suffix(counts * (centers * centers + width * width / 12.0))


def mse_clip_range(
    counts: torch.Tensor,
    lo: float,
    hi: float,
    bits: int,
    symmetric: bool,
    max_candidates: int = 256,
    refine: int = 16,
    points_per_bin: int = 8,
) -> Tuple[float, float, float]:
    """Find the clipping range with the least expected squared quantization error on a histogram.

    Model: mass is uniform inside each bin. Clipping at ``[a, b]`` costs
    ``sum_{bins right of b} n E[(x - b)^2] + sum_{bins left of a} n E[(x - a)^2]`` (exact under that
    model, through suffix/prefix sums of ``n``, ``n c`` and ``n (c^2 + w^2/12)``), and the values
    inside cost the rounding noise ``N_in * step^2 / 12`` with ``step = scale`` of the codec
    (``max(|a|, b) / qmax`` symmetric, ``(b - a) / (2^bits - 1)`` asymmetric).

    Steps:
        1. Symmetric: candidates ``t`` are the edges of the histogram (``lo`` must be >= 0: pass a
           histogram of ``|x|``, see :func:`fold_abs_histogram`); the range is ``[-t, t]``.
           Asymmetric: candidate lows are the edges <= 0 (or 0 when ``lo > 0``), candidate highs
           the edges >= 0 (or 0 when ``hi < 0``), all pairs on a grid.
        2. At most ``max_candidates`` evenly spaced candidates per side (all of them for a small
           histogram); every candidate is evaluated at once with the closed form above.
        3. The ``step^2 / 12`` noise model is only right when the step is small against the shape
           of the distribution, so the ``refine`` best candidates are re-ranked by their actual
           error: evenly spaced points in every bin (``points_per_bin`` or more, at least 8 per
           quantization step, at most 64 per bin), weighted by the bin's count, are fake-quantized
           by the codec with each candidate's ``choose_qparams`` scales.
        4. Return the best (``refine=0``: the closed-form argmin).

    Example: 1000 values at 0..1 plus one outlier at 100, 4 bits symmetric: min-max gives a step of
    100/7 = 14.3 and an error of about 17 per value; clipping near 1 gives a step of 1/7 and an
    error dominated by the outlier's ``99^2 / 1001 = 9.8``, so the search clips.

    Args:
        counts: ``(B,)`` histogram counts over ``[lo, hi]``.
        lo, hi: range of the histogram (``lo < hi``).
        bits: code width.
        symmetric: codec scales without (True) or with a zero point.
        max_candidates: cap on candidates per side.
        refine: candidates re-ranked by their actual quantization error (0: none).
        points_per_bin: least points per bin for that re-ranking.

    Returns:
        ``(clip_lo, clip_hi, expected mse per value)`` (the re-ranked error when ``refine > 0``).
    """
    _check_bits(bits)
    c = _check_counts(counts)
    if not hi > lo:
        raise ValueError(f"the histogram range must satisfy lo < hi, got lo={lo}, hi={hi}")
    _check_positive_int("max_candidates", max_candidates, 2)
    _check_positive_int("refine", refine, 0)
    _check_positive_int("points_per_bin", points_per_bin, 1)
    total = float(c.sum())
    if total == 0:
        return float(lo), float(hi), 0.0
    nb = c.numel()
    edges = torch.linspace(lo, hi, nb + 1, dtype=torch.float64)
    width = (hi - lo) / nb
    centers = 0.5 * (edges[:-1] + edges[1:])
    r0, r1, r2 = _tail_sums(c, centers, width)
    # prefix sums over bins i < j: totals minus suffix sums
    l0, l1, l2 = r0[0] - r0, r1[0] - r1, r2[0] - r2
    qmin, qmax, _ = qrange(bits, symmetric)

    def pick(idx: torch.Tensor) -> torch.Tensor:
        if idx.numel() <= max_candidates:
            return idx
        sel = torch.linspace(0, idx.numel() - 1, max_candidates).round().long()
        return idx[sel].unique()

    if symmetric:
        if lo < 0:
            raise ValueError(f"symmetric search needs a histogram of |x| (lo >= 0), got lo={lo}; use fold_abs_histogram")
        k = pick(torch.arange(1, nb + 1))
        t = edges[k]
        right = r2[k] - 2 * t * r1[k] + t * t * r0[k]
        step = t / qmax
        err = right + (total - r0[k]) * step * step / 12.0
        lows, highs = -t, t
    else:
        n_levels = float(qmax - qmin)
        j_idx = torch.nonzero(edges <= 0).reshape(-1)
        k_idx = torch.nonzero(edges >= 0).reshape(-1)
        j_idx = pick(j_idx) if j_idx.numel() else torch.tensor([0])
        k_idx = pick(k_idx) if k_idx.numel() else torch.tensor([nb])
        a = torch.clamp(edges[j_idx], max=0.0)  # lo > 0: a = 0 clips nothing on the left
        b = torch.clamp(edges[k_idx], min=0.0)
        left = l2[j_idx] - 2 * a * l1[j_idx] + a * a * l0[j_idx]
        if lo > 0:
            left = torch.zeros_like(left)
        right = r2[k_idx] - 2 * b * r1[k_idx] + b * b * r0[k_idx]
        if hi < 0:
            right = torch.zeros_like(right)
        n_left = l0[j_idx] if lo <= 0 else torch.zeros_like(a)
        n_right = r0[k_idx] if hi >= 0 else torch.zeros_like(b)
        step = (b.unsqueeze(0) - a.unsqueeze(1)) / n_levels
        n_in = total - n_left.unsqueeze(1) - n_right.unsqueeze(0)
        err = (left.unsqueeze(1) + right.unsqueeze(0) + n_in * step * step / 12.0).reshape(-1)
        lows = a.repeat_interleave(b.numel())
        highs = b.repeat(a.numel())
    if refine <= 0:
        best = int(torch.argmin(err))
        return float(lows[best]), float(highs[best]), float(err[best]) / total
    top = torch.topk(err, min(refine, err.numel()), largest=False).indices
    lows, highs = lows[top], highs[top]
    scale, zp = choose_qparams(lows.float(), highs.float(), bits, symmetric)
    # quadrature points inside every bin, at least 8 per quantization step so that the rounding
    # error is integrated rather than aliased; one row per candidate, quantized per row by the codec
    min_step = float(scale[scale > 0].min()) if bool((scale > 0).any()) else width
    per_bin = int(min(64, max(points_per_bin, math.ceil(8 * width / min_step))))
    offs = (torch.arange(per_bin, dtype=torch.float64) + 0.5) / per_bin
    pts = (edges[:-1].unsqueeze(1) + width * offs.unsqueeze(0)).reshape(-1).float()
    wts = (c / per_bin).repeat_interleave(per_bin)
    rows = pts.unsqueeze(0).expand(top.numel(), -1).contiguous()
    deq = fake_quantize_with_qparams(rows, scale, zp, bits, axis=0)
    real = (((rows.double() - deq.double()) ** 2) * wts).sum(dim=1)
    best = int(torch.argmin(real))
    return float(lows[best]), float(highs[best]), float(real[best]) / total


def _smooth_counts(h: torch.Tensor, keep: torch.Tensor, eps: float) -> torch.Tensor:
    """Give every empty kept bin ``eps`` counts, taken evenly from the non-empty ones (MXNet's smoothing).

    The counts are histogram counts (about 1 per value), so ``eps = 1e-4`` moves a negligible mass;
    re-binned histograms can hold tiny fractional counts, hence the clamp that keeps them positive.
    """
    zeros = (h == 0) & keep
    nonzeros = (h != 0) & keep
    take = eps * zeros.sum(dim=1, keepdim=True) / nonzeros.sum(dim=1, keepdim=True).clamp_min(1)
    smoothed = torch.where(zeros, eps, torch.where(nonzeros, (h - take).clamp_min(eps * 1e-3), h))
    return torch.where(keep, smoothed, 0.0)


def _kl_candidates(c: torch.Tensor, cand: torch.Tensor, levels: int, eps: float = 1e-4) -> torch.Tensor:
    """KL(P || Q) of every candidate in ``cand`` (number of bins kept), as a ``(len(cand),)`` tensor."""
    nb = c.numel()
    n_cand = cand.numel()
    j = torch.arange(nb)
    keep = j.unsqueeze(0) < cand.unsqueeze(1)  # (C, B)
    sliced = torch.where(keep, c.unsqueeze(0), 0.0)
    tail = torch.flip(torch.cumsum(torch.flip(c, [0]), 0), [0])  # mass of bins >= j
    outliers = torch.where(cand < nb, tail[cand.clamp(max=nb - 1)], 0.0)
    p = sliced.clone()
    p[torch.arange(n_cand), cand - 1] += outliers
    group = torch.clamp(j.unsqueeze(0) // (cand // levels).unsqueeze(1), max=levels - 1)
    flat_group = (group + torch.arange(n_cand).unsqueeze(1) * levels).reshape(-1)
    nonempty = sliced > 0
    gsum = torch.zeros(n_cand * levels, dtype=torch.float64).index_add_(0, flat_group, sliced.reshape(-1))
    gcnt = torch.zeros(n_cand * levels, dtype=torch.float64).index_add_(0, flat_group, nonempty.reshape(-1).double())
    q = torch.where(nonempty, (gsum / gcnt.clamp_min(1.0))[flat_group].reshape(n_cand, nb), 0.0)
    p = _smooth_counts(p, keep, eps)
    q = _smooth_counts(q, keep, eps)
    p = p / p.sum(dim=1, keepdim=True)
    q = q / q.sum(dim=1, keepdim=True)
    terms = torch.where(keep, p * torch.log(torch.where(keep, p, 1.0) / torch.where(keep, q, 1.0)), 0.0)
    return terms.sum(dim=1)


def kl_threshold(
    abs_counts: torch.Tensor,
    amax: float,
    levels: int = 128,
    max_candidates: int = 256,
    eps: float = 1e-4,
) -> Tuple[float, torch.Tensor, torch.Tensor]:
    """Find the ``|x|`` threshold whose quantized distribution is closest in KL to the clipped one.

    This is the entropy calibration of TensorRT. For a candidate ``i`` (bins kept, ``levels <= i <= B``):
        1. ``P`` = the first ``i`` bins, with the mass of all later bins added to bin ``i - 1``.
        2. ``Q`` = the first ``i`` bins merged into ``levels`` groups of ``m = i // levels``
           consecutive bins (the last group takes the remainder), each group's mass spread evenly
           over its non-empty bins.
        3. Smooth both (MXNet/TensorRT style, on counts: every empty kept bin gets ``eps``
           counts, taken evenly from the non-empty ones), so that a candidate whose last kept bin
           is empty while mass lies beyond it (a gap before far outliers) gets a finite divergence;
           normalise; ``KL(P || Q) = sum P log(P / Q)``.
    The threshold is the upper edge of bin ``i - 1`` of the best ``i``. Candidates are evaluated
    together as a ``(candidates, B)`` matrix. When there are more than ``max_candidates`` of them, a
    coarse pass over ``max_candidates`` evenly spaced ones is followed by a fine pass over every
    candidate within one coarse step of the coarse best (two passes instead of ``B - levels + 1``
    evaluations; a small histogram is searched exhaustively).

    Example: for a Gaussian with a few outliers at 50 sigma and 8-bit symmetric codes (128 levels)
    the threshold lands near 4 to 6 standard deviations instead of at the outliers.

    Args:
        abs_counts: ``(B,)`` histogram of ``|x|`` over ``[0, amax]``.
        amax: the histogram's upper end.
        levels: quantization levels on ``[0, t]`` (``2**(bits-1)`` for the codec's symmetric codes).
        max_candidates: candidates per pass.
        eps: smoothing counts for empty bins.

    Returns:
        ``(threshold, candidates, kl)``: the evaluated candidates (bins kept, ascending) and their KL.
    """
    c = _check_counts(abs_counts)
    _check_positive_int("levels", levels, 2)
    _check_positive_int("max_candidates", max_candidates, 2)
    if not amax > 0:
        raise ValueError(f"amax must be positive, got {amax}")
    nb = c.numel()
    if nb <= levels or float(c.sum()) == 0:
        return float(amax), torch.tensor([nb]), torch.zeros(1, dtype=torch.float64)
    width = amax / nb
    cand = torch.arange(levels, nb + 1)
    if cand.numel() > max_candidates:
        coarse = torch.linspace(levels, nb, max_candidates).round().long().unique()
        kl_coarse = _kl_candidates(c, coarse, levels, eps)
        best = int(coarse[int(torch.argmin(kl_coarse))])
        step = int(math.ceil((nb - levels) / (max_candidates - 1)))
        fine = torch.arange(max(levels, best - step), min(nb, best + step) + 1)
        cand = torch.cat([coarse, fine]).unique()
        kl = torch.cat([kl_coarse, _kl_candidates(c, fine, levels, eps)])
        order = torch.cat([coarse, fine])
        # keep one value per candidate (the fine pass repeats some coarse ones with equal results)
        kl = torch.full((cand.numel(),), math.inf, dtype=torch.float64).scatter_reduce(
            0, torch.searchsorted(cand, order), kl, reduce="amin"
        )
    else:
        kl = _kl_candidates(c, cand, levels, eps)
    best_i = int(cand[int(torch.argmin(kl))])
    return float(best_i * width), cand, kl


# --------------------------------------------------------------------------------------------
# observers


class ActivationObserver(nn.Module):
    """Base of the observers: ``forward(x)`` records ``x`` and returns it; ``calculate_qparams()``.

    Subclasses implement ``_observe(x)`` and ``clip_range() -> (lo, hi)``; the scales always come
    from :func:`gradcomp.codec.choose_qparams`, which widens the range to contain 0.

    Args:
        bits: code width, one of ``SUPPORTED_BITS``.
        symmetric: codec scales without a zero point (True) or with one (False).
    """

    def __init__(self, bits: int = 8, symmetric: bool = False):
        super().__init__()
        _check_bits(bits)
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
        self.bits = bits
        self.symmetric = symmetric

    @property
    def axis(self) -> Optional[int]:
        """Axis the scales run along (None: one scale for the whole tensor)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``x`` (detached) and return it unchanged."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"observers take floating tensors, got {type(x).__name__} {getattr(x, 'dtype', '')}")
        with torch.no_grad():
            self._observe(x.detach())
        return x

    def _observe(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def clip_range(self) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """Return the float range ``(lo, hi)`` that the scales must cover."""
        raise NotImplementedError

    @property
    def has_data(self) -> bool:
        """Whether the observer has seen any finite value."""
        return bool(torch.isfinite(self.min_val).all()) and self.min_val.numel() > 0

    def calculate_qparams(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return ``(scale, zero_point)`` from :func:`gradcomp.codec.choose_qparams` over the clip range.

        ``zero_point`` is None for symmetric observers (the codec's convention).

        Raises:
            ValueError: if the observer has not seen any data.
        """
        if not self.has_data:
            raise ValueError(f"{type(self).__name__} has seen no finite data; run calibration batches through it first")
        lo, hi = self.clip_range()
        return choose_qparams(lo.float(), hi.float(), self.bits, self.symmetric)

    def reset(self) -> None:
        """Forget everything observed."""
        for name, buf in self._buffers.items():
            if name in ("min_val", "max_val"):
                self._buffers[name] = torch.full_like(buf, math.inf if name == "min_val" else -math.inf)
        for child in self.children():
            if isinstance(child, RunningHistogram):
                child.counts.zero_()
                child.lo.fill_(math.inf)
                child.hi.fill_(-math.inf)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # per-channel / per-token buffers change shape with the data: take the stored shape
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], dtype=buf.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}"


def _widen_range(observer: nn.Module, flat: torch.Tensor) -> None:
    """Widen ``observer.min_val``/``max_val`` to cover the finite values ``flat``."""
    lo, hi = torch.aminmax(flat)
    observer.min_val = torch.minimum(observer.min_val, lo)
    observer.max_val = torch.maximum(observer.max_val, hi)


class MinMaxObserver(ActivationObserver):
    """Track the running min and max over every batch.

    Example: batches ``[-1, 2]`` then ``[0, 3]`` give the range ``[-1, 3]``; 8 bits asymmetric:
    ``scale = 4 / 255 = 0.01569``, ``zero_point = round(1 / 0.01569) = 64``.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False):
        super().__init__(bits, symmetric)
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))

    def _observe(self, x: torch.Tensor) -> None:
        flat = _finite_flat(x)
        if flat.numel() == 0:
            return
        _widen_range(self, flat)

    def clip_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the observed ``(min, max)``."""
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max.

    The first batch sets the range; later ones move it by ``c * (batch - range)``.

    Example: ``c = 0.5``, batch ranges ``[-1, 1]`` then ``[-3, 5]`` give ``[-2, 3]``.

    Args:
        averaging_constant: ``c`` in (0, 1].
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, averaging_constant: float = 0.01):
        super().__init__(bits, symmetric)
        if not 0.0 < float(averaging_constant) <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = float(averaging_constant)

    def _observe(self, x: torch.Tensor) -> None:
        flat = _finite_flat(x)
        if flat.numel() == 0:
            return
        lo, hi = torch.aminmax(flat)
        if not self.has_data:
            self.min_val, self.max_val = lo.clone(), hi.clone()
            return
        c = self.averaging_constant
        self.min_val = self.min_val + c * (lo - self.min_val)
        self.max_val = self.max_val + c * (hi - self.max_val)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, averaging_constant={self.averaging_constant}"


def _channel_minmax(x: torch.Tensor, axis: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` over every axis but ``axis`` (non-finite values ignored)."""
    xf = x.detach().float().movedim(axis, 0).reshape(x.shape[axis], -1)
    finite = torch.isfinite(xf)
    if bool(finite.all()):
        return torch.aminmax(xf, dim=1)
    lo = torch.where(finite, xf, torch.full_like(xf, math.inf)).amin(dim=1)
    hi = torch.where(finite, xf, torch.full_like(xf, -math.inf)).amax(dim=1)
    return lo, hi


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor with {ndim} dims")
    return axis % ndim


class PerChannelMinMaxObserver(ActivationObserver):
    """Track min and max per channel along ``axis`` (``-1``: the feature axis of Linear inputs).

    Example: ``x = [[1, -2], [3, 4]]`` with ``axis=-1`` gives channel ranges ``[1, 3]`` and ``[-2, 4]``.

    Args:
        axis: channel axis (-1 for Linear inputs ``(..., features)``, 1 for Conv inputs ``(N, C, ...)``).
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int = -1):
        super().__init__(bits, symmetric)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        self._axis = axis
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    @property
    def axis(self) -> Optional[int]:
        return self._axis

    @property
    def has_data(self) -> bool:
        return self.min_val.numel() > 0 and bool(torch.isfinite(self.min_val).any())

    def _observe(self, x: torch.Tensor) -> None:
        ax = _norm_axis(self._axis, x.dim())
        lo, hi = _channel_minmax(x, ax)
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo, hi
            return
        if lo.numel() != self.min_val.numel():
            raise ValueError(f"expected {self.min_val.numel()} channels along axis {self._axis}, got {lo.numel()}")
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    @property
    def unseen_channels(self) -> torch.Tensor:
        """Indices of the channels that never held a finite value during calibration."""
        return torch.nonzero(~torch.isfinite(self.min_val)).reshape(-1)

    def clip_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return per-channel ``(min, max)``.

        A channel never seen finite (e.g. the feature of an element absent from the calibration set)
        gets the widest range seen on any channel, not ``[0, 0]``: a zero range would clip every later
        value there to 0. With no finite channel at all the range is ``[0, 0]``.
        """
        seen = torch.isfinite(self.min_val)
        if bool(seen.any()):
            wide_lo, wide_hi = self.min_val[seen].min(), self.max_val[seen].max()
        else:
            wide_lo = wide_hi = torch.zeros((), dtype=self.min_val.dtype, device=self.min_val.device)
        lo = torch.where(seen, self.min_val, wide_lo)
        hi = torch.where(seen, self.max_val, wide_hi)
        return lo, hi

    def extra_repr(self) -> str:
        unseen = int((~torch.isfinite(self.min_val)).sum()) if self.min_val.numel() else 0
        note = f", unseen_channels={unseen} (given the widest seen range)" if unseen else ""
        return f"{super().extra_repr()}, axis={self._axis}{note}"


class PerTokenMinMaxObserver(ActivationObserver):
    """Ranges of the latest tensor, one per token (a row along the last axis): dynamic quantization.

    Tokens change with every input, so nothing is accumulated across batches: ``calculate_qparams``
    returns scales of shape ``x.shape[:-1] + (1,)`` for the tensor seen last, which broadcast
    against it. This is what dynamic per-token activation quantization computes on the fly.

    Example: ``x = [[1, -2], [3, 4]]`` gives token ranges ``[-2, 1]`` and ``[3, 4]``; 8 bits
    symmetric scales ``[2/127, 4/127]``.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False):
        super().__init__(bits, symmetric)
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    @property
    def has_data(self) -> bool:
        return self.min_val.numel() > 0 and bool(torch.isfinite(self.min_val).all())

    def _observe(self, x: torch.Tensor) -> None:
        xf = x.float()
        finite = torch.isfinite(xf)
        if bool(finite.all()):
            lo, hi = torch.aminmax(xf, dim=-1, keepdim=True)
        else:
            lo = torch.where(finite, xf, torch.full_like(xf, math.inf)).amin(dim=-1, keepdim=True)
            hi = torch.where(finite, xf, torch.full_like(xf, -math.inf)).amax(dim=-1, keepdim=True)
            lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
            hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
        self.min_val, self.max_val = lo, hi

    def clip_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return per-token ``(min, max)`` of the latest tensor, shaped ``x.shape[:-1] + (1,)``."""
        return self.min_val, self.max_val


class _HistogramBase(ActivationObserver):
    """An observer over a :class:`RunningHistogram` (plus the exact running min and max)."""

    def __init__(self, bits: int = 8, symmetric: bool = False, bins: int = 2048):
        super().__init__(bits, symmetric)
        self.histogram = RunningHistogram(bins)
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))

    def _observe(self, x: torch.Tensor) -> None:
        flat = _finite_flat(x)
        if flat.numel() == 0:
            return
        _widen_range(self, flat)
        self.histogram.update(flat)


class PercentileObserver(_HistogramBase):
    """Clip at the ``100 - p`` and ``p`` percentiles of everything observed.

    Symmetric observers clip ``|x|`` at its ``p`` percentile instead.

    Example: ``p = 99.9`` over a million values ignores the 1000 most extreme on each side.

    Args:
        percentile: ``p`` in (50, 100].
        bins: histogram bins.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, percentile: float = 99.99, bins: int = 2048):
        super().__init__(bits, symmetric, bins)
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)

    def clip_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the percentile range (within the observed min/max)."""
        p = self.percentile / 100.0
        if self.symmetric:
            counts, amax = fold_abs_histogram(self.histogram)
            cdf = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
            edges = torch.linspace(0.0, amax, counts.numel() + 1, dtype=torch.float64)
            t = _interp(torch.tensor([p * float(cdf[-1])], dtype=torch.float64), cdf, edges)[0]
            return torch.maximum(self.min_val, -t.float()), torch.minimum(self.max_val, t.float())
        q = self.histogram.quantile(torch.tensor([1.0 - p, p], dtype=torch.float64)).float()
        return torch.maximum(self.min_val, q[0]), torch.minimum(self.max_val, q[1])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, percentile={self.percentile}, bins={self.histogram.bins}"


class HistogramObserver(_HistogramBase):
    """Clip where the expected quantization MSE over the histogram is least (see :func:`mse_clip_range`).

    Example: for a Gaussian at 4 bits the search clips near 2.5 standard deviations; at 8 bits near
    4, and a handful of far outliers no longer sets the scale.

    Args:
        bins: histogram bins.
        max_candidates: candidates per side of the range search.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, bins: int = 2048, max_candidates: int = 256):
        super().__init__(bits, symmetric, bins)
        _check_positive_int("max_candidates", max_candidates, 2)
        self.max_candidates = max_candidates

    def clip_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the MSE-optimal range."""
        h = self.histogram
        if self.symmetric:
            counts, amax = fold_abs_histogram(h)
            _, t, _ = mse_clip_range(counts, 0.0, amax, self.bits, True, self.max_candidates)
            return torch.maximum(self.min_val, torch.tensor(-t)), torch.minimum(self.max_val, torch.tensor(t))
        a, b, _ = mse_clip_range(h.counts, float(h.lo), float(h.hi), self.bits, False, self.max_candidates)
        return torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.histogram.bins}, method=mse"


class EntropyObserver(_HistogramBase):
    """Clip ``|x|`` at the threshold of least KL divergence (entropy calibration, :func:`kl_threshold`).

    The threshold ``t`` is found on the folded histogram of ``|x|`` with ``2**(bits-1)`` levels; the
    range is ``[max(min, -t), min(max, t)]``, so one-sided activations keep their sign.

    Example: 8-bit KL calibration of a Gaussian with rare outliers at 50 sigma clips near 4 to 5
    sigma.
    """

    def clip_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the KL-optimal range."""
        counts, amax = fold_abs_histogram(self.histogram)
        t, _, _ = kl_threshold(counts, amax, levels=1 << (self.bits - 1))
        tt = torch.tensor(t, dtype=torch.float32)
        return torch.maximum(self.min_val, -tt), torch.minimum(self.max_val, tt)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.histogram.bins}, method=kl"


OBSERVERS: Dict[str, type] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "per_channel": PerChannelMinMaxObserver,
    "per_token": PerTokenMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": HistogramObserver,
    "kl": EntropyObserver,
}


def make_observer(name: str, bits: int = 8, symmetric: bool = False, **kwargs: Any) -> ActivationObserver:
    """Build an observer by name: one of ``OBSERVERS`` (``minmax``, ``moving_average``, ``per_channel``,
    ``per_token``, ``percentile``, ``mse``, ``kl``), with extra keyword arguments for its constructor.

    Example: ``make_observer("percentile", bits=8, percentile=99.9)``.
    """
    if name not in OBSERVERS:
        raise ValueError(f"observer must be one of {sorted(OBSERVERS)}, got {name!r}")
    return OBSERVERS[name](bits=bits, symmetric=symmetric, **kwargs)


# --------------------------------------------------------------------------------------------
# fake quantization


def _as_blocks(x: torch.Tensor, scale: torch.Tensor, axis: Optional[int]) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """View ``x`` as codec blocks matching ``scale``; return blocks and the inverse reshape."""
    if axis is not None:
        ax = _norm_axis(axis, x.dim())
        if scale.numel() != x.shape[ax]:
            raise ValueError(f"per-channel scale needs {x.shape[ax]} entries for axis {axis}, got {scale.numel()}")
        moved = x.movedim(ax, 0)
        shape = moved.shape
        return moved.reshape(shape[0], -1), lambda y: y.reshape(shape).movedim(0, ax)
    if scale.numel() == 1:
        return x.reshape(1, -1), lambda y: y.reshape(x.shape)
    if tuple(scale.shape) == tuple(x.shape[:-1]) + (1,):  # per token
        return x.reshape(-1, x.shape[-1]), lambda y: y.reshape(x.shape)
    raise ValueError(
        f"scale must have 1 entry, x.shape[:-1] + (1,) = {tuple(x.shape[:-1]) + (1,)} entries (per token), or be "
        f"per channel with an axis; got shape {tuple(scale.shape)} for x of shape {tuple(x.shape)}"
    )


def fake_quantize_with_qparams(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bits: int,
    axis: Optional[int] = None,
) -> torch.Tensor:
    """Quantize ``x`` with given scales and dequantize it again, through the codec.

    Per tensor (one scale), per channel (``axis`` given, one scale per entry along it) or per token
    (scale of shape ``x.shape[:-1] + (1,)``). The codes are those of
    :func:`gradcomp.codec.quantize_codes_with_qparams`, mapped back by
    :func:`gradcomp.codec.dequantize_codes`, so with the scale the codec would pick itself the result
    equals ``gradcomp.codec.fake_quantize(x, bits, block_size=x.numel(), symmetric=...)`` bit for bit.

    Example: ``x = [0.5, -1.0, 0.25]``, ``scale = 1/7``, no zero point, 4 bits ->
    ``round([3.5, -7, 1.75]) = [4, -7, 2]`` -> ``[0.5714, -1.0, 0.2857]``.

    Args:
        x: floating tensor.
        scale: scales (see above).
        zero_point: integral zero points of the shape of ``scale``, or None (symmetric codes).
        bits: code width.
        axis: channel axis for per-channel scales.

    Returns:
        A tensor of ``x``'s shape and dtype.
    """
    _check_bits(bits)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    xb, back = _as_blocks(x, scale, axis)
    s = scale.reshape(-1).float()
    zp = None if zero_point is None else zero_point.reshape(-1).float()
    codes = quantize_codes_with_qparams(xb, s, zp, bits)
    return back(dequantize_codes(codes, s, zp, bits)).to(x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization with a clipped straight-through gradient."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, bits, axis):
        out = fake_quantize_with_qparams(x, scale, zero_point, bits, axis)
        ctx.save_for_backward(_ste_mask(x, scale, zero_point, bits, axis))
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def _ste_mask(
    x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], bits: int, axis: Optional[int]
) -> torch.Tensor:
    """Return where the code ``round(x / s) + zp`` lies inside ``[qmin, qmax]`` (the values the clamp keeps).

    The test is made on the codes, as the forward makes them, not on the float range
    ``[(qmin - zp) s, (qmax - zp) s]``: a row's own min or max can round onto ``qmin``/``qmax`` while
    lying a hair outside that float range (the zero point is rounded), and must keep its gradient.
    """
    qmin, qmax, _ = qrange(bits, zero_point is None)
    s = scale.float()
    z = None if zero_point is None else zero_point.float()
    if axis is not None:
        shape = [1] * x.dim()
        shape[_norm_axis(axis, x.dim())] = -1
        s = s.reshape(shape)
        z = None if z is None else z.reshape(shape)
    elif s.numel() == 1:
        s = s.reshape(())
        z = None if z is None else z.reshape(())
    # the codec divides by 1 where a scale is 0 (see quantize_codes_with_qparams)
    code = torch.round(x.detach().float() / torch.where(s == 0, torch.ones_like(s), s))
    if z is not None:
        code = code + z
    return (code >= qmin) & (code <= qmax)


def fake_quantize_ste(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bits: int,
    axis: Optional[int] = None,
) -> torch.Tensor:
    """:func:`fake_quantize_with_qparams` with a clipped straight-through gradient.

    Forward: the codec's quantize-dequantize. Backward: ``dL/dx = dL/dy`` where the code
    ``round(x / scale) + zp`` lies inside ``[qmin, qmax]`` and 0 where the clamp cut it off, the rule of
    ``torch.fake_quantize_per_tensor_affine``. Scales get no gradient.

    Example: 8 bits symmetric with ``scale = 0.01`` passes the gradient for ``|x| < 1.275`` (codes up to
    127) only; per-token scales from each row's own range pass it everywhere, row extremes included.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        # inference and calibration: no gradient mask to build
        return fake_quantize_with_qparams(x, scale, zero_point, bits, axis)
    return _FakeQuantSTE.apply(x, scale, zero_point, bits, axis)


# --------------------------------------------------------------------------------------------
# activation quantization of layer inputs


_STATIC_OBSERVERS = ("minmax", "moving_average", "per_channel", "percentile", "mse", "kl")
_DYNAMIC_GRANULARITIES = ("per_token", "per_tensor")


@dataclass(frozen=True)
class ActQuantConfig:
    """How to quantize the inputs of the chosen layers.

    Args:
        bits: code width, one of ``SUPPORTED_BITS``.
        observer: for static quantization, one of ``minmax``, ``moving_average``, ``per_channel``,
            ``percentile``, ``mse``, ``kl``.
        symmetric: codec scales without a zero point (True) or affine with one (False).
        dynamic: compute scales on the fly from each input instead of from calibration.
        granularity: for dynamic quantization, ``per_token`` (one scale per row of the last axis)
            or ``per_tensor``.
        percentile: ``p`` of the percentile observer.
        bins: histogram bins of the percentile, mse and kl observers.
        averaging_constant: of the moving-average observer.

    Example: ``ActQuantConfig(bits=8, observer="kl")`` (static) or
    ``ActQuantConfig(bits=8, dynamic=True, granularity="per_token")``.
    """

    bits: int = 8
    observer: str = "minmax"
    symmetric: bool = False
    dynamic: bool = False
    granularity: str = "per_token"
    percentile: float = 99.99
    bins: int = 2048
    averaging_constant: float = 0.01

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.observer not in _STATIC_OBSERVERS:
            raise ValueError(f"observer must be one of {_STATIC_OBSERVERS}, got {self.observer!r}")
        for name in ("symmetric", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.granularity not in _DYNAMIC_GRANULARITIES:
            raise ValueError(f"granularity must be one of {_DYNAMIC_GRANULARITIES}, got {self.granularity!r}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        _check_positive_int("bins", self.bins, 2)
        if not 0.0 < float(self.averaging_constant) <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {self.averaging_constant}")

    @property
    def label(self) -> str:
        """Short name, e.g. ``A8 kl`` or ``A8 dynamic per_token``."""
        if self.dynamic:
            return f"A{self.bits} dynamic {self.granularity}"
        return f"A{self.bits} {self.observer}"

    def make_observer(self, channel_axis: int = -1) -> ActivationObserver:
        """Build the observer this config names (``channel_axis`` for the per-channel one)."""
        kwargs: Dict[str, Any] = {}
        if self.observer == "per_channel":
            kwargs["axis"] = channel_axis
        elif self.observer == "percentile":
            kwargs.update(percentile=self.percentile, bins=self.bins)
        elif self.observer in ("mse", "kl"):
            kwargs["bins"] = self.bins
        elif self.observer == "moving_average":
            kwargs["averaging_constant"] = self.averaging_constant
        return make_observer(self.observer, self.bits, self.symmetric, **kwargs)


class ActivationQuantizer(nn.Module):
    """Fake-quantize a layer input: observe while calibrating, then quantize with frozen scales.

    States: ``calibrating`` (static, before :meth:`freeze`: records inputs, returns them unchanged),
    ``frozen`` (static: fake-quantizes with the stored ``scale``/``zero_point``), or dynamic (scales
    from each input). Gradients are straight-through (:func:`fake_quantize_ste`). With
    ``track_error`` on it accumulates ``sum x^2`` and ``sum (x - q(x))^2`` for the SQNR; with
    ``passthrough`` on it still computes ``q(x)`` (for the error) but returns ``x``.

    Args:
        config: an :class:`ActQuantConfig`.
        channel_axis: channel axis of the input (-1 for Linear, 1 for Conv) for per-channel scales.
    """

    def __init__(self, config: ActQuantConfig, channel_axis: int = -1):
        super().__init__()
        if not isinstance(config, ActQuantConfig):
            raise TypeError(f"config must be an ActQuantConfig, got {type(config).__name__}")
        self.config = config
        self.channel_axis = channel_axis
        self.observer = None if config.dynamic else config.make_observer(channel_axis)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("signal", torch.zeros((), dtype=torch.float64))
        self.register_buffer("noise", torch.zeros((), dtype=torch.float64))
        self.track_error = False
        self.passthrough = False

    @property
    def calibrating(self) -> bool:
        """Whether the quantizer still observes (static and not frozen)."""
        return not self.config.dynamic and not bool(self.frozen)

    def freeze(
        self, qparams: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Store the scales and start quantizing; return ``(scale, zero_point)``.

        Args:
            qparams: ``(scale, zero_point)`` already computed by ``self.observer.calculate_qparams()``;
                computed here when None.
        """
        if self.config.dynamic:
            raise ValueError("a dynamic quantizer has no calibrated scales to freeze")
        scale, zp = self.observer.calculate_qparams() if qparams is None else qparams
        self.scale = scale.detach().clone()
        self.zero_point = torch.empty(0) if zp is None else zp.detach().clone()
        self.frozen.fill_(True)
        return scale, zp

    def _qparams(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[int]]:
        cfg = self.config
        if cfg.dynamic:
            xd = x.detach().float()
            if cfg.granularity == "per_token":
                lo, hi = torch.aminmax(xd, dim=-1, keepdim=True)
            else:
                lo, hi = torch.aminmax(xd)
            scale, zp = choose_qparams(lo, hi, cfg.bits, cfg.symmetric)
            return scale, zp, None
        zp = None if cfg.symmetric else self.zero_point
        axis = self.channel_axis if cfg.observer == "per_channel" else None
        return self.scale, zp, axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe or fake-quantize ``x`` (see the class docstring)."""
        if self.calibrating:
            return self.observer(x)
        scale, zp, axis = self._qparams(x)
        out = fake_quantize_ste(x, scale, zp, self.config.bits, axis)
        if self.track_error:
            with torch.no_grad():
                xd = x.detach().double()
                self.signal += (xd * xd).sum()
                self.noise += ((xd - out.detach().double()) ** 2).sum()
        return x if self.passthrough else out

    def sqnr_db(self) -> float:
        """SQNR in dB of everything quantized while ``track_error`` was on."""
        s, n = float(self.signal), float(self.noise)
        if n == 0.0:
            return math.inf
        if s == 0.0:
            return -math.inf
        return 10.0 * math.log10(s / n)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != self._buffers[name].shape:
                self._buffers[name] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        state = "dynamic" if self.config.dynamic else ("frozen" if bool(self.frozen) else "calibrating")
        return f"{self.config.label}, symmetric={self.config.symmetric}, {state}"


def _input_quant_pre_hook(module: nn.Module, args: Tuple[Any, ...]):
    """Forward pre-hook: pass the first positional input through ``module.input_quantizer``."""
    quantizer = getattr(module, _QUANTIZER_ATTR, None)
    if quantizer is None or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    return (quantizer(args[0]),) + tuple(args[1:])


def _select_modules(
    model: nn.Module,
    types: Optional[Sequence[type]],
    names: Union[None, str, Sequence[str]],
    exclude: Union[None, str, Sequence[str]] = None,
) -> List[Tuple[str, nn.Module]]:
    """Return ``(name, module)`` of the modules matching ``types`` and a ``names`` regex (search)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    types = default_layer_types() if types is None else tuple(types)
    if not types or not all(isinstance(t, type) for t in types):
        raise TypeError(f"types must be a non-empty sequence of classes, got {types!r}")

    def compile_all(patterns, what):
        if patterns is None:
            return []
        if isinstance(patterns, str):
            patterns = [patterns]
        out = []
        for p in patterns:
            try:
                out.append(re.compile(p))
            except re.error as exc:
                raise ValueError(f"{what} pattern {p!r} is not a valid regular expression: {exc}") from exc
        return out

    include = compile_all(names, "names")
    skip = compile_all(exclude, "exclude")
    chosen = []
    for name, module in model.named_modules():
        if not name or isinstance(module, (ActivationObserver, ActivationQuantizer, RunningHistogram)):
            continue
        if not isinstance(module, types):
            continue
        if include and not any(p.search(name) for p in include):
            continue
        if any(p.search(name) for p in skip):
            continue
        chosen.append((name, module))
    if not chosen:
        raise ValueError(
            f"no module of {model.__class__.__name__} matches types={[t.__name__ for t in types]}, "
            f"names={names!r}, exclude={exclude!r}"
        )
    return chosen


def _channel_axis_for(module: nn.Module) -> int:
    """Channel axis of a layer's input and output: 1 for convolutions (N, C, ...), -1 otherwise."""
    if isinstance(module, _CONV_TYPES) or "conv" in type(module).__name__.lower():
        return 1
    return -1


def prepare_activation_quant_(
    model: nn.Module,
    config: ActQuantConfig,
    *,
    types: Optional[Sequence[type]] = None,
    names: Union[None, str, Sequence[str]] = None,
    exclude: Union[None, str, Sequence[str]] = None,
) -> List[str]:
    """Attach an :class:`ActivationQuantizer` to the input of every chosen layer (in place).

    Each chosen module gets a child ``input_quantizer`` and a forward pre-hook that passes its first
    input through it, so parameter names do not change. Static configs start calibrating (run
    :func:`calibrate_`, then :func:`convert_activation_quant_`); dynamic ones quantize at once.

    Args:
        model: the model.
        config: an :class:`ActQuantConfig`.
        types: module classes to choose; None: :func:`default_layer_types` (``(nn.Module,)`` for any).
        names: regular expression(s) a module name must contain (``re.search``).
        exclude: regular expression(s) of names to leave alone.

    Returns:
        Names of the modules that got a quantizer.

    Raises:
        ValueError: nothing matches, or a chosen module already has a quantizer (the model is unchanged).
    """
    if not isinstance(config, ActQuantConfig):
        raise TypeError(f"config must be an ActQuantConfig, got {type(config).__name__}")
    chosen = _select_modules(model, types, names, exclude)
    already = [n for n, m in chosen if hasattr(m, _QUANTIZER_ATTR)]
    if already:
        raise ValueError(f"modules already have an input quantizer: {already[:5]}; call remove_activation_quant_ first")
    for _, module in chosen:
        module.add_module(_QUANTIZER_ATTR, ActivationQuantizer(config, _channel_axis_for(module)))
        module.register_forward_pre_hook(_input_quant_pre_hook)
    logger.info("activation quantization %s on %d modules", config.label, len(chosen))
    return [n for n, _ in chosen]


def _quantizers(model: nn.Module) -> List[Tuple[str, ActivationQuantizer]]:
    return [
        (name, getattr(m, _QUANTIZER_ATTR))
        for name, m in model.named_modules()
        if isinstance(getattr(m, _QUANTIZER_ATTR, None), ActivationQuantizer)
    ]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def run_batches(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    num_batches: Optional[int] = None,
    progress: bool = False,
    desc: str = "batches",
) -> int:
    """Run forward passes in eval mode without gradients; return how many batches ran.

    A batch is passed as ``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list and
    ``model(batch)`` otherwise, unless ``forward(model, batch)`` is given. The training mode is
    restored afterwards, also after an exception.

    Args:
        model: the model.
        batches: any iterable of batches.
        forward: custom call.
        num_batches: stop after this many (None: the whole iterable).
        progress: show a tqdm progress bar on stderr.
        desc: progress bar label.
    """
    if num_batches is not None:
        _check_positive_int("num_batches", num_batches, 1)
    call = forward or _default_forward
    total = num_batches
    if total is None:
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
    it: Iterable[Any] = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, total=total, desc=desc, leave=False)
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            for batch in it:
                if num_batches is not None and n >= num_batches:
                    break
                call(model, batch)
                n += 1
    finally:
        model.train(was_training)
        if progress:
            it.close()  # type: ignore[union-attr]
    return n


def calibrate_(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    num_batches: Optional[int] = None,
    progress: bool = False,
) -> int:
    """Feed calibration batches to the observers of a prepared model; return the batch count.

    Raises:
        ValueError: the model has no calibrating quantizer, or no batch came.
    """
    if not any(q.calibrating for _, q in _quantizers(model)):
        raise ValueError("the model has no calibrating activation quantizer; call prepare_activation_quant_ with a static config first")
    n = run_batches(model, batches, forward=forward, num_batches=num_batches, progress=progress, desc="calibrate")
    if n == 0:
        raise ValueError("calibration got no batch")
    return n


def convert_activation_quant_(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Freeze the scales of every calibrating quantizer; from then on the model fake-quantizes.

    All observers are checked before any is frozen, so a failure leaves the model unchanged.

    Returns:
        ``{module name: (scale, zero_point)}``.
    """
    todo = [(n, q) for n, q in _quantizers(model) if q.calibrating]
    if not todo:
        raise ValueError("the model has no calibrating activation quantizer to convert")
    empty = [n for n, q in todo if not q.observer.has_data]
    if empty:
        raise ValueError(f"these quantizers saw no calibration data: {empty[:5]}; run calibrate_ with batches that reach them")
    qparams = {n: q.observer.calculate_qparams() for n, q in todo}
    for n, q in todo:
        unseen = getattr(q.observer, "unseen_channels", None)
        if unseen is not None and unseen.numel():
            logger.warning("%s: %d input channels never held a finite value during calibration (first: %s); "
                           "they get the widest range seen on the other channels", n, unseen.numel(), unseen[:5].tolist())
        q.freeze(qparams[n])
    return qparams


def quantize_activations_(
    model: nn.Module,
    config: ActQuantConfig,
    batches: Optional[Iterable[Any]] = None,
    *,
    types: Optional[Sequence[type]] = None,
    names: Union[None, str, Sequence[str]] = None,
    exclude: Union[None, str, Sequence[str]] = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    num_batches: Optional[int] = None,
    progress: bool = False,
) -> List[str]:
    """Prepare, calibrate (static configs) and convert in one call; return the quantized module names.

    If calibration fails, the quantizers are removed again and the model is as it was.
    """
    if not config.dynamic and batches is None:
        raise ValueError("static activation quantization needs calibration batches")
    chosen = prepare_activation_quant_(model, config, types=types, names=names, exclude=exclude)
    if config.dynamic:
        return chosen
    try:
        calibrate_(model, batches, forward=forward, num_batches=num_batches, progress=progress)
        convert_activation_quant_(model)
    except BaseException:
        remove_activation_quant_(model, chosen)
        raise
    return chosen


def remove_activation_quant_(model: nn.Module, names: Optional[Sequence[str]] = None) -> List[str]:
    """Remove input quantizers and their pre-hooks; return the names of the modules cleaned.

    Args:
        model: the model.
        names: only these modules (default: every module that has one).
    """
    only = None if names is None else set(names)
    cleaned = []
    for name, module in list(model.named_modules()):
        if not isinstance(getattr(module, _QUANTIZER_ATTR, None), ActivationQuantizer):
            continue
        if only is not None and name not in only:
            continue
        for key in [k for k, h in module._forward_pre_hooks.items() if h is _input_quant_pre_hook]:
            del module._forward_pre_hooks[key]
        delattr(module, _QUANTIZER_ATTR)
        cleaned.append(name)
    return cleaned


def measure_activation_sqnr(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    num_batches: Optional[int] = None,
    progress: bool = False,
    isolated: bool = True,
) -> Dict[str, float]:
    """Return the SQNR (dB) of each quantized layer input over the given batches.

    Each quantizer compares its input with its fake-quantized version. With ``isolated`` (default)
    every quantizer passes its input through unchanged while measuring, so each layer sees the
    fp32 model's activations and its figure is its own quantization error alone: the fair way to
    compare observers layer by layer. With ``isolated=False`` the model runs fully quantized and each
    layer's input already carries the errors (and clipping) of the layers before it.

    Example: a layer whose input has ``sum x^2 = 100`` and quantization error ``sum (x - q(x))^2 =
    0.01`` has an SQNR of ``10 log10(100 / 0.01) = 40`` dB.
    """
    qs = [(n, q) for n, q in _quantizers(model) if not q.calibrating]
    if not qs:
        raise ValueError("the model has no converted or dynamic activation quantizer")
    for _, q in qs:
        q.signal.zero_()
        q.noise.zero_()
        q.track_error = True
        q.passthrough = isolated
    try:
        run_batches(model, batches, forward=forward, num_batches=num_batches, progress=progress, desc="sqnr")
    finally:
        for _, q in qs:
            q.track_error = False
            q.passthrough = False
    return {n: q.sqnr_db() for n, q in qs}


# --------------------------------------------------------------------------------------------
# capture and statistics


_PERCENTILES = (0.01, 0.1, 1.0, 50.0, 99.0, 99.9, 99.99)


class _Moments:
    """Count, mean and central moments M2..M4, merged batch by batch (Chan/Pébay), in fp64."""

    def __init__(self) -> None:
        self.n = 0.0
        self.mean = 0.0
        self.m2 = 0.0
        self.m3 = 0.0
        self.m4 = 0.0

    def update(self, flat: torch.Tensor) -> Tuple[float, float]:
        """Merge a batch; return its mean and std."""
        x = flat.double()
        nb = float(x.numel())
        mb = float(x.mean())
        d = x - mb
        d2 = d * d
        m2b = float(d2.sum())
        m3b = float((d2 * d).sum())
        m4b = float((d2 * d2).sum())
        na, ma = self.n, self.mean
        n = na + nb
        delta = mb - ma
        self.mean = ma + delta * nb / n
        self.m4 = (
            self.m4 + m4b
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * delta**2 * (na * na * m2b + nb * nb * self.m2) / n**2
            + 4 * delta * (na * m3b - nb * self.m3) / n
        )
        self.m3 = self.m3 + m3b + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * m2b - nb * self.m2) / n
        self.m2 = self.m2 + m2b + delta**2 * na * nb / n
        self.n = n
        return mb, math.sqrt(m2b / nb)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else math.nan

    @property
    def kurtosis(self) -> float:
        """Pearson kurtosis ``n M4 / M2^2`` (3 for a Gaussian)."""
        return self.n * self.m4 / (self.m2 * self.m2) if self.m2 > 0 else math.nan


class _Recorder:
    """Running statistics of one captured tensor stream."""

    def __init__(self, name: str, module_name: str, kind: str, channel_axis: int, bins: int, outlier_sigma: float):
        self.name = name
        self.module_name = module_name
        self.kind = kind
        self.channel_axis = channel_axis
        self.outlier_sigma = outlier_sigma
        self.hist = RunningHistogram(bins)
        self.moments = _Moments()
        self.min = math.inf
        self.max = -math.inf
        self.nonfinite = 0
        self.outliers = 0.0
        self.ch_min: Optional[torch.Tensor] = None
        self.ch_max: Optional[torch.Tensor] = None
        self.shape: Tuple[int, ...] = ()
        self.dtype = ""
        self.trace: Dict[str, List[float]] = {k: [] for k in ("min", "max", "mean", "std", "absmax", "outliers")}

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.shape = tuple(x.shape)
        self.dtype = str(x.dtype).replace("torch.", "")
        flat = _finite_flat(x)
        self.nonfinite += x.numel() - flat.numel()
        if flat.numel() == 0:
            return
        lo, hi = torch.aminmax(flat)
        lo, hi = float(lo), float(hi)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        mean_b, std_b = self.moments.update(flat)
        out_b = float(((flat - mean_b).abs() > self.outlier_sigma * std_b).sum()) if std_b > 0 else 0.0
        self.outliers += out_b
        self.hist.update(flat)
        if x.dim() >= 2:
            ax = _norm_axis(self.channel_axis, x.dim()) if -x.dim() <= self.channel_axis < x.dim() else x.dim() - 1
            cmin, cmax = _channel_minmax(x, ax)
            if self.ch_min is None or self.ch_min.numel() != cmin.numel():
                self.ch_min, self.ch_max = cmin, cmax
            else:
                self.ch_min = torch.minimum(self.ch_min, cmin)
                self.ch_max = torch.maximum(self.ch_max, cmax)
        t = self.trace
        t["min"].append(lo)
        t["max"].append(hi)
        t["mean"].append(mean_b)
        t["std"].append(std_b)
        t["absmax"].append(max(abs(lo), abs(hi)))
        t["outliers"].append(out_b / flat.numel())

    def finish(self) -> "LayerStats":
        m = self.moments
        if m.n == 0:
            percentiles = {p: math.nan for p in _PERCENTILES}
            hist_counts: List[float] = []
            hist_range = (math.nan, math.nan)
        else:
            q = self.hist.quantile(torch.tensor(_PERCENTILES, dtype=torch.float64) / 100.0)
            percentiles = {p: float(v) for p, v in zip(_PERCENTILES, q)}
            hist_counts = self.hist.counts.tolist()
            hist_range = (float(self.hist.lo), float(self.hist.hi))
        ch_min = [] if self.ch_min is None else self.ch_min.tolist()
        ch_max = [] if self.ch_max is None else self.ch_max.tolist()
        return LayerStats(
            name=self.name,
            module=self.module_name,
            kind=self.kind,
            shape=self.shape,
            dtype=self.dtype,
            count=int(m.n),
            nonfinite=int(self.nonfinite),
            min=self.min if m.n else math.nan,
            max=self.max if m.n else math.nan,
            mean=m.mean if m.n else math.nan,
            std=m.std,
            kurtosis=m.kurtosis,
            outlier_share=self.outliers / m.n if m.n else math.nan,
            outlier_sigma=self.outlier_sigma,
            percentiles=percentiles,
            channel_axis=self.channel_axis,
            channel_min=ch_min,
            channel_max=ch_max,
            histogram=hist_counts,
            histogram_range=hist_range,
            trace={k: list(v) for k, v in self.trace.items()},
        )


def _first_float(obj: Any) -> Optional[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if isinstance(obj, (tuple, list)):
        for item in obj:
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                return item
    return None


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one captured stream (a module's output or input) over all batches.

    ``trace`` holds one value per forward call for ``min``, ``max``, ``mean``, ``std``, ``absmax``
    and ``outliers`` (share beyond ``outlier_sigma`` standard deviations of that call's mean).
    Percentiles (keys in percent) and the histogram come from the :class:`RunningHistogram`.
    """

    name: str
    module: str
    kind: str
    shape: Tuple[int, ...]
    dtype: str
    count: int
    nonfinite: int
    min: float
    max: float
    mean: float
    std: float
    kurtosis: float
    outlier_share: float
    outlier_sigma: float
    percentiles: Dict[float, float]
    channel_axis: int
    channel_min: List[float]
    channel_max: List[float]
    histogram: List[float]
    histogram_range: Tuple[float, float]
    trace: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def batches(self) -> int:
        """Forward calls recorded."""
        return len(self.trace.get("min", []))

    @property
    def channel_range_ratio(self) -> float:
        """Widest channel range over the median channel range (how much per-channel scales would help)."""
        if not self.channel_min:
            return math.nan
        r = torch.tensor(self.channel_max) - torch.tensor(self.channel_min)
        med = float(r.median())
        return float(r.max()) / med if med > 0 else math.inf

    def dynamics(self) -> Dict[str, float]:
        """Summarise how the range and spread move across batches.

        Returns:
            ``absmax_mean``, ``absmax_cv`` (std / mean of the per-batch absmax), ``range_drift``
            (widest over narrowest per-batch range), ``std_cv``, ``range_use`` (mean per-batch range
            over the global range: what a static scale wastes on a typical batch), ``mean_drift``
            (std of the per-batch means over the global std).
        """
        t = self.trace
        if not t.get("min"):
            return {k: math.nan for k in ("absmax_mean", "absmax_cv", "range_drift", "std_cv", "range_use", "mean_drift")}
        mn, mx = torch.tensor(t["min"], dtype=torch.float64), torch.tensor(t["max"], dtype=torch.float64)
        am, sd, me = (torch.tensor(t[k], dtype=torch.float64) for k in ("absmax", "std", "mean"))
        rng = mx - mn
        glob = self.max - self.min

        def cv(v: torch.Tensor) -> float:
            mu = float(v.mean())
            return float(v.std(unbiased=False)) / mu if mu > 0 else math.nan

        return {
            "absmax_mean": float(am.mean()),
            "absmax_cv": cv(am),
            "range_drift": float(rng.max() / rng.min()) if float(rng.min()) > 0 else math.inf,
            "std_cv": cv(sd),
            "range_use": float(rng.mean()) / glob if glob > 0 else math.nan,
            "mean_drift": float(me.std(unbiased=False)) / self.std if self.std > 0 else math.nan,
        }

    def row(self) -> Dict[str, Any]:
        """A flat table row: range, spread, tails and dynamics."""
        d = self.dynamics()
        return {
            "layer": self.name,
            "shape": "x".join(str(s) for s in self.shape),
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "p0.01": self.percentiles.get(0.01, math.nan),
            "p99.99": self.percentiles.get(99.99, math.nan),
            "kurtosis": self.kurtosis,
            "outliers%": 100.0 * self.outlier_share,
            "ch_ratio": self.channel_range_ratio,
            "absmax_cv": d["absmax_cv"],
            "range_use": d["range_use"],
        }

    def to_dict(self, include_histogram: bool = True) -> Dict[str, Any]:
        """A JSON-ready dict (percentile keys as strings such as ``"p99.9"``)."""
        out: Dict[str, Any] = {
            "name": self.name,
            "module": self.module,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "batches": self.batches,
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "kurtosis": self.kurtosis,
            "outlier_share": self.outlier_share,
            "outlier_sigma": self.outlier_sigma,
            "percentiles": {f"p{p:g}": v for p, v in self.percentiles.items()},
            "channel_axis": self.channel_axis,
            "channel_range_ratio": self.channel_range_ratio,
            "dynamics": self.dynamics(),
            "trace": self.trace,
        }
        if include_histogram:
            out["channel_min"] = self.channel_min
            out["channel_max"] = self.channel_max
            out["histogram"] = {"range": list(self.histogram_range), "counts": self.histogram}
        return out


@dataclass(frozen=True)
class ActivationReport:
    """Per-layer activation statistics from a capture, in capture order.

    Example::

        >>> report = analyze_activation_dynamics(model, batches)
        >>> print(format_table(report.rows()))            # gradcomp.cli._common.format_table
        >>> json.dump(report.to_dict(), fh)
    """

    layers: Dict[str, LayerStats]
    batches: int

    def rows(self) -> List[Dict[str, Any]]:
        """One table row per layer (see :meth:`LayerStats.row`)."""
        return [s.row() for s in self.layers.values()]

    def dynamics_rows(self) -> List[Dict[str, Any]]:
        """One row per layer with how its range and spread move across batches."""
        return [{"layer": s.name, "batches": s.batches, **s.dynamics()} for s in self.layers.values()]

    def to_dict(self, include_histogram: bool = True) -> Dict[str, Any]:
        """A JSON-ready dict: ``{"batches": n, "layers": {name: ...}}``."""
        return {"batches": self.batches, "layers": {k: v.to_dict(include_histogram) for k, v in self.layers.items()}}


class ActivationCapture:
    """Context manager that records running statistics of chosen modules' outputs (and inputs).

    Modules are chosen by class (``types``) and by regular expression on their names (``names``,
    ``re.search``); both must match when both are given. Hooks are registered on entry and always
    removed on exit, also when the block raises. Nothing but running statistics is kept.

    Example::

        >>> with ActivationCapture(model, types=(nn.Linear,), inputs=True) as cap:
        ...     cap.run(batches, progress=True)           # or call model yourself
        >>> report = cap.report()

    Args:
        model: the model.
        types: module classes; None: :func:`default_layer_types` (``(nn.Module,)`` for any class).
        names: regular expression(s) the module name must contain.
        exclude: regular expression(s) of names to skip.
        outputs: record module outputs (key: the module name).
        inputs: record the first input too (key: ``"<name>:input"``).
        bins: histogram bins per stream.
        outlier_sigma: distance from the batch mean, in batch standard deviations, beyond which a
            value counts as an outlier.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        types: Optional[Sequence[type]] = None,
        names: Union[None, str, Sequence[str]] = None,
        exclude: Union[None, str, Sequence[str]] = None,
        outputs: bool = True,
        inputs: bool = False,
        bins: int = 2048,
        outlier_sigma: float = 6.0,
    ):
        if not (outputs or inputs):
            raise ValueError("at least one of outputs and inputs must be recorded")
        _check_positive_int("bins", bins, 2)
        if not float(outlier_sigma) > 0:
            raise ValueError(f"outlier_sigma must be positive, got {outlier_sigma}")
        self.model = model
        self.modules = _select_modules(model, types, names, exclude)
        self.outputs = outputs
        self.inputs = inputs
        self.bins = bins
        self.outlier_sigma = float(outlier_sigma)
        self._recorders: Dict[str, _Recorder] = {}
        self._handles: List[Any] = []
        self._batches = 0

    def _recorder(self, key: str, module_name: str, kind: str, channel_axis: int) -> _Recorder:
        rec = self._recorders.get(key)
        if rec is None:
            rec = _Recorder(key, module_name, kind, channel_axis, self.bins, self.outlier_sigma)
            self._recorders[key] = rec
        return rec

    def __enter__(self) -> "ActivationCapture":
        if self._handles:
            raise RuntimeError("this capture is already active")
        try:
            for name, module in self.modules:
                axis = _channel_axis_for(module)
                if self.inputs:
                    self._recorder(f"{name}:input", name, "input", axis)
                if self.outputs:
                    self._recorder(name, name, "output", axis)
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def _make_hook(self, name: str):
        def hook(module, args, output):
            if self.inputs and args:
                x = _first_float(args[0])
                if x is not None:
                    self._recorders[f"{name}:input"].update(x)
            if self.outputs:
                y = _first_float(output)
                if y is not None:
                    self._recorders[name].update(y)

        return hook

    def close(self) -> None:
        """Remove every hook (safe to call more than once)."""
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def run(
        self,
        batches: Iterable[Any],
        *,
        forward: Optional[Callable[[nn.Module, Any], Any]] = None,
        num_batches: Optional[int] = None,
        progress: bool = False,
    ) -> int:
        """Run batches through the model (see :func:`run_batches`); return how many ran."""
        if not self._handles:
            raise RuntimeError("run() must be called inside the `with` block")
        n = run_batches(self.model, batches, forward=forward, num_batches=num_batches, progress=progress, desc="capture")
        self._batches += n
        return n

    def report(self) -> ActivationReport:
        """Return the statistics gathered so far."""
        return ActivationReport({k: r.finish() for k, r in self._recorders.items()}, self._batches)


def capture_activations(model: nn.Module, **kwargs: Any) -> ActivationCapture:
    """Return an :class:`ActivationCapture` (use it in a ``with`` block); keyword arguments as there."""
    return ActivationCapture(model, **kwargs)


def analyze_activation_dynamics(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: Optional[int] = 10,
    *,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    progress: bool = False,
    **capture_kwargs: Any,
) -> ActivationReport:
    """Capture per-layer statistics over ``num_batches`` batches and return the report.

    Args:
        model: the model (run in eval mode without gradients; its mode is restored).
        batches: iterable of batches (see :func:`run_batches`).
        num_batches: how many to use (None: all).
        forward: custom ``forward(model, batch)``.
        progress: tqdm bar on stderr.
        **capture_kwargs: ``types``, ``names``, ``exclude``, ``outputs``, ``inputs``, ``bins``,
            ``outlier_sigma`` of :class:`ActivationCapture`.
    """
    with ActivationCapture(model, **capture_kwargs) as cap:
        cap.run(batches, forward=forward, num_batches=num_batches, progress=progress)
    return cap.report()
