"""A running histogram over a growing range, and the clipping-range searches on histograms.

Percentiles over many batches use a fixed-bin histogram (:class:`RunningHistogram`, 2048 bins by
default) that re-bins when a batch falls outside the current range: the old counts are spread over
the new, wider bins by linear interpolation of the cumulative counts (mass assumed uniform within a
bin). A percentile read from it is exact up to the position inside one bin, so its error is at most
one final bin width ``(max - min) / bins`` plus the smearing of the re-binnings, each of which moves
mass by less than one old bin width (also less than one final bin width). ``tests/quant/test_activations.py``
checks the bound against ``torch.quantile`` over the concatenated data.

:func:`mse_clip_range` and :func:`kl_threshold` search the range that a quantizer should cover.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from gradcomp.checks import check_bits, check_int
from gradcomp.codec import choose_qparams, qrange
from gradcomp.quant._util import finite_flat, interp
from gradcomp.quant.fake_quant import fake_quantize_with_qparams

__all__ = ["RunningHistogram", "fold_abs_histogram", "mse_clip_range", "kl_threshold"]


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
        check_int("bins", bins, 2)
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
        flat = finite_flat(x)
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
                cdf_new = interp(new_edges, self.edges(), self.cdf())
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
        return interp(qt.reshape(-1) * cdf[-1], cdf, self.edges()).reshape(qt.shape)

    def mass_between(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Return the (interpolated) counts in ``[a, b]`` for tensors of bounds."""
        cdf, edges = self.cdf(), self.edges()
        return interp(b.double(), edges, cdf) - interp(a.double(), edges, cdf)

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
    check_bits(bits)
    c = _check_counts(counts)
    if not hi > lo:
        raise ValueError(f"the histogram range must satisfy lo < hi, got lo={lo}, hi={hi}")
    check_int("max_candidates", max_candidates, 2)
    check_int("refine", refine, 0)
    check_int("points_per_bin", points_per_bin, 1)
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
    check_int("levels", levels, 2)
    check_int("max_candidates", max_candidates, 2)
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
