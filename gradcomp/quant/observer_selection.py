"""``observer="auto"``: per layer, the observer whose scales give the lowest output error on held-out data.

An observer fits its calibration data; whether its range generalises shows only on data it did not
see (a per-channel range that fits calibration at 49 dB can fall to 25 dB on held-out inputs where
per-tensor min-max keeps 33 dB). :class:`ObserverChoice` feeds every candidate observer during
calibration, then scores each on the held-out batches by the error it causes at the layer's output,
and the quantizer freezes the winner's scales.

Steps (driven by :func:`gradcomp.quant.calibrate_`):
    1. The calibration batches are split: the last ``holdout`` share (at least one batch, when there
       are two or more) is held out. Every candidate observes the others.
    2. Held-out batches: the layer sees its unquantized input (each layer is scored alone, on the fp32
       model's activations); for each candidate ``c`` with scales ``s_c``, the input error
       ``e_c = x - q_c(x)`` is pushed through the layer's weight (``F.linear`` / ``F.conv2d``, no
       bias) and ``||W e_c||^2`` is summed, with ``||W x||^2`` for the SQNR. For another kind of
       layer the input error itself is used.
    3. :meth:`ObserverChoice.calculate_qparams` returns the scales of the candidate with the least
       held-out output error. With a single calibration batch nothing is held out and the choice
       falls back to the first of ``("mse", candidates...)`` with a warning.

Example: candidates ``("minmax", "mse")``, held-out output errors ``[4.0e-3, 2.5e-3]`` with a signal
of 10: ``mse`` is chosen (SQNR ``10 log10(10 / 2.5e-3) = 36.0`` dB against 34.0 dB).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcomp.quant.fake_quant import fake_quantize_with_qparams
from gradcomp.quant.observers import ActivationObserver, make_observer

logger = logging.getLogger(__name__)

__all__ = ["ObserverChoice", "observer_choices", "observer_for"]


def _layer_product(module: nn.Module, e: torch.Tensor) -> torch.Tensor:
    """``W e`` for a Linear or a convolution (no bias); ``e`` itself for any other layer."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return e
    w = w.detach().to(e.dtype)
    if w.dim() == 2 and e.shape[-1] == w.shape[1]:
        return F.linear(e, w)
    if w.dim() == 4 and e.dim() == 4 and hasattr(module, "stride"):
        if getattr(module, "padding_mode", "zeros") != "zeros":
            e = F.pad(e, module._reversed_padding_repeated_twice if hasattr(module, "_reversed_padding_repeated_twice")
                      else module._reversed_padding, mode=module.padding_mode)
            return F.conv2d(e, w, None, module.stride, 0, module.dilation, module.groups)
        return F.conv2d(e, w, None, module.stride, module.padding, module.dilation, module.groups)
    return e


class ObserverChoice(nn.Module):
    """Several observers fed at once; the one with the least held-out output error gives the scales.

    It has the observer contract (``obs(x)`` records and returns ``x``, :meth:`calculate_qparams`,
    ``has_data``) so an :class:`~gradcomp.quant.activation_quant.ActivationQuantizer` uses it like
    any observer.

    Args:
        candidates: observer names (see :data:`gradcomp.quant.observers.OBSERVERS`).
        bits, symmetric: the codes.
        channel_axis: for a ``per_channel`` candidate.
        kwargs: per-observer keyword arguments ``{name: {...}}``.
    """

    def __init__(self, candidates: Sequence[str], bits: int = 8, symmetric: bool = False, channel_axis: int = -1,
                 kwargs: Optional[Dict[str, Dict[str, Any]]] = None):
        super().__init__()
        if not candidates or len(set(candidates)) != len(candidates) or "per_token" in candidates or "auto" in candidates:
            raise ValueError(f"candidates must be distinct static observer names, got {tuple(candidates)!r}")
        kwargs = kwargs or {}
        self.names = tuple(candidates)
        self.bits, self.symmetric, self.channel_axis = bits, symmetric, channel_axis
        self.candidates = nn.ModuleDict({n: make_observer(n, bits, symmetric, **kwargs.get(n, {})) for n in self.names})
        self.register_buffer("heldout_error", torch.zeros(len(self.names), dtype=torch.float64))
        self.register_buffer("heldout_signal", torch.zeros((), dtype=torch.float64))
        self.scoring = False
        self.chosen: Optional[str] = None
        self._qparams: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    @property
    def has_data(self) -> bool:
        """Whether every candidate has seen data."""
        return all(o.has_data for o in self.candidates.values())

    @property
    def scored(self) -> bool:
        """Whether held-out data was scored."""
        return bool(self.heldout_signal > 0)

    @property
    def per_channel(self) -> bool:
        """Whether the chosen observer gives per-channel scales."""
        return self.choose() == "per_channel"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feed ``x`` to every candidate (outside the held-out phase) and return it unchanged."""
        if not self.scoring:
            for o in self.candidates.values():
                o(x)
        return x

    def start_scoring(self) -> None:
        """Freeze each candidate's scales and score the batches that follow (the held-out part)."""
        self._qparams = {n: o.calculate_qparams() for n, o in self.candidates.items()}
        self.heldout_error.zero_()
        self.heldout_signal.zero_()
        self.scoring = True
        self.chosen = None

    def stop_scoring(self) -> None:
        """End the held-out phase."""
        self.scoring = False

    @torch.no_grad()
    def score(self, module: nn.Module, x: torch.Tensor) -> None:
        """Add the output error each candidate's scales cause on the held-out input ``x`` of ``module``."""
        xd = x.detach().float()
        self.heldout_signal += float((_layer_product(module, xd) ** 2).sum())
        errs = []
        for n in self.names:
            s, zp = self._qparams[n]
            axis = self.channel_axis if n == "per_channel" else None
            e = xd - fake_quantize_with_qparams(xd, s, zp, self.bits, axis)
            errs.append(float((_layer_product(module, e) ** 2).sum()))
        self.heldout_error += torch.tensor(errs, dtype=torch.float64)

    def choose(self) -> str:
        """Return (and keep) the candidate with the least held-out output error."""
        if self.chosen is None:
            if self.scored:
                self.chosen = self.names[int(torch.argmin(self.heldout_error))]
            else:
                self.chosen = "mse" if "mse" in self.names else self.names[0]
                logger.warning("observer='auto' had no held-out calibration batch to score; using %r (give two or more batches)",
                               self.chosen)
        return self.chosen

    def heldout_sqnr_db(self) -> Dict[str, float]:
        """SQNR (dB) of the layer output on the held-out batches, per candidate."""
        sig = float(self.heldout_signal)
        return {n: (10.0 * math.log10(sig / float(e)) if float(e) > 0 else math.inf) for n, e in zip(self.names, self.heldout_error)}

    def calculate_qparams(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return the chosen candidate's ``(scale, zero_point)``."""
        return self.candidates[self.choose()].calculate_qparams()

    @property
    def unseen_channels(self) -> Optional[torch.Tensor]:
        """The chosen per-channel observer's unseen channels (None for per-tensor choices)."""
        return getattr(self.candidates[self.choose()], "unseen_channels", None)

    @property
    def min_val(self) -> torch.Tensor:
        """The chosen observer's minimum (per channel for ``per_channel``)."""
        return self.candidates[self.choose()].min_val

    def extra_repr(self) -> str:
        return f"candidates={self.names}, chosen={self.chosen}"


def observer_choices(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Return ``{layer: {"observer": chosen, "heldout_sqnr_db": {candidate: dB}}}`` for every ``observer="auto"`` quantizer."""
    out = {}
    for name, m in model.named_modules():
        q = getattr(m, "input_quantizer", None)
        obs = getattr(q, "observer", None)
        if isinstance(obs, ObserverChoice):
            out[name] = {"observer": obs.chosen, "heldout_sqnr_db": obs.heldout_sqnr_db() if obs.scored else {}}
    return out


def observer_for(config: Any, channel_axis: int = -1) -> ActivationObserver:
    """Build the observer an :class:`~gradcomp.quant.configs.ActQuantConfig` names (``channel_axis`` for the per-channel one).

    ``observer="auto"`` gives an :class:`ObserverChoice` over the config's ``candidates``, which keeps
    part of the calibration data held out and picks, per layer, the candidate with the least output
    error on it.

    Example: ``observer_for(ActQuantConfig(observer="percentile", percentile=99.9))`` is a
    :class:`~gradcomp.quant.observers.PercentileObserver` with that percentile and the config's bins.
    """

    def options(name: str) -> Dict[str, Any]:
        return {"per_channel": {"axis": channel_axis}, "percentile": {"percentile": config.percentile, "bins": config.bins},
                "mse": {"bins": config.bins}, "kl": {"bins": config.bins},
                "moving_average": {"averaging_constant": config.averaging_constant}}.get(name, {})

    if config.observer == "auto":
        return ObserverChoice(config.candidates, config.bits, config.symmetric, channel_axis, {n: options(n) for n in config.candidates})
    return make_observer(config.observer, config.bits, config.symmetric, **options(config.observer))
