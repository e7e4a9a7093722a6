"""The one quantizer of gradcomp, split by its users.

* :mod:`~gradcomp.codec.core`: qparams, quantize, dequantize, fake quantize, the rounding rule
  (weights, activations, and the definition the gradient kernels follow);
* :mod:`~gradcomp.codec.packing`: 2/3/4/8-bit packing;
* :mod:`~gradcomp.codec.metrics`: mse, SQNR, cosine similarity;
* :mod:`~gradcomp.codec.formats`: :class:`WireFormat`, the registry of what gradients cost on the wire;
* :mod:`~gradcomp.codec.kernels`: the exchange's kernels (encode, reduce, decode, decode-sum of rows
  of blocks) behind one dispatch.

Pure tensor math: no ``torch.distributed``, no ``nn.Module``, no I/O. The names below are the codec's
public API; import them from ``gradcomp.codec``.
"""

from __future__ import annotations

from gradcomp.codec.core import (
    SUPPORTED_BITS,
    QuantizedTensor,
    choose_qparams,
    dequantize,
    dequantize_codes,
    fake_quantize,
    qrange,
    quantize,
    quantize_codes,
    quantize_codes_with_qparams,
    round_codes,
)
from gradcomp.codec.formats import FORMATS, HEADER_BYTES, WireFormat, format_names, wire_format
from gradcomp.codec.kernels import compile_available, decode_blocks, decode_sum_blocks, encode_blocks, reduce_blocks
from gradcomp.codec.metrics import cosine_similarity, mse, sqnr_db
from gradcomp.codec.packing import pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "SUPPORTED_BITS",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_codes",
    "dequantize_codes",
    "quantize_codes_with_qparams",
    "choose_qparams",
    "qrange",
    "round_codes",
    "pack_codes",
    "unpack_codes",
    "packed_nbytes",
    "mse",
    "sqnr_db",
    "cosine_similarity",
    "WireFormat",
    "FORMATS",
    "HEADER_BYTES",
    "wire_format",
    "format_names",
    "encode_blocks",
    "reduce_blocks",
    "decode_blocks",
    "decode_sum_blocks",
    "compile_available",
]
