"""The packed weight: integer codes plus scales (and zero points, and an optional input scale), or a 16-bit cast.

:class:`PackedWeight` is what every quantized layer of :mod:`gradcomp.quant.modules` holds and what
the files of :mod:`gradcomp.quant.serialization` store; its layout is that of :mod:`gradcomp.quant.layout`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcomp.codec import pack_codes, packed_nbytes, unpack_codes
from gradcomp.quant.configs import CAST_DTYPES, SCALE_DTYPES, CastConfig, Config, _check_config, config_name
from gradcomp.quant.layout import _dequantize_rows, _layout, _quantize_weight

__all__ = ["PackedWeight"]


class PackedWeight(nn.Module):
    """A weight held as packed integer codes plus scales (and zero points), or as a 16-bit cast.

    Buffers: ``qweight`` (flat uint8 packed codes, or the fp16/bf16 weight for a :class:`CastConfig`),
    ``scale`` (``(rows, groups)`` in ``scale_dtype``) and, when asymmetric, ``zero_point`` (flat uint8,
    zero points packed at ``bits`` bits). Two layers that share a weight (tied embeddings) share one
    ``PackedWeight``.

    Optionally (activation-aware scaling, :class:`gradcomp.quant.algorithms.AWQScale`) ``input_scale``:
    a positive fp32/fp16 vector ``s`` over the input dim of a 2-D weight. The codes then hold
    ``W diag(s)`` and the weight is ``W_hat = Q diag(1/s)``: :meth:`dequantize` returns ``W_hat``,
    and a kernel that multiplies by ``Q`` directly is fed ``x / s``. It is stored, checksummed and
    counted like the other buffers.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: Optional[torch.Tensor],
        zero_point: Optional[torch.Tensor],
        config: Config,
        shape: Sequence[int],
        dtype: torch.dtype,
        input_scale: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._check(qweight, scale, zero_point)
        if input_scale is not None:
            self._check_input_scale(input_scale)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("input_scale", input_scale)
        self._layout = None if isinstance(config, CastConfig) else _layout(self.shape, config)

    def _check(self, qweight: torch.Tensor, scale: Optional[torch.Tensor], zp: Optional[torch.Tensor]) -> None:
        cfg = self.config
        if isinstance(cfg, CastConfig):
            want = CAST_DTYPES[cfg.dtype]
            if qweight.dtype != want or tuple(qweight.shape) != self.shape:
                raise ValueError(f"qweight must be {want} of shape {self.shape}, got {qweight.dtype} of shape {tuple(qweight.shape)}")
            if scale is not None or zp is not None:
                raise ValueError("a cast weight holds no scale or zero_point")
            return
        lay = _layout(self.shape, cfg)
        need = packed_nbytes(lay.numel, cfg.bits)
        if qweight.dtype != torch.uint8 or qweight.dim() != 1 or qweight.numel() != need:
            raise ValueError(f"qweight must be flat uint8 of {need} bytes for shape {self.shape} and {cfg.name}, "
                             f"got {qweight.dtype} of shape {tuple(qweight.shape)}")
        sdt = SCALE_DTYPES[cfg.scale_dtype]
        if scale is None or scale.dtype != sdt or tuple(scale.shape) != (lay.rows, lay.groups):
            got = "None" if scale is None else f"{scale.dtype} of shape {tuple(scale.shape)}"
            raise ValueError(f"scale must be {sdt} of shape {(lay.rows, lay.groups)} for {cfg.name}, got {got}")
        if cfg.symmetric:
            if zp is not None:
                raise ValueError(f"a symmetric config ({cfg.name}) holds no zero_point")
        else:
            need_zp = packed_nbytes(lay.rows * lay.groups, cfg.bits)
            if zp is None or zp.dtype != torch.uint8 or tuple(zp.shape) != (need_zp,):
                got = "None" if zp is None else f"{zp.dtype} of shape {tuple(zp.shape)}"
                raise ValueError(f"zero_point must be flat uint8 of {need_zp} bytes for {cfg.name}, got {got}")

    def _check_input_scale(self, s: torch.Tensor) -> None:
        if isinstance(self.config, CastConfig) or len(self.shape) != 2:
            raise ValueError(f"an input_scale belongs to an integer-coded 2-D weight, got {config_name(self.config)} of shape {self.shape}")
        if s.dtype not in (torch.float32, torch.float16) or tuple(s.shape) != (self.shape[1],):
            raise ValueError(f"input_scale must be float32 or float16 of shape ({self.shape[1]},), got {s.dtype} of shape {tuple(s.shape)}")
        if s.device.type != "meta" and not bool((torch.isfinite(s) & (s > 0)).all()):
            raise ValueError("input_scale must hold finite positive values")

    @classmethod
    def from_weight(cls, weight: torch.Tensor, config: Config) -> "PackedWeight":
        """Quantize ``weight`` with ``config`` and pack it.

        Args:
            weight: floating tensor of any shape with at least one element.
            config: a :class:`WeightQuantConfig` or :class:`CastConfig`.

        Returns:
            A :class:`PackedWeight` on ``weight``'s device.
        """
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating torch.Tensor, got {type(weight).__name__}")
        _check_config(config)
        w = weight.detach()
        if isinstance(config, CastConfig):
            return cls(w.to(CAST_DTYPES[config.dtype]).clone(), None, None, config, w.shape, w.dtype)
        codes, scale, zp, lay = _quantize_weight(w, config)
        if lay.padded:
            codes = codes[:, : lay.row_len]
        packed = pack_codes(codes.contiguous(), config.bits)
        pzp = None if zp is None else pack_codes(zp.to(torch.uint8), config.bits)
        return cls(packed, scale.reshape(lay.rows, lay.groups).contiguous(), pzp, config, w.shape, w.dtype)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: Optional[torch.Tensor],
        config: Config,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        input_scale: Optional[torch.Tensor] = None,
    ) -> "PackedWeight":
        """Pack codes and scales chosen elsewhere (GPTQ, clipping search) into the stored format.

        Args:
            codes: uint8 stored codes, ``(rows, row_len)`` of the weight's layout (symmetric codes with
                the ``2**(bits-1)`` offset, as :func:`gradcomp.codec.quantize_codes_with_qparams` makes them).
            scale: ``rows * groups`` scales in the config's ``scale_dtype``.
            zero_point: ``rows * groups`` integral zero points (asymmetric), or None.
            config: the :class:`WeightQuantConfig` the codes follow.
            shape, dtype: the original weight's shape and dtype.
            input_scale: optional per-input-channel scale the codes were made with (see the class).

        Returns:
            A :class:`PackedWeight`, identical in form to one from :meth:`from_weight` (plus ``input_scale``).
        """
        _check_config(config)
        if isinstance(config, CastConfig):
            raise TypeError("from_codes takes integer codes; a CastConfig weight is made by from_weight")
        lay = _layout(shape, config)
        if codes.dtype != torch.uint8 or tuple(codes.shape) != (lay.rows, lay.row_len):
            raise ValueError(f"codes must be uint8 of shape {(lay.rows, lay.row_len)}, got {codes.dtype} of shape {tuple(codes.shape)}")
        if int(codes.max()) >= (1 << config.bits):
            raise ValueError(f"codes must be below 2**{config.bits}, got a maximum of {int(codes.max())}")
        packed = pack_codes(codes.contiguous(), config.bits)
        pzp = None if zero_point is None else pack_codes(zero_point.reshape(-1).to(torch.uint8), config.bits)
        return cls(packed, scale.reshape(lay.rows, lay.groups).contiguous(), pzp, config, shape, dtype, input_scale)

    def _apply(self, fn, recurse: bool = True):
        # Moves between devices apply as usual, but a dtype conversion (model.half(), .to(bf16))
        # must not touch the stored representation: the scales stay in scale_dtype and a cast weight
        # stays in its dtype. Only the dtype that dequantization returns by default follows.
        probe = fn(torch.zeros(1, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        for key, buf in self._buffers.items():
            if buf is None:
                continue
            out = fn(buf)
            if out.dtype != buf.dtype:
                out = buf.to(device=out.device)
            self._buffers[key] = out
        return self

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (codes, scales, zero points, input scale)."""
        return sum(b.numel() * b.element_size() for b in (self.qweight, self.scale, self.zero_point, self.input_scale) if b is not None)

    def _zero_points(self) -> Optional[torch.Tensor]:
        if self.zero_point is None:
            return None
        lay = self._layout
        return unpack_codes(self.zero_point, self.config.bits, lay.rows * lay.groups).view(lay.rows, lay.groups)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Return the weight reconstructed in ``dtype`` (default: the original weight's dtype)."""
        dtype = self.dtype if dtype is None else dtype
        if isinstance(self.config, CastConfig):
            return self.qweight.to(dtype)
        lay = self._layout
        codes = unpack_codes(self.qweight, self.config.bits, lay.numel).view(lay.rows, lay.row_len)
        out = _dequantize_rows(codes, self.scale, self._zero_points(), lay, self.config.bits)
        out = out.reshape(self.shape)
        if self.input_scale is not None:
            out = out / self.input_scale.float()
        return out.to(dtype)

    def dequantize_rows(self, index: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Return rows ``index`` (any integer shape) of a 2-D weight without dequantizing the others.

        Used by :class:`QuantizedEmbedding`: only the looked-up rows are unpacked when a row fills a
        whole number of bytes; otherwise the full weight is dequantized and indexed.
        """
        dtype = self.dtype if dtype is None else dtype
        if len(self.shape) != 2:
            raise ValueError(f"dequantize_rows needs a 2-D weight, this one has shape {self.shape}")
        cfg = self.config
        if isinstance(cfg, CastConfig):
            return F.embedding(index, self.qweight).to(dtype)
        if self.input_scale is not None:
            return F.embedding(index, self.dequantize(dtype))
        lay = self._layout
        row_bits = lay.row_len * cfg.bits
        aligned = lay.rows == self.shape[0] and row_bits % (24 if cfg.bits == 3 else 8) == 0
        if not aligned:
            return F.embedding(index, self.dequantize(dtype))
        flat = index.reshape(-1)
        row_bytes = row_bits // 8
        packed = self.qweight.view(lay.rows, row_bytes)[flat].reshape(-1)
        codes = unpack_codes(packed, cfg.bits, flat.numel() * lay.row_len).view(flat.numel(), lay.row_len)
        zp = self._zero_points()
        out = _dequantize_rows(codes, self.scale[flat], None if zp is None else zp[flat], lay, cfg.bits)
        return out.reshape(*index.shape, lay.row_len).to(dtype)

    def extra_repr(self) -> str:
        extra = ", input_scale" if self.input_scale is not None else ""
        return f"shape={self.shape}, config={config_name(self.config)}{extra}, nbytes={self.nbytes}"
