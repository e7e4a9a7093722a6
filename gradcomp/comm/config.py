"""The DDP hook's options: :class:`HookConfig`, a frozen dataclass validated on construction.

Every bad value raises ``TypeError`` or ``ValueError`` naming the field, what is allowed and what came,
before any training step. The options that shape the wire (:data:`gradcomp.comm.guard.WIRE_FIELDS`)
are compared across the ranks when the hook's state is built.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from gradcomp.checks import check_is_int
from gradcomp.codec.formats import WireFormat, wire_format
from gradcomp.comm import guard
from gradcomp.comm.policy import PolicyConfig
from gradcomp.comm.topology import Topology

__all__ = ["HookConfig"]


@dataclass(frozen=True)
class HookConfig:
    """User knobs of the quantized all-reduce hook, validated on construction.

    Attributes:
        bits: code width of the gradients on the wire, one of (2, 4, 8): shorthand for ``format``
            (``bits=8`` is ``format="int8"``).
        format: the wire format by name (:data:`gradcomp.codec.FORMATS`: ``"int8"``, ``"int4"``,
            ``"int2"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"mxint8"``, ``"mxfp8"``, ``"mxfp4"``, and each
            with an ``r`` for its rotated variant, e.g. ``"int2r"``); None: the one ``bits`` names.
            Filled in on construction, so that ``config.format`` always names the format and
            ``config.bits`` its width.
        block_size: elements per block: one fp32 scale per block (int and fp8 formats), the span of
            the rotation (rotated formats: a power of two >= 16), whole groups of 32 for the MX
            formats; a positive multiple of 8. Smaller blocks track outliers better and cost
            ``32 / block_size`` extra bits per element (fp32 scales).
        error_feedback: keep what quantization left behind and add it to the next step (both at the
            worker and at the shard owner). Strongly recommended below 8 bits.
        warmup_steps: steps of plain all-reduce first. DDP rebuilds its buckets after the first
            iteration (the second with ``static_graph=True``), so at least 1 with error feedback.
        min_compress_numel: buckets with fewer elements go through plain all-reduce.
        stochastic_rounding: unbiased stochastic rounding instead of round-to-nearest.
        seed: seed of the stochastic rounding noise (combined with rank, step and bucket).
        fused: run the fused codec kernels: native C++ on CPU (built at install, one pass over memory,
            ready at the first step), ``torch.compile`` on CUDA (compiled by :func:`register`, or at
            the first bucket, before any exchange; never on a thread beside the training). They are
            bit-identical to the eager reference kernels, which ``False`` runs instead (several
            times slower; for debugging) and which answer wherever the fused ones cannot run.
        compile: deprecated name of ``fused``.
        chunk_numel: values per chunk of the pipelined exchange; chunks are exchanged one after
            another with the wire and the CPU busy at the same time. None (default): ``2**20``
            values per rank, ``P * 2**20`` in all (:func:`~gradcomp.comm.plan.chunk_numel_for`),
            so that each collective's messages stay large as P grows.
        log_every: log the statistics every this many steps from the group's first rank (0: never).
        topology: ranks per node (:class:`~gradcomp.comm.topology.Topology`) for the hierarchical
            exchange: fp32 inside each node, the quantized two-phase exchange only between nodes
            (:mod:`gradcomp.comm.hierarchical`). None: the flat exchange over all ranks.
        policy: a :class:`~gradcomp.comm.policy.PolicyConfig` to choose per bucket between plain
            all-reduce and the quantized widths from the measured network (:mod:`gradcomp.comm.policy`);
            ``bits`` is then not used. None: every compressed bucket uses ``bits`` (a pinned choice).
        timeout: seconds after which a collective of the hook fails when a peer does not answer.
            None: the timeout of the process group averaged over (``init_process_group(timeout=...)``),
            else torch's default for the backend.
    """

    bits: int = 8
    format: Optional[str] = None
    block_size: int = 256
    error_feedback: bool = True
    warmup_steps: int = 10
    min_compress_numel: int = 16384
    stochastic_rounding: bool = False
    seed: int = 0
    fused: bool = True
    chunk_numel: Optional[int] = None
    log_every: int = 100
    topology: Optional[Topology] = None
    policy: Optional[PolicyConfig] = None
    timeout: Optional[float] = None
    compile: Optional[bool] = None

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int, one of (8, 4, 2) (name a format with format=), got {type(self.bits).__name__} {self.bits!r}")
        fmt = wire_format(self.bits, "bits") if self.format is None else wire_format(self.format, "format")
        if self.format is not None and self.bits not in (8, fmt.bits):  # 8 is bits' default
            raise ValueError(f"give format or bits, not both: format={self.format!r} has {fmt.bits} bits, bits={self.bits!r}")
        object.__setattr__(self, "format", fmt.name)
        object.__setattr__(self, "bits", fmt.bits)
        if self.compile is not None:
            warnings.warn("HookConfig(compile=...) is deprecated; use fused=...", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "fused", self.compile)
            object.__setattr__(self, "compile", None)
        object.__setattr__(self, "timeout", guard.seconds(self.timeout))
        check_is_int("block_size", self.block_size)
        if self.block_size < 8 or self.block_size % 8:
            raise ValueError(f"block_size must be a positive multiple of 8 (e.g. 64, 128, 256), got {self.block_size}")
        fmt.check_block_size(self.block_size)
        if self.chunk_numel is not None:  # None: the hook picks P * 2**20
            check_is_int("chunk_numel", self.chunk_numel)
            if self.chunk_numel < self.block_size:
                raise ValueError(f"chunk_numel must be >= block_size={self.block_size}, got {self.chunk_numel}")
        for name in ("warmup_steps", "min_compress_numel", "seed", "log_every"):
            check_is_int(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("error_feedback", "stochastic_rounding", "fused"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__} {getattr(self, name)!r}")
        if self.topology is not None and not isinstance(self.topology, Topology):
            raise TypeError(f"topology must be a gradcomp Topology or None, got {type(self.topology).__name__} {self.topology!r}")
        if self.policy is not None and not isinstance(self.policy, PolicyConfig):
            raise TypeError(f"policy must be a gradcomp PolicyConfig or None, got {type(self.policy).__name__} {self.policy!r}")
        if self.policy is not None:
            for c in self.policy.formats:
                c.check_block_size(self.block_size, f"block_size (policy candidate {c.name})")
        if self.error_feedback and self.warmup_steps < 1:
            raise ValueError(
                "warmup_steps must be >= 1 when error_feedback is on (DDP rebuilds its buckets after the "
                f"first iteration, which would misplace the residuals), got {self.warmup_steps}"
            )

    @property
    def wire(self) -> WireFormat:
        """The :class:`~gradcomp.codec.WireFormat` of the compressed buckets (the policy may pick another per bucket)."""
        return wire_format(self.format)
