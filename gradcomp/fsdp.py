"""FSDP2 with quantized collectives: ``gradcomp.fsdp.compress_(model, grad_bits=8, weight_bits=8)``.

The implementation lives in :mod:`gradcomp.comm.fsdp`; this module is its public name.
"""

from __future__ import annotations

from gradcomp.comm.fsdp import FSDPCompressConfig, FSDPCompressState, compress_

__all__ = ["FSDPCompressConfig", "FSDPCompressState", "compress_"]
