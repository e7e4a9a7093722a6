"""FSDP2 with quantized collectives: an int8/int4 gradient reduce-scatter and an int8 weight all-gather.

One line on a model already wrapped with ``torch.distributed.fsdp.fully_shard``::

    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    state = gradcomp.register_fsdp(model, grad_bits=8, weight_bits=8)
    # ... train as usual; state.stats() tells the bytes; state.state_dict() goes in the checkpoint

Every FSDP module gets its own reduce-scatter and all-gather (``FSDPModule.set_custom_reduce_scatter``
and ``set_custom_all_gather``; :mod:`gradcomp.comm.fsdp_collectives`), which FSDP calls with the
module's flat buffers. Widths are wire formats (:class:`~gradcomp.codec.formats.WireFormat`):
``grad_bits`` and ``weight_bits`` take a format name (``"int4"``) or the bits shorthand (``4``).

Reduce-scatter of a module's gradients, on P ranks: the first half of gradcomp's two-phase exchange,
with the exchange's own steps (:mod:`gradcomp.comm.exchange`):

1. FSDP lays the gradients out as ``input.view(P, row)``: row k holds chunk k of every parameter
   that has a gradient this step, in the module's order (FSDP2 leaves out the others: a branch not
   taken, an expert not routed to, a frozen parameter; ``foreach_reduce``'s ``fsdp_params`` name
   them, :func:`~gradcomp.comm.fsdp_collectives.reduced_params`). The exchange is planned for ``P``
   copies of those parameters' segments, each starting on a block boundary, as one chunk, so its
   shard k is exactly row k. ``exchange.encode`` quantizes the rank's gradient (+ each parameter's
   own residual) straight into the P messages and leaves the new residuals; the absent parameters'
   residuals are kept as they are, for the next step in which they have a gradient.
2. All-to-all: message k (row k's codes, fp32 scales and a header of step, module and a fingerprint
   of the parameters reduced) goes to rank k; the headers are checked (CPU tensors; on an
   accelerator the check would stall the backward pass).
3. ``exchange.decode_sum``: rank k dequantizes the P copies of its row, sums them in rank order
   0..P-1 in fp32, applies FSDP's op (AVG: / P, SUM, PREMUL_SUM: * factor) and writes its output
   shard in FSDP's reduce dtype, in one pass, without requantizing.

Bytes each rank sends: ``(P - 1) * message_bytes``, a message being the aligned row's codes
(``aligned_row * bits / 8``, ``aligned_row``: the row's parameters, each rounded up to whole blocks),
its scales (``4 * aligned_row / block_size``) and a 16-byte header,
against ``(P - 1) * row * 4`` for FSDP's fp32 reduce-scatter: 0.254x for int8 and 0.129x for int4
with ``block_size=256`` (a little more where parameters are padded to whole blocks).

Memory passes of a reduce-scatter, int8, fp32 gradients, in units of one pass over the module's whole
fp32 gradient: encode 3.25 (read the gradient and the residual, write the new residual and the
codes), decode_sum 0.25 + 1/P (read the P received copies of the row's codes, write the output
row): 4 at P = 2, 3.6 at P = 8 (three more on an accelerator, where the new residual is committed
with ``torch.where`` to avoid a host sync). ``encode`` reads whole blocks straight from FSDP's
buffer and ``decode_sum`` writes them straight into FSDP's output; only each parameter's ragged
last block is staged. Nothing of module size is allocated per call: the residual is double-buffered
and the messages persist per module. A row that holds other parameters than the module's previous
row first moves residuals between the last row's layout and the full row's (where the absent
parameters' wait): 2 passes over the previous row's residuals unless it was full, 2 over the new
row's unless it is full; rows that keep holding the same parameters (a frozen one) move nothing.

All-gather of a module's parameters (``weight_bits=8``): each rank encodes its shard alone (int8, one
fp32 scale per block, blocks aligned per parameter), the messages are all-gathered, and every rank
decodes every shard (``exchange.decode``), its own included, so all ranks compute with identical
weights. The sharded parameters the optimizer updates stay in full precision; only the gathered copy
is quantized. 1-D parameters (norm gains, biases) are sent unquantized by default
(``exact_1d_weights``): a second, small all-gather of their values overwrites their decoded slots.

Codec kernels: as in the DDP hook, the fused kernels run from the first compressed collective: the
native C++ kernels on CPU (built at install), on CUDA the ``torch.compile`` ones, compiled and checked
bit-identical to the eager ones by :func:`register_fsdp` before training starts (nothing compiles beside
the training).

Guarantees, as in the DDP hook: plain collectives for the first ``warmup_steps`` steps of each module
and for modules under ``min_compress_numel`` elements (the same decision on every rank: it depends on
sizes, the step and the op only); a non-finite gradient on any rank makes every scale that rank sends
non-finite, so every rank's output shard is non-finite and every rank leaves its residual unchanged
that step (a skipped AMP step leaves no trace); each parameter's residual follows that parameter
only, across steps in which it has no gradient (a row without it, a zero-filled row with
``set_reduce_scatter_unused_params(True)``, which is a gradient of zeros and takes the residual as any
gradient does, or no reduce-scatter of the module at all); ranks that reduce different parameters get
a clear error; residuals per module, parameter and rank in :meth:`state_dict`, resumable bit-exactly.

HSDP: FSDP2's native HSDP (a 2-D mesh, replicate x shard) calls ``dist.all_reduce`` on the replicate
group itself (torch 2.13); ``set_all_reduce_hook`` runs *after* that all-reduce and cannot replace
it, and ``set_requires_all_reduce(False)`` leaves the gradients unassigned. Its reduce-scatter is
quantized, its replicate all-reduce is not. Sharding on the shard dimension only (a 1-D mesh) and
passing ``replicate_group=`` gives the same HSDP with the replicate all-reduce quantized too: on a
1-D mesh FSDP2 calls the all-reduce hook with the reduce-scatter output before it assigns the
gradients (:mod:`gradcomp.comm.fsdp_replicate`). A step in which some of a module's parameters have
no gradient all-reduces its shard across the replicas uncompressed.

Memory: error feedback keeps, per module and rank, an fp32 residual of the module's whole (unsharded,
block-aligned) gradient, every parameter's in its own columns: 4 bytes per model parameter on every
rank (``error_feedback=False`` drops it), plus a second one of the module being reduced while it is
reduced (the new residual is committed only when every rank was finite). A module whose rows
change from step to step holds up to twice that: the last row's residuals and spare, the full row's
buffer where the absent parameters' residuals wait, and the other layout's spare, kept for the next
change. The message buffers persist per module: ``2 * bits / 8`` bytes per parameter for the
reduce-scatter (send and receive) and ``1 + 1 / P`` for the int8 all-gather.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from gradcomp.checks import check_is_int
from gradcomp.codec import kernels
from gradcomp.codec.formats import FORMATS, WireFormat, wire_format
from gradcomp.comm import guard
from gradcomp.comm.fsdp_collectives import QuantizedAllGather, QuantizedReduceScatter
from gradcomp.comm.fsdp_plan import FLOAT_DTYPES, Ledger, ModuleComm
from gradcomp.comm.fsdp_replicate import ReplicateAllReduce

logger = logging.getLogger(__name__)

__all__ = ["FSDPCompressConfig", "FSDPCompressState", "register_fsdp", "WEIGHT_FORMATS"]

#: The formats the weight all-gather may use: the 8-bit ones (int8, fp8_e4m3, fp8_e5m2, mxint8,
#: mxfp8 and their rotations). A weight requantized every step at 4 or 2 bits moves by whole coarse
#: steps and has no error feedback to recover what they lose; the gradient reduce-scatter takes
#: every registered format.
WEIGHT_FORMATS = tuple(name for name, f in FORMATS.items() if f.bits == 8)

Width = Union[int, str, None]


def _width(name: str, value: Width, allowed=None) -> Optional[Union[int, str]]:
    """``value`` as a config keeps it: None, or the :attr:`WireFormat.short` spelling of the format it names."""
    if value is None:
        return None
    fmt = wire_format(value, name)
    if allowed is not None and fmt.name not in allowed:
        raise ValueError(f"{name} must be one of {allowed} (or its bits) or None, got {value!r}")
    return fmt.short


@dataclass(frozen=True)
class FSDPCompressConfig:
    """User knobs of the quantized FSDP2 collectives, validated on construction.

    Attributes:
        grad_bits: wire format of the gradients in the reduce-scatter: a registered format name
            (``"int8"``, ``"int4"``, ``"int2"``, ``"fp8_e4m3"``, ``"mxfp4"``, ``"int4r"``, ...) or its
            bits (8, 4, 2), kept in the shorter spelling
            (:attr:`~gradcomp.codec.formats.WireFormat.short`); None for FSDP's own reduce-scatter.
        weight_bits: wire format of the parameters in the all-gather, an 8-bit one (``"int8"`` or
            8, ``"fp8_e4m3"``, ``"mxfp8"``, ...; :data:`WEIGHT_FORMATS`) or None for FSDP's own.
        block_size: elements per block (one fp32 scale, the rotation's span, whole MX groups of 32);
            a positive multiple of 8 that both formats can cut.
        error_feedback: keep what gradient quantization left behind and add it the next step.
        warmup_steps: steps of plain collectives first, for gradients and weights alike (per module;
            a step is one reduce-scatter of the module).
        exact_1d_weights: in the weight all-gather, send 1-D parameters (norm gains, biases)
            unquantized, in their own dtype, by a second small all-gather: they are a small share
            of the parameters (0.8% of TinyGPT 'small', 0.02% of the comm-bound preset) and the
            most sensitive to a fixed quantization step (a norm gain near 1 moves by less than
            one int8 step per optimizer step).
        min_compress_numel: modules with fewer (unsharded) elements use FSDP's own collectives
            (with ``replicate_group``: the replicate all-reduce compares its shard's size).
        fused: run the fused codec kernels, as the DDP hook does: native C++ on CPU, ``torch.compile``
            on CUDA (compiled by :func:`register_fsdp`); bit-identical to the eager reference kernels,
            which ``False`` runs instead (slower; for debugging).
        compile: deprecated name of ``fused``.
    """

    grad_bits: Width = 8
    weight_bits: Width = None
    block_size: int = 256
    error_feedback: bool = True
    exact_1d_weights: bool = True
    warmup_steps: int = 10
    min_compress_numel: int = 16384
    fused: bool = True
    compile: Optional[bool] = None

    def __post_init__(self):
        if self.compile is not None:
            warnings.warn("FSDPCompressConfig(compile=...) is deprecated; use fused=...", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "fused", self.compile)
            object.__setattr__(self, "compile", None)
        object.__setattr__(self, "grad_bits", _width("grad_bits", self.grad_bits))
        object.__setattr__(self, "weight_bits", _width("weight_bits", self.weight_bits, WEIGHT_FORMATS))
        check_is_int("block_size", self.block_size)
        if self.block_size < 8 or self.block_size % 8:
            raise ValueError(f"block_size must be a positive multiple of 8 (e.g. 64, 128, 256), got {self.block_size}")
        for fmt, what in ((self.grad_format, "grad_bits"), (self.weight_format, "weight_bits")):
            if fmt is not None:
                fmt.check_block_size(self.block_size, f"block_size ({what}={fmt.name})")
        for name in ("warmup_steps", "min_compress_numel"):
            check_is_int(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("error_feedback", "exact_1d_weights", "fused"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__} {getattr(self, name)!r}")

    @property
    def grad_format(self) -> Optional[WireFormat]:
        """The :class:`~gradcomp.codec.formats.WireFormat` of the gradient reduce-scatter, or None."""
        return None if self.grad_bits is None else wire_format(self.grad_bits)

    @property
    def weight_format(self) -> Optional[WireFormat]:
        """The :class:`~gradcomp.codec.formats.WireFormat` of the weight all-gather, or None."""
        return None if self.weight_bits is None else wire_format(self.weight_bits)


class FSDPCompressState:
    """All per-run data of the quantized FSDP2 collectives on one rank; :func:`register_fsdp` builds it.

    Fields, by role:
        user knobs: ``config`` (a :class:`FSDPCompressConfig`);
        internal buffers: ``modules``, one :class:`~gradcomp.comm.fsdp_plan.ModuleComm` per FSDP module
        (keyed by its qualified name in the model: the error-feedback residual, the step count,
        cached layouts), ``replicas`` with ``replicate_group``;
        statistics: ``ledger`` (a :class:`~gradcomp.comm.fsdp_plan.Ledger`), read by :meth:`stats`.

    The state holds no process group: FSDP passes its own group to every call.
    """

    def __init__(self, config: FSDPCompressConfig):
        if not isinstance(config, FSDPCompressConfig):
            raise TypeError(f"config must be an FSDPCompressConfig, got {type(config).__name__}")
        self.config = config
        self.modules: Dict[str, ModuleComm] = {}
        self.replicas: Dict[str, ReplicateAllReduce] = {}  # fqn -> its all-reduce across replicas (replicate_group=)
        self.world_size: Optional[int] = None
        self.rank: Optional[int] = None
        self.ledger = Ledger()  # bytes sent and non-finite steps, for stats()
        self.kernels = kernels.backend("cpu", config.fused)  # set by register_fsdp for the model's device

    # ---- statistics

    def stats(self) -> Dict[str, Any]:
        """Return the bytes this rank sent, and what FSDP's fp32 collectives would have sent.

        Keys: ``step`` (fewest reduce-scatters of any module), ``grad_bytes_step`` /
        ``grad_fp32_bytes_step`` (the last reduce-scatter of every module), ``weight_bytes_step`` /
        ``weight_fp32_bytes_step`` (every module's all-gathers before its last reduce-scatter: forward
        and backward re-gathers), their ratios ``grad_ratio`` and ``weight_ratio`` (sent / fp32),
        totals ``*_total`` (``*_default_bytes_total``: FSDP's own collectives in the dtypes it
        would have used), and ``nonfinite_steps`` (module reduce-scatters that met a non-finite value).
        With ``replicate_group``: ``replicate_bytes_step`` / ``replicate_fp32_bytes_step`` (the last
        all-reduce across replicas of every module; fp32: a ring all-reduce), ``replicate_ratio``,
        ``replicate_bytes_total`` / ``replicate_fp32_bytes_total``.
        """
        with self.ledger.lock:
            mods = list(self.modules.values())
            t = dict(self.ledger.totals)
            g = [m.last_grad for m in mods]
            w = [m.last_weight for m in mods]
            nonfinite = int(self.ledger.nonfinite) if self.ledger.nonfinite is not None else 0
            r = [x.last for x in self.replicas.values()]
        rs, rf = sum(a for a, _ in r), sum(b for _, b in r)
        gs, gf = sum(a for a, _ in g), sum(b for _, b in g)
        ws, wf = sum(a for a, _ in w), sum(b for _, b in w)
        return {
            "step": min((m.step for m in mods), default=0),
            "grad_bytes_step": gs,
            "grad_fp32_bytes_step": gf,
            "grad_ratio": gs / gf if gf else float("nan"),
            "weight_bytes_step": ws,
            "weight_fp32_bytes_step": wf,
            "weight_ratio": ws / wf if wf else float("nan"),
            "grad_bytes_total": t["grad_sent"],
            "grad_fp32_bytes_total": t["grad_fp32"],
            "grad_default_bytes_total": t["grad_default"],
            "weight_bytes_total": t["weight_sent"],
            "weight_fp32_bytes_total": t["weight_fp32"],
            "weight_default_bytes_total": t["weight_default"],
            "nonfinite_steps": nonfinite,
            "replicate_bytes_step": rs,
            "replicate_fp32_bytes_step": rf,
            "replicate_ratio": rs / rf if rf else float("nan"),
            "replicate_bytes_total": t["replicate_sent"],
            "replicate_fp32_bytes_total": t["replicate_fp32"],
        }

    # ---- checkpointing

    def state_dict(self) -> Dict[str, Any]:
        """Return this rank's residuals and steps per module (tensors on CPU), the config and the byte totals.

        ``residuals[fqn][i]`` is the residual of parameter ``i`` of the module (its index in FSDP's
        parameter group), a ``(P, aligned)`` fp32 tensor: row ``k`` for the parameter's shard ``k``,
        zero-padded to whole blocks. A parameter that never had a compressed gradient has zeros.
        """
        B = self.config.block_size
        with self.ledger.lock:
            residuals = {k: m.residual_state(B) for k, m in self.modules.items()}
            return {
                "stats": dict(self.ledger.totals, nonfinite_steps=int(self.ledger.nonfinite) if self.ledger.nonfinite is not None else 0),
                "config": asdict(self.config),
                "world_size": self.world_size,
                "rank": self.rank,
                "steps": {k: m.step for k, m in self.modules.items()},
                "residuals": {k: r for k, r in residuals.items() if r is not None},
                "replicate_residuals": {
                    k: (r.residual.detach().cpu().clone(), r.server_residual.detach().cpu().clone())
                    for k, r in self.replicas.items() if r.residual is not None
                },
            }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned on the same rank of a job of the same size, model and config.

        Raises:
            TypeError: if ``state_dict`` is not one.
            ValueError: if the world size, the rank, a wire-relevant option, the set of modules or a
                parameter's residual (index, shape, dtype, finiteness) does not fit (nothing is changed then).
        """
        if not isinstance(state_dict, dict) or "config" not in state_dict or "residuals" not in state_dict:
            raise TypeError(f"state_dict must be a dict made by FSDPCompressState.state_dict(), got {type(state_dict).__name__}")
        if state_dict["world_size"] != self.world_size or state_dict["rank"] != self.rank:
            raise ValueError(
                f"checkpoint is for rank {state_dict['rank']} of {state_dict['world_size']}, "
                f"this state is rank {self.rank} of {self.world_size}"
            )
        saved = state_dict["config"]
        for name in ("grad_bits", "block_size", "error_feedback"):
            if saved.get(name) != getattr(self.config, name):
                raise ValueError(f"checkpoint has {name}={saved.get(name)!r}, this state has {name}={getattr(self.config, name)!r}")
        steps, residuals = state_dict["steps"], state_dict["residuals"]
        if set(steps) != set(self.modules):
            raise ValueError(
                f"checkpoint has FSDP modules {sorted(steps)}, this model has {sorted(self.modules)}"
            )
        unknown = set(residuals) - set(self.modules)
        if unknown:
            raise ValueError(f"checkpoint has residuals of FSDP modules {sorted(unknown)} this model does not have")
        replicated = state_dict.get("replicate_residuals", {})
        if set(replicated) - set(self.replicas):
            raise ValueError(
                f"checkpoint has replicate residuals of {sorted(set(replicated) - set(self.replicas))}; this state "
                f"all-reduces across replicas for {sorted(self.replicas)} (was it built with the same replicate_group?)"
            )
        stats = state_dict.get("stats")  # the totals go on counting after a resume (absent from older checkpoints)
        if stats is not None and (
            not isinstance(stats, dict) or set(stats) != set(self.ledger.totals) | {"nonfinite_steps"}
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in stats.values())
        ):
            raise ValueError(f"checkpoint stats must map {sorted(set(self.ledger.totals) | {'nonfinite_steps'})} to ints >= 0, got {stats!r}")
        residuals = {k: self.modules[k].check_residual_state(r, self.config.block_size) for k, r in residuals.items()}
        for k, r in [(k, t) for k, pair in replicated.items() for t in pair]:
            if not isinstance(r, torch.Tensor) or r.dtype != torch.float32 or r.dim() != 1:
                raise ValueError(f"residual of {k!r} must be a 1-D float32 tensor, got {type(r).__name__} {getattr(r, 'dtype', '')}")
        with self.ledger.lock:
            for k, m in self.modules.items():
                m.step = int(steps[k])
                m.load_residuals(residuals.get(k), self.config.block_size)
                m.pending_weight = (0, 0)
            for k, r in self.replicas.items():
                r.residual, r.server_residual = (t.clone() for t in replicated[k]) if k in replicated else (None, None)
            if stats is not None:
                self.ledger.totals.update({k: v for k, v in stats.items() if k in self.ledger.totals})
                self.ledger.nonfinite = torch.tensor(stats["nonfinite_steps"], dtype=torch.int64) if stats["nonfinite_steps"] else None


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 keeps it here
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def _collective_dtypes(module: torch.nn.Module, groups: Any) -> List[torch.dtype]:
    """The float dtypes FSDP's collectives of ``module`` will carry: its parameters' and its mixed-precision policy's."""
    found = [p.dtype for p in module.parameters() if p.dtype in FLOAT_DTYPES]
    policy = getattr(groups[0], "mp_policy", None) if groups else None
    for name in ("param_dtype", "reduce_dtype"):
        dtype = getattr(policy, name, None)
        if dtype in FLOAT_DTYPES:
            found.append(dtype)
    return found


def _param_segments(module: torch.nn.Module) -> Tuple[Tuple[int, ...], Tuple[bool, ...], Tuple[Any, ...]]:
    """Per-parameter lengths of one rank's row of the module's flat buffers (FSDP's padded shards), which are 1-D, and FSDP's parameters.

    Read from FSDP's parameter group; empty tuples when that is not available (the row is then
    quantized as one segment, which lets blocks straddle parameters and keeps error feedback only
    while the row's length stays the same, and every parameter is quantized in the all-gather).
    """
    try:
        groups = module._get_fsdp_state()._fsdp_param_groups
        params = tuple(groups[0].fsdp_params) if groups else ()
        sizes = tuple(int(torch.Size(fp.padded_sharded_param_size).numel()) for fp in params)
    except Exception:  # private FSDP internals moved: fall back to one segment
        logger.warning("FSDP module of type %s: FSDP's parameter layout is unreadable; its rows are quantized as one segment",
                       type(module).__name__)
        return (), (), ()
    try:
        one_d = tuple(len(fp._orig_size) <= 1 for fp in params)
    except Exception:
        one_d = ()
    return sizes, one_d, params


def _check_ranks_agree(config: FSDPCompressConfig, installed, targets, replicate_group) -> None:
    """Raise the same ``ValueError`` on every rank when the ranks passed different options or models.

    Compares (one ``all_gather_object`` over the FSDP modules' shard group, before anything is
    installed) every option except ``fused`` (the fused and eager kernels give the same bits), the
    FSDP modules with their parameter sizes, and whether a replicate group was given: a difference in
    any of them would make the ranks' collectives disagree in size or meaning, and hang or corrupt.
    """
    mine = guard.wire_config(config, dist.get_world_size())
    mine.update({k: v for k, v in asdict(config).items() if k not in ("fused", "compile")})
    mine["fsdp_modules"] = [(name, [int(n) for n in mod.segments], [bool(e) for e in mod.exact]) for name, _, mod in installed]
    mine["replicate_group"] = replicate_group is not None
    group = None
    for _, m in targets:
        groups = getattr(m._get_fsdp_state(), "_fsdp_param_groups", None) or []
        info = getattr(groups[0], "mesh_info", None) if groups else None
        group = getattr(info, "shard_process_group", None)
        if group is not None:
            break
    timeout = guard.group_timeout(group, dist.get_backend(group), None)
    guard.check_agreement(mine, group, timeout)


def register_fsdp(
    model: torch.nn.Module,
    grad_bits: Width = 8,
    weight_bits: Width = None,
    replicate_group: Optional[dist.ProcessGroup] = None,
    **options: Any,
) -> FSDPCompressState:
    """Install the quantized reduce-scatter and all-gather on every FSDP module of ``model``; return the state.

    Call it on every rank after ``fully_shard`` (on the submodules and the root) and before the
    first step. FSDP's collectives of each module go through gradcomp from then on. The FSDP2
    counterpart of :func:`gradcomp.register` (DDP).

    Args:
        model: a model wrapped with ``torch.distributed.fsdp.fully_shard`` (the root or any FSDP module).
        grad_bits: the gradient reduce-scatter's wire format: ``"int8"``/8, ``"int4"``/4,
            ``"int2"``/2 or any registered format (``"mxfp4"``, ``"int4r"``, ...); None leaves FSDP's own.
        weight_bits: an 8-bit format for the parameter all-gather (``"int8"``/8, ``"fp8_e4m3"``,
            ``"mxfp8"``, ...); None (default) leaves FSDP's own.
        replicate_group: HSDP with a quantized all-reduce across replicas: the model is sharded with
            ``fully_shard`` on the shard dimension only (a 1-D mesh) and this is the group of the
            replicas of this rank's shard (:mod:`gradcomp.comm.fsdp_replicate`). ``grad_bits`` is
            used for both exchanges. FSDP2's native HSDP (a 2-D mesh) cannot be compressed: its
            replicate all-reduce has no hook, and it is refused together with ``replicate_group``.
        **options: the other fields of :class:`FSDPCompressConfig` (``block_size``, ``error_feedback``,
            ``warmup_steps``, ``min_compress_numel``, ``fused``).

    Returns:
        The :class:`FSDPCompressState` (``stats()``, ``state_dict()``, ``load_state_dict()``).

    Raises:
        TypeError: if ``model`` holds no FSDP module, or an option is unknown.
        ValueError: if an option is out of range or torch.distributed is not initialized.

    Example:
        >>> state = gradcomp.register_fsdp(model, grad_bits=4, weight_bits=8)  # doctest: +SKIP
        >>> state.stats()["grad_ratio"]                                       # doctest: +SKIP
        0.129
    """
    unknown = set(options) - set(FSDPCompressConfig.__dataclass_fields__) - {"grad_bits", "weight_bits"}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; expected some of {sorted(FSDPCompressConfig.__dataclass_fields__)}")
    config = FSDPCompressConfig(grad_bits=grad_bits, weight_bits=weight_bits, **options)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module wrapped with fully_shard, got {type(model).__name__}")
    cls = _fsdp_module_class()
    if cls is None:
        raise TypeError(f"this torch ({torch.__version__}) has no FSDP2 (torch.distributed.fsdp.fully_shard); torch >= 2.6 is needed")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]
    if not targets:
        raise TypeError(f"model holds no FSDP module: wrap it with torch.distributed.fsdp.fully_shard first (got {type(model).__name__})")
    for name, m in targets:
        if not hasattr(m, "set_custom_reduce_scatter") or not hasattr(m, "set_custom_all_gather"):
            raise TypeError(f"this torch ({torch.__version__}) has no FSDPModule.set_custom_reduce_scatter; a newer torch is needed")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed must be initialized (dist.init_process_group) before register_fsdp")
    if replicate_group is not None and not isinstance(replicate_group, dist.ProcessGroup):
        raise TypeError(f"replicate_group must be a torch.distributed.ProcessGroup or None, got {type(replicate_group).__name__}")
    state = FSDPCompressState(config)
    state.world_size, state.rank = dist.get_world_size(), dist.get_rank()
    installed: List[Tuple[str, torch.nn.Module, ModuleComm]] = []
    dtypes: Dict[torch.dtype, None] = {}  # what the collectives carry
    for name, m in targets:
        groups = getattr(m._get_fsdp_state(), "_fsdp_param_groups", None)
        if groups is not None and len(groups) == 0:
            continue  # no parameters of its own: FSDP runs no collective for it
        if groups is not None and len(groups) > 1:
            raise ValueError(f"FSDP module {name or '<root>'!r} has {len(groups)} parameter groups; gradcomp needs one per module")
        if groups and getattr(groups[0], "_is_hsdp", False):
            if replicate_group is not None:
                raise ValueError(
                    f"FSDP module {name or '<root>'!r} is native HSDP (a 2-D mesh), which all-reduces across replicas "
                    "itself; with replicate_group, shard it on the shard dimension only (mesh['shard'])"
                )
            logger.warning(
                "FSDP module %r is native HSDP: its replicate all-reduce stays uncompressed (FSDP2 has no hook to "
                "replace it); shard on mesh['shard'] and pass replicate_group= to compress it", name or "<root>",
            )
        installed.append((name, m, ModuleComm(name, len(installed), *_param_segments(m))))
        dtypes.update(dict.fromkeys(_collective_dtypes(m, groups)))
    _check_ranks_agree(config, installed, targets, replicate_group)
    for name, m, mod in installed:  # validated all first: either every module is changed or none
        state.modules[name] = mod
        # installed even for None widths: FSDP's own collective then runs, counted in the statistics
        m.set_custom_reduce_scatter(QuantizedReduceScatter(config, mod, state.ledger))
        m.set_custom_all_gather(QuantizedAllGather(config, mod, state.ledger))
        if replicate_group is not None:
            state.replicas[name] = ReplicateAllReduce(config, mod, replicate_group, state.ledger)
            m.set_all_reduce_hook(state.replicas[name])
    device = next((p.device for _, m, _ in installed for p in m.parameters()), torch.device("cpu"))
    formats = [f for f in (config.grad_format, config.weight_format) if f is not None]
    dtypes = tuple(dict.fromkeys((torch.float32, *dtypes)))
    # before any training step: on CUDA the kernels compile here, never beside the training
    state.kernels = kernels.prepare(device, dtypes, formats, config.block_size, fused=config.fused)
    logger.info("gradcomp FSDP2: %s on %d modules, %d ranks, %s kernels", config, len(installed), state.world_size, state.kernels)
    return state

