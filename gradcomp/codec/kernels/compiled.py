"""The ``torch.compile`` backend of the exchange's kernels, for CUDA tensors.

:func:`prepare` compiles the reference kernels (:mod:`~gradcomp.codec.kernels.reference`) for a
device on the calling thread, before any training step, and checks them bit for bit against the
eager ones on sample blocks of every given format and bucket dtype; only then does :func:`ready`
say yes and the dispatch use them. Nothing compiles later: a compile on another thread while the
training runs makes ``torch.compiler.is_compiling()`` true for the training thread too, which
changes the numerics of code that branches on it (the optimizers do).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Set

import torch

from gradcomp.codec.compiling import compile_available, compile_failed, run, warn_compile_failure
from gradcomp.codec.formats import WireFormat
from gradcomp.codec.kernels import reference as ref

logger = logging.getLogger(__name__)

__all__ = ["prepare", "ready"]

_READY: Set[str] = set()
_LOCK = threading.Lock()


def ready(device: torch.device) -> bool:
    """Whether :func:`prepare` compiled and checked the kernels for ``device``."""
    return str(torch.device(device)) in _READY


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, a nan matching any nan."""
    if a.dtype.is_floating_point:
        na, nb = torch.isnan(a), torch.isnan(b)
        return torch.equal(na, nb) and torch.equal(torch.where(na, 0, a).view(-1).view(torch.uint8),
                                                   torch.where(nb, 0, b).view(-1).view(torch.uint8))
    return torch.equal(a, b)


def _check(device: torch.device, dtype: torch.dtype, fmt: WireFormat, block: int) -> None:
    """Run every kernel compiled and eagerly on the same sample blocks; raise if any output differs."""
    g = torch.Generator().manual_seed(fmt.header_id)
    P = 3
    t = ref.tables(fmt, block, device)
    ncodes = 1 << fmt.bits
    for rows in (2, 7):
        x = torch.randn(rows, block, generator=g).to(device=device, dtype=dtype)
        res = (torch.randn(rows, block, generator=g) * 1e-2).to(device)
        noise = torch.rand(rows, block, generator=g).to(device)
        # received copies: codes the encoder makes (no nan or inf code), scales of the format's kind
        copies = torch.randint(0, ncodes, (P, rows, block), generator=g, dtype=torch.uint8)
        if fmt.is_float:
            copies = torch.where(torch.isfinite(ref.element_values(fmt)[copies.long()]), copies, torch.zeros_like(copies))
        copies = copies.to(device)
        if fmt.scale == "fp32":
            scales = torch.rand(P, rows, generator=g).to(device)
        else:
            scales = torch.randint(100, 140, (P, rows, block // fmt.group), generator=g, dtype=torch.uint8).to(device)
        for nz in (None, noise):
            outs = []
            for compiled in (False, True):
                r_in, r_out = res.clone(), torch.full_like(res, float("nan"))
                c8 = torch.empty(rows, block, dtype=torch.uint8, device=device)
                s = run(ref.encode_kernel, compiled, x, r_in, r_out, c8, nz, fmt, t)
                r_ip = res.clone()
                c8i = torch.empty_like(c8)
                si = run(ref.encode_kernel_inplace, compiled, x, r_ip, c8i, nz, fmt, t)
                m_out = torch.full_like(res, float("nan"))
                m8 = torch.empty_like(c8)
                ms = run(ref.reduce_kernel, compiled, copies, scales, res, m_out, m8, nz, fmt, t)
                m_ip = res.clone()
                m8i = torch.empty_like(c8)
                msi = run(ref.reduce_kernel_inplace, compiled, copies, scales, m_ip, m8i, nz, fmt, t)
                dec = torch.empty(rows, block, dtype=dtype, device=device)
                run(ref.decode_kernel, compiled, c8, s, dec, fmt, t)
                dsum = torch.empty(rows, block, dtype=dtype, device=device)
                run(ref.decode_sum_kernel, compiled, copies, scales, dsum, P, None, fmt, t)
                outs.append((s, r_out, c8, si, r_ip, c8i, ms, m_out, m8, msi, m_ip, m8i, dec, dsum))
            for a, b in zip(*outs):
                if not _same(a, b):
                    raise RuntimeError(f"the compiled {fmt.name} kernels disagree with the eager ones on sample blocks ({dtype})")


def prepare(device: torch.device, dtypes: Iterable[torch.dtype], formats: Iterable[WireFormat], block_size: int) -> bool:
    """Compile and check the kernels for ``device`` now, on this thread; return :func:`ready`.

    A failure (no compiler, an unsupported platform, a result that differs from the eager kernels)
    is logged once; the eager kernels then run (identical results).
    """
    device = torch.device(device)
    key = str(device)
    with _LOCK:
        if key in _READY:
            return True
        if not compile_available():
            warn_compile_failure("the exchange kernels", RuntimeError("torch.compile is unavailable in this torch build"))
            return False
        t0 = time.perf_counter()
        try:
            for fmt in formats:
                for dtype in dtypes:
                    _check(device, dtype, fmt, block_size)
            failed = [fn.__name__ for fn in ref.KERNELS if compile_failed(fn)]  # run() fell back to eager for these
            if failed:
                raise RuntimeError(f"compiling {', '.join(failed)} failed")
        except Exception as exc:  # a failure to compile never stops training: the eager kernels answer
            warn_compile_failure("the exchange kernels", exc)
            return False
        _READY.add(key)
        logger.info("gradcomp: exchange kernels compiled for %s in %.1f s", key, time.perf_counter() - t0)
        return True
