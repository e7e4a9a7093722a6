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

from typing import Any, Sequence

import torch
import torch.distributed as dist

from gradcomp.codec import kernels
from gradcomp.comm import exchange
from gradcomp.comm.exchange import HeaderMismatch, all_gather_into
from gradcomp.comm.fsdp_plan import FLOAT_DTYPES, Ledger, ModuleComm, op_scale
from gradcomp.comm.plan import header_of

__all__ = ["QuantizedReduceScatter", "QuantizedAllGather"]


class QuantizedReduceScatter:
    """FSDP2 ``ReduceScatter`` comm of one module (``allocate`` and ``__call__``).

    Args:
        config: the state's :class:`~gradcomp.comm.fsdp.FSDPCompressConfig`.
        mod: the module's :class:`~gradcomp.comm.fsdp_plan.ModuleComm`.
        ledger: where the bytes and non-finite steps are counted.
    """

    def __init__(self, config: Any, mod: ModuleComm, ledger: Ledger):
        self.config, self.mod, self.ledger = config, mod, ledger

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Return an uninitialised buffer (FSDP fills it)."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup, op: Any,
                 async_op: bool = False):
        """Reduce-scatter ``input_tensor`` (P rows) into ``output_tensor`` (this rank's row) with ``op``.

        Quantized: 1. encode the rank's whole gradient (+ residual) straight into the P messages;
        2. all-to-all (row k to rank k), headers checked on CPU tensors; 3. decode the P copies of
        this rank's row, sum them in rank order, apply ``op``, straight into ``output``. Plain
        (warm-up, small modules, other dtypes or ops): FSDP's own reduce-scatter. FSDP passes the
        tensors by keyword, with these names.
        """
        output, inp = output_tensor, input_tensor
        cfg, mod = self.config, self.mod
        P = group.size() if group is not None else dist.get_world_size()
        step = mod.step
        mod.step += 1
        row = output.numel()
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
        )
        fp32 = (P - 1) * row * 4
        default = (P - 1) * row * inp.element_size()
        if not compress:
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
        e = mod.entry("rs", row, P, fmt, cfg.block_size, inp.device)
        plan, bufs = e.plan, e.bufs
        header = (step, mod.index)
        rank = dist.get_rank(group)
        # 1. encode: the rank's whole gradient (+ residual) straight into the P messages
        res = res_new = None
        if cfg.error_feedback:
            res, res_new = mod.residuals(plan.padded_numel, inp.device)  # the new one is committed only if all were finite
        send = exchange.encode(plan, bufs, 0, inp.view(-1), residual=res, residual_out=res_new, header=header, fused=cfg.fused)
        # a non-finite value anywhere poisons every scale this rank sends, so every rank sees it
        # (the plan has no padding blocks: every scale is rewritten by the next encode)
        _, scales, _ = bufs.to_views(0, send, P)
        kernels.poison_scales_(scales, fmt)
        # 2. all-to-all: row k to rank k
        dist.all_to_all_single(bufs.recv[0], send, group=group)
        if inp.device.type == "cpu":  # on an accelerator the check would stall the backward pass
            exchange.check_header(plan, 0, bufs.recv[0], step, mod.index, "FSDP reduce-scatter")
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
