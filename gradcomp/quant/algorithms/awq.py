"""AWQ channel scaling: scale the weight's input channels by activation magnitude before quantizing.

Lin et al., "AWQ: Activation-aware Weight Quantization" (2023). Quantizing ``W diag(s)`` and dividing
the input by ``s`` at run time leaves the product unchanged in exact arithmetic, ``(x / s)(W diag(s))^T
= x W^T``, but moves rounding error: a channel with a large input gets ``s > 1``, so its weights use
more of the grid and their relative error shrinks, at the cost of channels with small inputs. The
weight is stored as the codes of ``W diag(s)`` plus ``s`` (``input_scale`` of
:class:`gradcomp.quant.modules.PackedWeight`, fp32, ``4 * in_features`` bytes), applied by the
quantized Linear (``x / s`` before a kernel; folded into the dequantized weight otherwise).

Steps:
    1. ``H = X^T X`` over calibration inputs, plus 1% of its mean diagonal (inputs absent from
       calibration still count); the activation magnitude of input ``j`` is ``a_j = sqrt(H_jj)``.
    2. For each ``alpha`` in ``linspace(0, 1, grid)``: ``s = a^alpha``, normalised so that
       ``sqrt(max(s) min(s)) = 1``; quantize ``W diag(s)`` to nearest, ``W_hat = Q diag(1/s)``; score
       ``trace((W_hat - W) H (W_hat - W)^T)``, the layer's output error on the calibration inputs.
    3. Keep the best ``alpha`` (``alpha = 0`` is ``s = 1``, round-to-nearest, so the score never gets
       worse than round-to-nearest's); with ``clip``, run the clipping search
       (:func:`gradcomp.quant.algorithms.clip_search_quantize`) on ``W diag(s)`` against the Hessian
       of the scaled inputs ``diag(1/s) H diag(1/s)``, as AWQ runs its clipping after its scaling.

Example: two inputs with RMS 10 and 0.1 feeding ``w = [0.1, 1.0]`` at int4 symmetric: the absmax
grid step is ``1/7``, so ``0.1`` rounds to ``0.143`` (error 0.043, times input 10: 0.43 on the
output); with ``s = [10, 0.1]`` (``alpha = 1``) the scaled weight is ``[1.0, 0.1]``, ``1.0`` is exact
and the small weight's error (at most ``1/14``, times ``1/s = 10``, times input 0.1) is 0.07.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradcomp.quant.algorithms.clip import clip_search_quantize
from gradcomp.quant.algorithms.common import QuantResult, hessian_matrix_view
from gradcomp.quant.configs import WeightQuantConfig
from gradcomp.quant.layout import _dequantize_rows, _quantize_weight

__all__ = ["AWQScale", "awq_scale_quantize"]


@dataclass(frozen=True)
class AWQScale:
    """Options of :func:`awq_scale_quantize`.

    Attributes:
        grid: exponents ``alpha`` tried, evenly spaced in [0, 1].
        clip: run the activation-aware clipping search after the scaling (AWQ does).
    """

    grid: int = 20
    clip: bool = True

    name = "awq_scale"

    def __post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"grid must be a positive int, got {self.grid!r}")
        if not isinstance(self.clip, bool):
            raise TypeError(f"clip must be a bool, got {type(self.clip).__name__}")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor, config: WeightQuantConfig) -> QuantResult:
        """Quantize ``weight`` with these options (see :func:`awq_scale_quantize`)."""
        return awq_scale_quantize(weight, hessian, config, grid=self.grid, clip=self.clip)


def _rtn(w: torch.Tensor, config: WeightQuantConfig) -> torch.Tensor:
    codes, scale, zp, lay = _quantize_weight(w, config)
    return _dequantize_rows(codes, scale, zp, lay, config.bits).reshape(w.shape)


def awq_scale_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: WeightQuantConfig, *, grid: int = 20,
                       clip: bool = True) -> QuantResult:
    """Quantize a 2-D ``(out, in)`` weight with an activation-aware per-input-channel scale.

    Args:
        weight: the Linear weight.
        hessian: ``X^T X`` (in, in) over calibration inputs.
        config: the target format.
        grid, clip: see :class:`AWQScale`.

    Returns:
        A :class:`QuantResult` with ``input_scale`` (fp32, ``(in,)``): codes and scales of
        ``W diag(s)`` in the stored layout.
    """
    w, lay = hessian_matrix_view(weight, hessian, config)
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("the input Hessian holds inf or nan; the calibration inputs are not finite")
    cols = w.shape[1]
    h = hessian.to(dtype=torch.float64).clone()
    diag = torch.diagonal(h).clamp_min(0)
    mean = float(diag.mean())
    h += (0.01 * mean if mean > 0 else 1.0) * torch.eye(cols, dtype=h.dtype)
    act = torch.diagonal(h).sqrt()
    wd = w.double()

    def score(approx: torch.Tensor) -> float:
        d = approx.double() - wd
        return float(((d @ h) * d).sum())

    best_alpha, best_err, best_s = 0.0, score(_rtn(w, config)), torch.ones(cols)
    for alpha in torch.linspace(0.0, 1.0, grid).tolist()[1:]:
        s = act.pow(alpha)
        s = (s / (s.max() * s.min()).sqrt()).float()
        err = score(_rtn(w * s, config) / s)
        if err < best_err:
            best_alpha, best_err, best_s = alpha, err, s
    s = None if best_alpha == 0.0 else best_s   # s = 1: nothing to store
    ws = w if s is None else w * s
    if clip:
        hs = h if s is None else h / s.double()[:, None] / s.double()[None, :]
        r = clip_search_quantize(ws, hs, config)
        return QuantResult(r.codes, r.scale, r.zero_point, r.layout, None if s is None else s.clone())
    codes, scale, zp, lay = _quantize_weight(ws, config)
    if lay.padded:
        codes = codes[:, : lay.row_len]
    return QuantResult(codes.reshape(lay.rows, lay.row_len).contiguous(), scale.reshape(-1), zp, lay,
                       None if s is None else s.clone())
