"""Activation observers with the ``torch.ao`` contract.

``obs(x)`` records ``x`` and returns it unchanged, ``obs.calculate_qparams()`` returns
``(scale, zero_point)`` computed by :func:`gradcomp.codec.choose_qparams`, and
``state_dict``/``load_state_dict`` round-trip the state. Min-max, moving-average min-max,
per-channel and per-token min-max, percentile, histogram with MSE-optimal clipping and entropy (KL)
calibration.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from gradcomp.codec import choose_qparams
from gradcomp.checks import check_bits, check_bool, check_int, check_number
from gradcomp.quant._util import channel_minmax, finite_flat, interp, norm_axis
from gradcomp.quant.histogram import RunningHistogram, fold_abs_histogram, kl_threshold, mse_clip_range

__all__ = [
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
]


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
        check_bits(bits)
        check_bool("symmetric", symmetric)
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

    def _observe(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        # returns the finite values it saw, for subclasses that record more than the range
        flat = finite_flat(x)
        if flat.numel() == 0:
            return None
        _widen_range(self, flat)
        return flat

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
        check_number("averaging_constant", averaging_constant, low=0.0, high=1.0, low_open=True)
        self.averaging_constant = float(averaging_constant)

    def _observe(self, x: torch.Tensor) -> None:
        flat = finite_flat(x)
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
        ax = norm_axis(self._axis, x.dim())
        lo, hi = channel_minmax(x, ax)
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo, hi
            return
        if lo.numel() != self.min_val.numel():
            raise ValueError(f"expected {self.min_val.numel()} channels along axis {self._axis}, got {lo.numel()}")
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def _seen(self) -> torch.Tensor:
        """Channels that held a finite nonzero value during calibration.

        A channel that was only ever exactly 0 (the one-hot feature of an element absent from the
        calibration set, a dead input) has a zero range, which would clip every later value there to 0.
        """
        return torch.isfinite(self.min_val) & ((self.min_val != 0) | (self.max_val != 0))

    @property
    def unseen_channels(self) -> torch.Tensor:
        """Indices of the channels that never held a finite nonzero value during calibration."""
        return torch.nonzero(~self._seen()).reshape(-1)

    def clip_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return per-channel ``(min, max)``.

        A channel never seen finite and nonzero (e.g. the feature of an element absent from the
        calibration set) gets the range of the whole tensor (the widest range seen on any channel),
        not ``[0, 0]``: a zero range would clip every later value there to 0. With no such channel at
        all the range is ``[0, 0]``.
        """
        seen = self._seen()
        if bool(seen.any()):
            wide_lo, wide_hi = self.min_val[seen].min(), self.max_val[seen].max()
        else:
            wide_lo = wide_hi = torch.zeros((), dtype=self.min_val.dtype, device=self.min_val.device)
        lo = torch.where(seen, self.min_val, wide_lo)
        hi = torch.where(seen, self.max_val, wide_hi)
        return lo, hi

    def extra_repr(self) -> str:
        unseen = int((~self._seen()).sum()) if self.min_val.numel() else 0
        note = f", unseen_channels={unseen} (given the tensor's range)" if unseen else ""
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


class _HistogramBase(MinMaxObserver):
    """An observer over a :class:`RunningHistogram` (plus the exact running min and max)."""

    def __init__(self, bits: int = 8, symmetric: bool = False, bins: int = 2048):
        super().__init__(bits, symmetric)
        self.histogram = RunningHistogram(bins)

    def _observe(self, x: torch.Tensor) -> None:
        flat = super()._observe(x)
        if flat is not None:
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
        check_number("percentile", percentile, low=50.0, high=100.0, low_open=True)
        self.percentile = float(percentile)

    def clip_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the percentile range (within the observed min/max)."""
        p = self.percentile / 100.0
        if self.symmetric:
            counts, amax = fold_abs_histogram(self.histogram)
            cdf = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
            edges = torch.linspace(0.0, amax, counts.numel() + 1, dtype=torch.float64)
            t = interp(torch.tensor([p * float(cdf[-1])], dtype=torch.float64), cdf, edges)[0]
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
        check_int("max_candidates", max_candidates, 2)
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
