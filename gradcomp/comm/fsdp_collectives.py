"""The quantized collectives FSDP2 calls for one module: the gradient reduce-scatter and the weight all-gather.

:func:`gradcomp.register_fsdp` installs one :class:`QuantizedReduceScatter` and one
:class:`QuantizedAllGather` per FSDP module (``FSDPModule.set_custom_reduce_scatter`` and
``set_custom_all_gather``); both run the exchange's own steps (:mod:`gradcomp.comm.exchange`) on the
module's plan (:class:`~gradcomp.comm.fsdp_plan.ModuleComm`), and count their bytes in the state's
:class:`~gradcomp.comm.fsdp_plan.Ledger`. The algorithm, its bytes and memory passes are described
in :mod:`gradcomp.comm.fsdp`.

Each takes the state's config (an :class:`~gradcomp.comm.fsdp.FSDPCompressConfig`: ``grad_format``,
``weight_format``, ``block_size``, ``error_feedback``, ``warmup_steps``, ``min_compress_numel``,
``exact_1d_weights``, ``fused``), the module's record and the ledger.
"""

from __future__ import annotations

import logging
import sys
from types import FrameType
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from gradcomp.codec import kernels
from gradcomp.comm import exchange
from gradcomp.comm.exchange import HeaderMismatch, all_gather_into
from gradcomp.comm.fsdp_plan import FLOAT_DTYPES, Ledger, ModuleComm, op_scale
from gradcomp.comm.plan import header_of

__all__ = ["QuantizedReduceScatter", "QuantizedAllGather", "reduced_params"]

logger = logging.getLogger(__name__)


def reduced_params(frame: Optional[FrameType]) -> Optional[Sequence[Any]]:
    """Return the ``FSDPParam`` objects of the reduce-scatter FSDP2 is running, in the order of its input.

    FSDP2 reduces only the parameters of a module that have a gradient (with
    ``set_reduce_scatter_unused_params(True)``: every one that requires one, zero-filled), in its
    parameter group's order. ``FSDPParamGroup.post_backward`` passes them to ``foreach_reduce``,
    which lays their gradients out as the input and calls the custom reduce-scatter with tensors
    only (torch 2.6 to 2.13). ``frame`` is the caller's frame; its ``fsdp_params`` are read when it
    is ``foreach_reduce``. None otherwise (a direct call, a torch that passes them another way).
    """
    if frame is None or frame.f_code.co_name != "foreach_reduce":
        return None
    params = frame.f_locals.get("fsdp_params")
    return params if isinstance(params, (list, tuple)) else None


class QuantizedReduceScatter:
    """FSDP2 ``ReduceScatter`` comm of one module (``allocate`` and ``__call__``).

    Args:
        config: the state's :class:`~gradcomp.comm.fsdp.FSDPCompressConfig`.
        mod: the module's :class:`~gradcomp.comm.fsdp_plan.ModuleComm`.
        ledger: where the bytes and non-finite steps are counted.
    """

    def __init__(self, config: Any, mod: ModuleComm, ledger: Ledger):
        self.config, self.mod, self.ledger = config, mod, ledger
        self._warned = False

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Return an uninitialised buffer (FSDP fills it)."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup, op: Any,
                 async_op: bool = False):
        """Reduce-scatter ``input_tensor`` (P rows) into ``output_tensor`` (this rank's row) with ``op``.

        Quantized: 1. encode the rank's gradient (+ the residuals of the parameters it holds)
        straight into the P messages; 2. all-to-all (row k to rank k), headers checked on CPU
        tensors; 3. decode the P copies of this rank's row, sum them in rank order, apply ``op``,
        straight into ``output``. Plain (warm-up, small modules, other dtypes or ops, a row whose
        parameters cannot be named): FSDP's own reduce-scatter. FSDP passes the tensors by
        keyword, with these names.
        """
        output, inp = output_tensor, input_tensor
        cfg, mod = self.config, self.mod
        P = group.size() if group is not None else dist.get_world_size()
        step = mod.step
        mod.step += 1
        row = output.numel()
        present = mod.last_present = mod.present_of(reduced_params(sys._getframe(1)), row)
        scale = op_scale(op, P)
        fmt = cfg.grad_format
        compress = (
            fmt is not None
            and P > 1
            and step >= cfg.warmup_steps
            and inp.numel() >= cfg.min_compress_numel
            and inp.dtype in FLOAT_DTYPES
            and output.dtype in FLOAT_DTYPES
            and inp.numel() == P * row
            and scale is not None
            and (present is not None or not mod.segments)  # an unknown layout: one segment, as FSDP lays it out
        )
        fp32 = (P - 1) * row * 4
        default = (P - 1) * row * inp.element_size()
        if not compress:
            if present is None and mod.segments and not self._warned:
                self._warned = True
                logger.warning(
                    "FSDP module %r: a reduce-scatter of %d values per row whose parameters could not be named "
                    "(module row: %d) runs uncompressed, its residuals untouched", mod.fqn or "<root>", row, sum(mod.segments),
                )
            fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            if getattr(op, "op", op) == dist.ReduceOp.PREMUL_SUM and scale is not None and dist.get_backend(group) == "gloo":
                # gloo has no PREMUL_SUM: sum, then multiply (what the quantized path does too)
                fn(output, inp, group=group, op=dist.ReduceOp.SUM)
                output.mul_(scale[1])
                work = None
            else:
                work = fn(output, inp, group=group, op=op, async_op=async_op)
            self.ledger.grad(mod, default, fp32, default)
            return work
        e = mod.entry("rs", row, P, fmt, cfg.block_size, inp.device, present)
        plan, bufs = e.plan, e.bufs
        # the parameters' fingerprint rides in the module field: ranks that reduce different parameters
        # of the same total length (two experts) would otherwise sum one's gradient into the other's
        header = (step, mod.index | mod.fingerprint(present) << 16)
        rank = dist.get_rank(group)
        # 1. encode: the rank's gradient (+ the residuals of the parameters it holds) straight into the P messages
        res = res_new = None
        if cfg.error_feedback:
            res, res_new = mod.residuals(plan, inp.device, present)  # the new one is committed only if all were finite
        send = exchange.encode(plan, bufs, 0, inp.view(-1), residual=res, residual_out=res_new, header=header, fused=cfg.fused)
        # a non-finite value anywhere poisons every scale this rank sends, so every rank sees it
        # (the plan has no padding blocks: every scale is rewritten by the next encode)
        _, scales, _ = bufs.to_views(0, send, P)
        kernels.poison_scales_(scales, fmt)
        # 2. all-to-all: row k to rank k
        dist.all_to_all_single(bufs.recv[0], send, group=group)
        if inp.device.type == "cpu":  # on an accelerator the check would stall the backward pass
            self._check_same_parameters(bufs.to_views(0, bufs.recv[0], P)[2], step, header[1], present)
            exchange.check_header(plan, 0, bufs.recv[0], *header, "FSDP reduce-scatter")
        # 3. decode the P copies of my row, sum them in rank order, apply the op, straight into the output
        kind, f = scale
        finite = exchange.decode_sum(
            plan, bufs, 0, rank, output.view(-1), offset=rank * row,
            divide=int(f) if kind == "div" else 1, factor=None if kind == "div" or f == 1.0 else f, fused=cfg.fused,
        )
        if cfg.error_feedback:
            mod.commit_residual(finite)
        self.ledger.finite(finite)
        self.ledger.grad(mod, (P - 1) * plan.chunks[0].message_bytes, fp32, default)
        return None

    def _check_same_parameters(self, headers: torch.Tensor, step: int, field: int, present: Optional[Sequence[int]]) -> None:
        """Raise :class:`HeaderMismatch` if a peer of this step and module reduced other parameters (their fingerprint differs)."""
        mod = self.mod
        got = headers[:, :2].tolist()
        if all(s == step and f & 0xFFFF == mod.index for s, f in got) and any(f != field for _, f in got):
            raise HeaderMismatch(
                f"ranks reduced different parameters of FSDP module {mod.fqn or '<root>'!r} at step {step}: parameter "
                f"fingerprints {[f >> 16 for _, f in got]} by rank (0: every parameter), this rank reduced parameters "
                f"{list(present if present is not None else mod.full)} of {len(mod.segments)}; FSDP2 needs every rank to "
                "reduce the same ones (set_reduce_scatter_unused_params(True) when ranks use different parameters)"
            )


class QuantizedAllGather:
    """FSDP2 ``AllGather`` comm of one module (``allocate`` and ``__call__``); arguments as :class:`QuantizedReduceScatter`'s."""

    def __init__(self, config: Any, mod: ModuleComm, ledger: Ledger):
        self.config, self.mod, self.ledger = config, mod, ledger

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Return an uninitialised buffer (FSDP fills this rank's slot)."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
        """All-gather ``input_tensor`` (this rank's slot of ``output_tensor``) into ``output_tensor``.

        Quantized: encode this rank's shard alone, all-gather the messages, decode every shard (this
        rank's too, so all ranks compute with identical weights); 1-D parameters arrive unquantized
        by a second small all-gather with ``exact_1d_weights``. Plain: FSDP's own all-gather.
        """
        output, inp = output_tensor, input_tensor
        cfg, mod = self.config, self.mod
        P = group.size() if group is not None else dist.get_world_size()
        n = inp.numel()
        fmt = cfg.weight_format
        compress = (
            fmt is not None
            and P > 1
            and mod.step >= cfg.warmup_steps
            and output.numel() >= cfg.min_compress_numel
            and inp.dtype in FLOAT_DTYPES
            and output.dtype == inp.dtype
            and output.numel() == P * n
        )
        fp32 = (P - 1) * n * 4
        default = (P - 1) * n * inp.element_size()
        if not compress:
            fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            work = fn(output, inp, group=group, async_op=async_op)
            self.ledger.weight(mod, default, fp32, default)
            return work
        e = mod.entry("ag", n, P, fmt, cfg.block_size, inp.device)
        header = (mod.step, mod.index)
        # the input is this rank's slot of the output: encode reads it before decode writes the output
        mine = exchange.encode(e.plan1, e.bufs1, 0, inp.view(-1), header=header, fused=cfg.fused)
        gathered = e.bufs.gathered[0]
        all_gather_into(gathered, mine, group)
        exact = mod.exact_index(n, inp.device) if cfg.exact_1d_weights else None
        if exact is not None:  # read before decode overwrites this rank's slot
            exact_all = torch.empty(P * exact.numel(), dtype=inp.dtype, device=inp.device)
            all_gather_into(exact_all, inp.view(-1).index_select(0, exact), group)
        if inp.device.type == "cpu":
            _, _, hdr = e.bufs.to_views(0, gathered, P)
            want = torch.tensor(header_of(e.plan1, 0, *header), dtype=torch.int32)
            if not bool((hdr == want).all()):
                raise HeaderMismatch(
                    f"ranks out of step in the FSDP all-gather of module {mod.fqn!r}: headers {hdr.tolist()}, "
                    f"this rank expected {want.tolist()} (step, module, chunk << 8 | format id, numel)"
                )
        # every rank decodes every shard, its own too: all ranks compute with identical weights
        exchange.decode(e.plan, e.bufs, 0, output.view(-1), fused=cfg.fused)
        sent = (P - 1) * e.plan.chunks[0].message_bytes
        if exact is not None:
            output.view(P, n).index_copy_(1, exact, exact_all.view(P, -1))
            sent += (P - 1) * exact.numel() * exact_all.element_size()
        self.ledger.weight(mod, sent, fp32, default)
        return None
