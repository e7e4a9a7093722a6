"""The DDP communication hook: quantized all-reduce of gradient buckets with error feedback.

Register it in any torchrun job::

    import gradcomp
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = gradcomp.register(ddp, bits=8)          # or bits=4
    # ... train as usual; state.stats() tells the bytes saved

or, equivalently::

    state = gradcomp.QuantizedAllReduceState(bits=4)
    ddp.register_comm_hook(state, gradcomp.quantized_allreduce_hook)

How a bucket travels (see :mod:`gradcomp.comm.exchange`): it is cut into chunks of about
``chunk_numel`` values; each chunk is quantized straight from the bucket (+ worker residual) into its
send buffer, all-to-all'd, the owned shard dequantized, summed in rank order and requantized
(+ server residual) straight into the all-gather message, all-gathered and dequantized straight back
into the bucket. Chunks are pipelined with async collectives (:mod:`gradcomp.comm.pipeline`): chunk
``c + 1`` is coded while chunk ``c`` is on the wire, and the next bucket starts while the previous one
finishes. The fused kernels run from the first compressed step: native C++ on CPU (built at install),
on CUDA ``torch.compile``'d kernels compiled when the state meets the model (:func:`register`), before
any step (``fused=False``: the eager reference kernels). Buckets that are not compressed (warm-up, small
buckets, the policy's plain choice) go straight to ``dist.all_reduce`` on DDP's group, not through
the hook's thread. With ``topology=Topology(local_world_size=L)`` the hierarchical exchange
runs instead (fp32 inside nodes, quantized only between nodes; :mod:`gradcomp.comm.hierarchical`),
and with ``policy=PolicyConfig()`` each bucket gets plain all-reduce, int8 or int4 by the measured
network (:mod:`gradcomp.comm.policy`). Buckets are handed to one communication thread per state, in the order DDP
produces them, on a process group of the hook's own; the backward pass goes on meanwhile, and every
rank issues the same collectives in the same order.

This module does not use ``from __future__ import annotations``: DDP compares the hook's annotations
with ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]`` as objects, not strings.
"""

import itertools
import contextlib
import logging
import math
import queue
import threading
import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from gradcomp.codec import kernels
from gradcomp.checks import GRADIENT_BITS, check_bits, check_is_int
from gradcomp.comm import exchange, guard
from gradcomp.comm.collectives import all_gather_into
from gradcomp.comm.exchange import ExchangeBuffers, ExchangePlan
from gradcomp.comm.hierarchical import HierarchicalGroups, hierarchical_allreduce
from gradcomp.comm.pipeline import ChunkJob, ChunkPipeline
from gradcomp.comm.policy import PLAIN, CommPolicy, NetworkFit, PolicyConfig, probe_network
from gradcomp.comm.topology import Topology

logger = logging.getLogger(__name__)

__all__ = ["HookConfig", "QuantizedAllReduceState", "quantized_allreduce_hook", "register"]



@dataclass(frozen=True)
class HookConfig:
    """User knobs of the quantized all-reduce hook, validated on construction.

    Attributes:
        bits: code width of the gradients on the wire, one of (2, 4, 8).
        block_size: elements sharing one fp32 scale; a positive multiple of 8. Smaller blocks track
            outliers better and cost ``32 / block_size`` extra bits per element.
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
            values per rank, ``P * 2**20`` in all (:func:`~gradcomp.comm.exchange.chunk_numel_for`),
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
        if self.compile is not None:
            warnings.warn("HookConfig(compile=...) is deprecated; use fused=...", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "fused", self.compile)
            object.__setattr__(self, "compile", None)
        object.__setattr__(self, "timeout", guard.seconds(self.timeout))
        check_bits(self.bits, GRADIENT_BITS)
        check_is_int("block_size", self.block_size)
        if self.block_size < 8 or self.block_size % 8:
            raise ValueError(f"block_size must be a positive multiple of 8 (e.g. 64, 128, 256), got {self.block_size}")
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
        if self.error_feedback and self.warmup_steps < 1:
            raise ValueError(
                "warmup_steps must be >= 1 when error_feedback is on (DDP rebuilds its buckets after the "
                f"first iteration, which would misplace the residuals), got {self.warmup_steps}"
            )


_BucketPlan = ExchangePlan  # a bucket's plan: block-aligned parameters, chunks, shards, messages

_PENDING = object()  # a submitted function that completes its future later (the pipeline does)


class _CommThread:
    """One thread that runs submitted exchanges in submission order and completes their futures.

    The thread must not outlive the interpreter's teardown: a daemon thread that is still inside
    torch (returning from ``Future.set_result``, a collective's ``wait``) when Python finalizes is
    killed as it takes the GIL back, and the C++ frames it unwinds through call ``std::terminate``
    ("terminate called without an active exception"). So the owner stops and joins it in
    ``close()``, when it is garbage-collected and at interpreter exit (``weakref.finalize``).
    """

    def __init__(self, on_error=None):
        self._queue: "queue.Queue" = queue.Queue()
        # a weak reference: the thread must not keep its state (and the state's groups) alive
        self._on_error = weakref.WeakMethod(on_error) if on_error is not None else None
        self._thread = threading.Thread(target=self._loop, name="gradcomp-comm", daemon=True)
        self._thread.start()

    def submit(self, fn, fut: torch.futures.Future) -> None:
        self._queue.put((fn, fut))

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            item = None
            try:
                result = fn()
                if result is not _PENDING:
                    fut.set_result(result)
            except BaseException as exc:  # the training loop re-raises it from DDP's wait
                if not fut.done():
                    fut.set_exception(exc)
                on_error = self._on_error() if self._on_error is not None else None
                if on_error is not None:
                    on_error(exc)
            # drop the closure (buckets, the state) and the future before waiting for the next item
            fn = fut = result = None

    def stop(self, timeout: Optional[float] = 60.0) -> None:
        """Finish the submitted work, end the thread and wait for it (at most ``timeout`` s: a peer that
        died can leave a collective waiting for its own timeout)."""
        self._queue.put(None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("gradcomp: the communication thread did not end within %s s", timeout)


class QuantizedAllReduceState:
    """All per-run data of the quantized all-reduce hook, for one DDP model on one rank.

    Fields, by role:
        user knobs: ``config`` (a :class:`HookConfig`) and ``process_group``;
        internal buffers: worker and server residuals keyed by bucket index, the communication
        group and thread;
        statistics: ``stats()``.

    Construct it on every rank (it creates a process group of its own, which is a collective call).

    Args:
        process_group: the group to average over (default: the default group).
        bits, block_size, error_feedback, warmup_steps, min_compress_numel, stochastic_rounding,
        seed, fused, chunk_numel, log_every, topology, policy: see :class:`HookConfig`.
        config: a whole :class:`HookConfig` instead of ``bits`` and the options. With a topology the
        intra- and inter-node groups are created here; with a policy and no injected figures the
        network and the codec are probed here (collective calls: every rank constructs the state).

    Example:
        >>> state = QuantizedAllReduceState(bits=4, warmup_steps=5)  # doctest: +SKIP
        >>> state = QuantizedAllReduceState(config=HookConfig(bits=4))  # doctest: +SKIP
        >>> ddp.register_comm_hook(state, quantized_allreduce_hook)   # doctest: +SKIP
    """

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        bits: Optional[int] = None,
        config: Optional[HookConfig] = None,
        **options: Any,
    ):
        if config is not None:
            if not isinstance(config, HookConfig):
                raise TypeError(f"config must be a gradcomp HookConfig, got {type(config).__name__} {config!r}")
            if bits is not None or options:
                given = (["bits"] if bits is not None else []) + sorted(options)
                raise TypeError(f"give either config=HookConfig(...) or bits/options, not both; got config and {given}")
            self.config = config
        else:
            unknown = set(options) - set(HookConfig.__dataclass_fields__)
            if unknown:
                raise TypeError(
                    f"unknown option(s) {sorted(unknown)}; expected some of {sorted(HookConfig.__dataclass_fields__)}"
                )
            self.config = HookConfig(bits=8 if bits is None else bits, **options)
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed must be initialized (dist.init_process_group) before building the hook state")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.step = 0
        self._worker_residuals: Dict[int, torch.Tensor] = {}
        self._server_residuals: Dict[int, torch.Tensor] = {}
        self._bucket_keys: Dict[int, Tuple[int, ...]] = {}  # parameter keys of each bucket, in order
        self._bucket_numels: Dict[int, Tuple[int, ...]] = {}
        self._plans: Dict[int, _BucketPlan] = {}
        self._pool: Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = None  # residuals by parameter key
        self._param_keys: Optional[Dict[int, int]] = None  # id(parameter) -> index in the model
        self._param_numels: Optional[List[int]] = None  # numel of each tracked parameter, by index
        self._lock = threading.Lock()
        self._reset_stats()
        self._comm_group = None
        self._hier: Optional[HierarchicalGroups] = None
        self._policy: Optional[CommPolicy] = None
        self._logged_choices: set = set()
        self._thread: Optional[_CommThread] = None
        self._failure: Optional[str] = None  # set when an exchange failed: the state then refuses steps
        self._failure_tag = ""
        self._verify_pending = True  # compare step and layout across ranks at the next step
        self._timeout = guard.group_timeout(process_group, dist.get_backend(process_group), self.config.timeout)
        self._buffers: Dict[int, ExchangeBuffers] = {}  # persistent exchange buffers, by bucket index
        self._spares: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # second residual buffers, by bucket index
        self._pending: Dict[int, tuple] = {}  # residuals written this step, committed at its end if all finite
        self._step_finite = True
        self._step_plain: List[Tuple[Any, torch.Tensor]] = []  # plain buckets of this step (training thread)
        self._thread_buckets = 0  # buckets of the current step handed to the thread
        self._pipe: Optional[ChunkPipeline] = None
        self._inflight: List[torch.futures.Future] = []  # futures of buckets still in the pipeline
        self.kernels: Optional[str] = None  # the kernels the exchange runs (kernels.backend), once known
        self._probe_state: Dict[tuple, tuple] = {}  # the policy probe's buffers, while it runs
        if self.config.topology is not None:
            self.config.topology.num_nodes(self.world_size)  # refuse a topology that does not fit, before any group exists
        if self.world_size > 1:
            self._comm_group = self._new_comm_group()
            # every rank raises the same error if the options differ, before anything else is sent
            guard.check_agreement(guard.wire_config(self.config, self.world_size), self._comm_group, self._timeout)
            if self.config.topology is not None:
                self._hier = self._new_hier_groups()
            if self.config.policy is not None:
                self._policy = self._make_policy(self.config.policy.fit)
        logger.info("gradcomp hook: %s on %d ranks", self.config, self.world_size)

    # ---- construction helpers

    def _new_comm_group(self):
        ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
        group = guard.new_group_or_raise(ranks, dist.get_backend(self.process_group), self._timeout, "the hook's process group")
        self._failure_tag = str(getattr(group, "group_name", ""))  # the same name on every rank
        return group

    def _new_hier_groups(self) -> HierarchicalGroups:
        pg = self.process_group or dist.group.WORLD
        return HierarchicalGroups(
            self.config.topology, dist.get_process_group_ranks(pg), self.rank, dist.get_backend(self.process_group), timeout=self._timeout
        )

    def _device(self):
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _policy_chunk_numel(self) -> Optional[int]:
        """The chunk size the hook pipelines with: its ``chunk_numel`` flat, None hierarchical (no chunks)."""
        return None if self._hier is not None else self.chunk_numel

    @property
    def chunk_numel(self) -> int:
        """Values per chunk of the flat exchange: ``config.chunk_numel``, or ``P * 2**20`` when it is None."""
        return self.config.chunk_numel if self.config.chunk_numel is not None else exchange.chunk_numel_for(self.world_size)

    def _make_policy(self, fit: Optional[NetworkFit]) -> CommPolicy:
        """Build the policy from ``fit``, or probe the network first when None (collective).

        The probe times the kernels the hook will run (:meth:`_prepare_kernels` makes them ready first).
        """
        cfg = self.config
        nodes = self._hier.nodes if self._hier is not None else None
        chunk = self._policy_chunk_numel()
        if fit is None:
            intra = self._hier.intra if self._hier is not None else None
            self._prepare_kernels(self._device(), torch.float32)
            self._probe_state = {}
            try:
                fit = probe_network(
                    cfg.policy, self._comm_group, intra, block_size=cfg.block_size, fused=cfg.fused,
                    device=self._device(), exchange=self._probe_exchange, nodes=nodes, chunk_numel=chunk,
                )
            finally:
                self._probe_state = {}  # the probe's buffers go
        policy = CommPolicy(cfg.policy, fit, self.world_size, nodes, cfg.block_size, chunk_numel=chunk)
        if self.rank == 0:
            logger.info("gradcomp policy (%s): %s", "hierarchical" if policy.hierarchical else "flat", policy.describe())
        return policy

    def _prepare_kernels(self, device, dtype: torch.dtype) -> str:
        """Make the fused kernels ready for buckets of ``dtype`` on ``device`` (once): on CUDA they compile
        now, on this thread, before any exchange. Sets and returns :attr:`kernels`."""
        if self.kernels is None:
            cfg = self.config
            widths = {cfg.bits}
            if cfg.policy is not None:
                widths = {b for b in cfg.policy.candidates if b != PLAIN} or widths
            self.kernels = kernels.prepare(device, {torch.float32, dtype}, sorted(widths), cfg.block_size, fused=cfg.fused)
        return self.kernels

    def _probe_exchange(self, bits: int, x: torch.Tensor) -> None:
        """Do what a bucket ``x`` costs the hook with ``bits``: its whole exchange with error feedback, as a step runs it.

        Flat: the chunks go through the hook's pipeline (:class:`ChunkPipeline`, async collectives on
        the hook's group, chunk ``c + 1`` encoded while ``c`` is on the wire) with persistent buffers
        and double-buffered residuals, decoded straight into the bucket; hierarchical: the blocking
        hierarchical exchange the hook runs.
        """
        cfg = self.config
        fused = cfg.fused
        if self._hier is not None:
            plan = ExchangePlan.build((x.numel(),), self.world_size, bits, cfg.block_size, chunk_numel=None)
            padded = plan.to_aligned(x)
            res = hierarchical_allreduce(padded, self._hier.layout(x.numel(), bits, cfg.block_size), self._hier, fused=fused)
            torch.empty_like(x).copy_(res.out[: x.numel()])
            return
        key = (bits, x.numel(), x.device)
        held = self._probe_state.get(key)
        if held is None:  # persistent across the timed calls, as the hook's per-bucket buffers are
            plan = ExchangePlan.build((x.numel(),), self.world_size, bits, cfg.block_size, self.chunk_numel)
            z = lambda n: torch.zeros(n, device=x.device)  # noqa: E731
            held = self._probe_state[key] = (
                plan, ExchangeBuffers.allocate(plan, x.device), z(plan.padded_numel), z(plan.padded_numel),
                z(plan.server_numel), z(plan.server_numel), x.clone(),
            )
        # the bucket is decoded into in place, as DDP's is; the next call encodes the mean (same work)
        plan, bufs, w_in, w_out, s_in, s_out, bucket = held

        pipe = ChunkPipeline(self._comm_group)
        for c in range(len(plan.chunks)):
            pipe.push(_chunk_job(plan, bufs, c, bucket, (w_in, s_in, w_out, s_out), (None, None), (0, 0), fused))
        pipe.flush()

    def recalibrate(self) -> Dict[str, Any]:
        """Probe the network and the codec again and decide anew from the new figures (collective).

        Call it on every rank at the same point, between steps (for instance when the job moved
        to other machines). Residuals are kept: their layout does not depend on the width.

        Returns:
            The new figures (:meth:`NetworkFit.to_dict`).
        """
        if self.config.policy is None:
            raise ValueError("recalibrate needs a policy: build the state with policy=PolicyConfig(...)")
        self.synchronize()
        if self.world_size > 1:
            self._policy = self._make_policy(None)
            self._plans = {}
            self._logged_choices = set()
        return self._policy.fit.to_dict() if self._policy is not None else {}

    def _reset_stats(self) -> None:
        self._stats = {
            "bytes_sent_step": 0,
            "fp32_bytes_step": 0,
            "bytes_sent_total": 0,
            "fp32_bytes_total": 0,
            "compressed_buckets_step": 0,
            "buckets_step": 0,
            "intra_node_bytes_step": 0,
            "intra_node_bytes_total": 0,
            "nonfinite_steps": 0,
            "rel_error": float("nan"),
        }
        self._acc = {"sent": 0, "fp32": 0, "compressed": 0, "buckets": 0, "nonfinite": False, "intra": 0}

    # ---- checkpointing

    def __getstate__(self) -> Dict[str, Any]:
        """Drop the process groups, the thread and the lock so the state can be pickled."""
        drop = (
            "process_group", "_comm_group", "_hier", "_thread", "_lock", "_param_keys", "_param_numels", "_plans", "_buffers",
            "_spares", "_pending", "_step_plain", "_pipe", "_inflight", "_probe_state",
        )
        return {k: v for k, v in self.__dict__.items() if k not in drop}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Restore a pickled state; it runs on the default group (set ``process_group`` before use to change it)."""
        self.__dict__.update(state)
        self.process_group = None
        self._comm_group = None
        self._hier = None
        self._thread = None
        self._lock = threading.Lock()
        self._param_keys = None
        self._plans = {}
        self._buffers, self._spares, self._pending, self._step_plain = {}, {}, {}, []
        self._step_finite, self._thread_buckets = True, 0
        self._pipe = None
        self._inflight = []
        self._probe_state = {}
        self._verify_pending = True
        self.__dict__.setdefault("_failure", None)
        self.__dict__.setdefault("_failure_tag", "")
        self.__dict__.setdefault("_param_numels", None)

    def state_dict(self) -> Dict[str, Any]:
        """Return this rank's residuals, step, config and statistics (tensors on CPU) for a checkpoint.

        ``checksums`` holds a CRC-32 of every residual's bytes; :meth:`load_state_dict` verifies them.
        """
        self.synchronize()
        worker = {k: v.detach().cpu().clone() for k, v in self._worker_residuals.items()}
        server = {k: v.detach().cpu().clone() for k, v in self._server_residuals.items()}
        return {
            "config": asdict(self.config),
            "world_size": self.world_size,
            "rank": self.rank,
            "step": self.step,
            "param_keys": "index" if self._param_keys is not None else "identity",
            "bucket_keys": {k: list(v) for k, v in self._bucket_keys.items()},
            "bucket_numels": {k: list(v) for k, v in self._bucket_numels.items()},
            "worker_residuals": worker,
            "server_residuals": server,
            "checksums": guard.checksums_of(worker, server),
            "network_fit": self._policy.fit.to_dict() if self._policy is not None else None,
            "stats": self._stats_snapshot(),
        }

    def _stats_snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return dict(self._stats)

    def _load_stats(self, saved: Optional[Dict[str, Any]]) -> None:
        """Restore the statistics of a checkpoint (totals go on counting from there); reset them if it has none."""
        self._reset_stats()
        if saved:
            with self._lock:
                self._stats.update({k: v for k, v in saved.items() if k in self._stats})

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned on the same rank of a job of the same size and config.

        Everything is checked before anything changes (a refused load leaves the state as it was):
        keys, types, ``step >= 0``, the world size and rank, the wire options, each residual's dtype
        and length against the recorded bucket layout, finiteness and the CRC-32 recorded by
        :meth:`state_dict`. The first step after the load compares step and layout across the ranks
        (an all-gather on the user's group) and raises on every rank while they differ.

        Raises:
            TypeError / ValueError: naming the key or field that is wrong (nothing is changed).
        """
        guard.check_alive(self)
        if not isinstance(state_dict, dict) or "config" not in state_dict:
            raise TypeError(f"state_dict must be a dict made by QuantizedAllReduceState.state_dict(), got {type(state_dict).__name__}")
        if isinstance(state_dict.get("config"), dict):
            saved = state_dict["config"]
            for name in ("bits", "block_size", "error_feedback", "chunk_numel"):
                if saved.get(name) != getattr(self.config, name):
                    raise ValueError(f"checkpoint has {name}={saved.get(name)!r}, this state has {name}={getattr(self.config, name)!r}")
            topo = asdict(self.config.topology) if self.config.topology is not None else None
            if saved.get("topology") != topo:
                raise ValueError(
                    f"checkpoint has topology={saved.get('topology')!r}, this state has topology={topo!r} "
                    "(the residuals are laid out for the node layout)"
                )
        parsed = guard.validate_state_dict(
            state_dict, world_size=self.world_size, rank=self.rank, residual_sizes=self._residual_sizes, num_params=self._param_numels,
        )
        policy = self._policy
        if self._policy is not None and state_dict.get("network_fit") is not None:
            # decide from the checkpoint's figures, so the resumed run picks what the original did
            try:
                fit = NetworkFit.from_dict(state_dict["network_fit"])
            except (TypeError, ValueError, KeyError) as exc:
                raise ValueError(f"checkpoint network_fit is not valid: {exc}") from exc
            policy = CommPolicy(
                self.config.policy, fit, self.world_size, self._policy.cluster.num_nodes if self._policy.hierarchical else None,
                self.config.block_size, chunk_numel=self._policy_chunk_numel(),
            )
        keep = state_dict["param_keys"] == "index" and self._param_keys is not None
        if keep:
            worker = {k: v.detach().to("cpu", copy=True) for k, v in parsed["worker"].items()}
            server = {k: v.detach().to("cpu", copy=True) for k, v in parsed["server"].items()}
        elif parsed["worker"]:
            logger.warning(
                "the checkpoint's residuals are keyed by parameter identity in another process (or this state "
                "tracks no model); they are dropped. Use gradcomp.register() or state.track_parameters(model)."
            )
        self.synchronize()
        # nothing below can fail: the load is all or nothing
        self._policy = policy
        self._logged_choices = set()
        self.step = parsed["step"]
        self._load_stats(state_dict.get("stats"))
        self._plans = {}
        self._spares, self._pending = {}, {}
        self._pool = None
        if keep:
            self._bucket_keys, self._bucket_numels = parsed["bucket_keys"], parsed["bucket_numels"]
            self._worker_residuals, self._server_residuals = worker, server
        else:
            self._bucket_keys, self._bucket_numels = {}, {}
            self._worker_residuals, self._server_residuals = {}, {}
        self._verify_pending = True

    def _residual_sizes(self, keys: Tuple[int, ...], numels: Tuple[int, ...]) -> Tuple[int, int]:
        """Lengths of this rank's worker and server residuals for a bucket of these parameters."""
        _, wn, _, sn, _ = self._slices(self._plan(keys, numels, self.config.bits))
        return wn, sn

    def track_parameters(self, module: torch.nn.Module) -> None:
        """Key residuals by each parameter's index in ``module`` (``register`` does this for you).

        With it, residuals follow their parameters when DDP rebuilds its buckets, and a checkpoint
        resumes bit-identically in a new process; without it, they follow parameter identity within
        this process only.
        """
        params = list(module.parameters())
        self._param_keys = {id(p): i for i, p in enumerate(params)}
        self._param_numels = [p.numel() for p in params]
        # the kernels are made ready now, before the first step: DDP's buckets have their parameters'
        # dtype and device (on CUDA they compile here, never beside the training)
        grads = [p for p in params if p.requires_grad and p.dtype in (torch.float32, torch.float16, torch.bfloat16)]
        if self.world_size > 1 and grads:
            self._prepare_kernels(grads[0].device, grads[0].dtype)

    def synchronize(self) -> None:
        """Wait until every submitted bucket is done (DDP already waits at the end of backward)."""
        if self._thread is not None:
            done = torch.futures.Future()
            self._thread.submit(self._flush, done)
            done.wait()
        guard.check_alive(self)

    def close(self) -> None:
        """Finish the work in flight, then stop and join the communication thread.

        Call it before ``dist.destroy_process_group()``. A state that is not closed is closed when it
        is garbage-collected or at interpreter exit, so that no thread of it is inside torch while
        Python tears down (which aborts the process). Closing twice is harmless; a closed state
        starts a new thread if it is used again.
        """
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.submit(self._flush, torch.futures.Future())  # chunks still in the pipeline, in order
            thread.stop()
        self._pipe = None
        self._inflight = []

    # ---- statistics

    def stats(self) -> Dict[str, Any]:
        """Return the communication statistics.

        Keys: ``step`` (completed steps), ``bytes_sent_step`` and ``fp32_bytes_step`` (this rank, the
        last completed step; the latter is what an fp32 ring all-reduce of the same buckets sends),
        ``bytes_sent_total``, ``fp32_bytes_total``, ``compression_ratio`` (fp32 bytes / bytes sent, last
        step), ``rel_error`` (relative quantization error of this rank's gradients, last measured on a
        logging step), ``compressed_buckets_step``, ``buckets_step``, ``nonfinite_steps``,
        ``intra_node_bytes_step`` and ``intra_node_bytes_total`` (hierarchical mode: the fp32 bytes
        this rank sent inside its node, included in ``bytes_sent_*``; the rest crossed to other nodes).
        """
        with self._lock:
            s = dict(self._stats)
        s["step"] = self.step
        s["compression_ratio"] = s["fp32_bytes_step"] / s["bytes_sent_step"] if s["bytes_sent_step"] else float("nan")
        return s

    # ---- the per-bucket work

    def _noise(self, step: int, plan: ExchangePlan, device) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Stochastic-rounding noise drawn per parameter, so it does not depend on DDP's bucketing.

        Returns ``(phase 0, phase 1)`` noise laid out like the worker and the server residual.
        Phase 0 (each rank's own gradient; in hierarchical mode its node's chunk) is seeded with
        the rank (the node); phase 1 (the reduced shard) is not, since whichever rank owns a block
        must draw the same noise for it.
        """
        if not self.config.stochastic_rounding:
            return None, None
        seed = self.config.seed
        w0, wn, s0, sn, owner = self._slices(plan)
        n0 = exchange.param_noise(plan, seed, owner, step, 0, device)[w0 : w0 + wn]
        n1 = exchange.param_noise(plan, seed, -1, step, 1, device)
        n1 = n1[s0 : s0 + sn] if self._hier is not None else plan.server_of(n1, self.rank)
        return n0, n1

    def _residuals(self, plan: ExchangePlan, index: int, device) -> Tuple[torch.Tensor, ...]:
        """Return (worker in, server in, worker out, server out) residuals laid out for ``plan``.

        The "in" pair is the committed residual (relocated by parameter if the buckets changed); the
        "out" pair is a second buffer that the exchange writes and that :meth:`_end_step` commits
        only if every bucket of the step was finite. Runs on the communication thread, where every
        rank meets the same buckets in the same order, so a collective relocation happens at the
        same point on every rank.
        """
        if self._bucket_keys.get(index) == plan.keys and index in self._worker_residuals:
            w_in, s_in = self._worker_residuals[index].to(device), self._server_residuals[index].to(device)
        else:
            stored = {key for keys in self._bucket_keys.values() for key in keys}
            if index in self._bucket_keys or not stored.isdisjoint(plan.keys):
                self._relocate(device)  # the buckets changed: residuals follow their parameters
            wres = torch.zeros(plan.padded_numel, dtype=torch.float32, device=device)
            full = torch.zeros(plan.padded_numel, dtype=torch.float32, device=device)
            if self._pool:
                for key, off, n in zip(plan.keys, plan.offsets, plan.numels):
                    seg = self._pool.get(key)
                    if seg is not None and seg[0].numel() == n:
                        wres[off : off + n] = seg[0]
                        full[off : off + n] = seg[1]
            w0, wn, s0, sn, _ = self._slices(plan)
            w_in = wres[w0 : w0 + wn].clone()
            s_in = full[s0 : s0 + sn].clone() if self._hier is not None else plan.server_of(full, self.rank)
        spare = self._spares.get(index)
        if spare is not None and spare[0].shape == w_in.shape and spare[1].shape == s_in.shape and spare[0].device == w_in.device:
            w_out, s_out = spare
        else:
            w_out, s_out = torch.zeros_like(w_in), torch.zeros_like(s_in)
        return w_in, s_in, w_out, s_out

    def _slices(self, plan: ExchangePlan) -> Tuple[int, int, int, int, int]:
        """Where this rank's residuals sit in a bucket's padded layout, and who quantizes at phase 0.

        Returns ``(worker start, worker length, server start, server length, phase-0 owner)``:
        flat, the worker residual covers the whole padded bucket of this rank and the server
        residual is shard ``rank`` of every chunk (:meth:`ExchangePlan.server_of`); hierarchical,
        the worker residual covers chunk ``local_rank`` of the node's sum (quantized on behalf of
        the node) and the server residual the inter-node shard ``(local_rank * nodes + node)``.
        """
        layout = plan.layout
        shard = layout.shard_numel
        h = self._hier
        if h is None:
            return 0, layout.padded_numel, 0, plan.server_numel, self.rank
        chunk = h.nodes * shard
        return h.local_rank * chunk, chunk, (h.local_rank * h.nodes + h.node) * shard, shard, h.node

    def _plan(self, keys, numels, bits: int) -> ExchangePlan:
        """The exchange plan of a bucket; the hierarchical exchange cuts no chunks."""
        chunk = None if self._hier is not None else self.chunk_numel
        return ExchangePlan.build(numels, self.world_size, bits, self.config.block_size, chunk, keys=keys)

    def _relocate(self, device) -> None:
        """Move every bucket's residuals into a pool keyed by parameter (a collective on the hook's group).

        The server residual of a block lives on the rank that owns the block; when DDP rebuilds its
        buckets the owner changes, so the shards are all-gathered once and cut by parameter. In
        hierarchical mode a node's worker residual is spread over its ranks (one chunk each) and is
        all-gathered inside the node first; the server shards arrive in rank order ``node * L + l``
        and are put back at their places ``l * nodes + node``.
        """
        pool: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = dict(self._pool or {})
        h = self._hier
        for index in sorted(self._worker_residuals):
            keys, numels = self._bucket_keys[index], self._bucket_numels[index]
            plan = self._plan(keys, numels, self.config.bits)
            sres = self._server_residuals[index].to(device)
            full = torch.empty(self.world_size * sres.numel(), dtype=torch.float32, device=device)
            all_gather_into(full, sres.contiguous(), self._comm_group)
            wres = self._worker_residuals[index].to(device)
            if h is not None:
                full = full.view(h.nodes, h.local_size, -1).transpose(0, 1).reshape(-1)
                if h.intra is not None:
                    node_wres = torch.empty(plan.layout.padded_numel, dtype=torch.float32, device=device)
                    all_gather_into(node_wres, wres.contiguous(), h.intra)
                    wres = node_wres
            else:
                full = plan.server_to_aligned(full.view(self.world_size, -1))
            for key, off, n in zip(keys, plan.offsets, numels):
                pool[key] = (wres[off : off + n].clone(), full[off : off + n].clone())
        logger.info("DDP buckets changed: residuals of %d parameters relocated", len(pool))
        self._pool = pool
        self._worker_residuals, self._server_residuals = {}, {}
        self._bucket_keys, self._bucket_numels = {}, {}
        self._spares = {}

    # ---- on the communication thread

    def _run_bucket(self, buf: torch.Tensor, index: int, step: int, last: bool, plan: ExchangePlan, ready_event, fut, plain_checks) -> Any:
        """Run on the communication thread: start ``buf``'s exchange in the pipeline; the pipeline completes ``fut``."""
        cfg = self.config
        device = buf.device
        self._inflight = [f for f in self._inflight if not f.done()] + [fut]
        stream_ctx = _stream_context(buf, ready_event)
        with stream_ctx:
            ef = cfg.error_feedback
            if ef:
                w_in, s_in, w_out, s_out = self._residuals(plan, index, device)
                self._pending[index] = (plan.keys, plan.numels, w_in, s_in, w_out, s_out)
            else:
                w_in = s_in = w_out = s_out = None
            n0, n1 = self._noise(step, plan, device)
            P = self.world_size
            fp32_bytes = 2 * (P - 1) * buf.numel() * 4 // P
            if self._hier is not None:
                self._run_hier(buf, plan, w_in, s_in, w_out, s_out, n0, n1, step, fp32_bytes)
                if not last:
                    if buf.is_cuda:
                        torch.cuda.current_stream(buf.device).synchronize()
                    fut.set_result(buf)
            else:
                bufs = self._buffers.get(index)
                if bufs is None or bufs.plan is not plan or bufs.send[0].device != device:
                    bufs = self._buffers[index] = ExchangeBuffers.allocate(plan, device)
                self._push_chunks(buf, index, step, plan, bufs, (w_in, s_in, w_out, s_out), (n0, n1), fut, last, fp32_bytes)
            if last:
                self._end_step(step, plain_checks)
                if buf.is_cuda:
                    torch.cuda.current_stream(buf.device).synchronize()
                fut.set_result(buf)
        return _PENDING

    def _push_chunks(self, buf, index, step, plan, bufs, res, noise, fut, last, fp32_bytes) -> None:
        """Hand every chunk of the bucket to the pipeline; the last decoded chunk completes ``fut``."""
        w_in = res[0]
        w_out = res[2]
        header = (step, index)
        left = [len(plan.chunks)]
        finite = [torch.ones((), dtype=torch.bool, device=buf.device)]
        denom = [0.0]
        measure = self.config.error_feedback and self.config.log_every > 0 and step % self.config.log_every == 0
        if self._pipe is None:
            self._pipe = ChunkPipeline(self._comm_group)

        def before_encode(c: int) -> None:
            if measure and c == 0:  # before any chunk of this bucket is decoded into it
                denom[0] = float((plan.to_aligned(buf) + w_in).norm())

        def decoded(chunk_finite: torch.Tensor) -> None:
            finite[0] &= chunk_finite
            left[0] -= 1
            if left[0] == 0:
                ok = bool(finite[0])
                self._step_finite &= ok
                rel = None
                if measure:
                    rel = float(w_out.norm()) / denom[0] if denom[0] > 0 else 0.0
                self._account(plan.bytes_sent, fp32_bytes, True, ok, rel, step, False)
                if not last:
                    if buf.is_cuda:
                        torch.cuda.current_stream(buf.device).synchronize()
                    fut.set_result(buf)

        for c in range(len(plan.chunks)):
            self._pipe.push(_chunk_job(plan, bufs, c, buf, res, noise, header, self.config.fused, before_encode, decoded))

    def _run_hier(self, buf, plan, w_in, s_in, w_out, s_out, n0, n1, step, fp32_bytes) -> None:
        """The hierarchical exchange of one bucket, blocking (fp32 inside nodes, quantized between them)."""
        cfg = self.config
        layout = plan.layout
        hlayout = self._hier.layout(layout.numel, layout.bits, layout.block_size)
        measure = cfg.log_every > 0 and step % cfg.log_every == 0
        noise = None if n0 is None else (lambda phase, shape: (n0 if phase == 0 else n1).view(shape))
        padded = plan.to_aligned(buf)
        result = hierarchical_allreduce(
            padded, hlayout, self._hier,
            worker_residual=w_in, server_residual=s_in, error_feedback=cfg.error_feedback,
            noise=noise, measure_error=measure, fused=cfg.fused,
        )
        plan.from_aligned(result.out, buf)
        if cfg.error_feedback:
            w_out.copy_(result.worker_residual)
            s_out.copy_(result.server_residual)
        self._step_finite &= result.finite
        self._account(result.bytes_sent, fp32_bytes, True, result.finite, result.rel_error, step, False, hlayout.intra_bytes_sent)

    def _flush(self) -> None:
        """Finish every chunk in flight."""
        if self._pipe is not None:
            self._pipe.flush()

    def _end_step(self, step: int, plain_checks=()) -> None:
        """At the last bucket: finish the step's chunks, then commit its residuals if it was finite everywhere.

        A step with an inf or a nan in any bucket (compressed or plain) keeps every bucket's old
        residuals, so a step that the GradScaler skips leaves no trace in the error feedback.
        """
        self._flush()
        finite = self._step_finite
        for plain_fut, plain_buf in plain_checks:
            plain_fut.wait()
            finite = finite and bool(torch.isfinite(plain_buf).all())
        if finite:
            for index, (keys, numels, w_in, s_in, w_out, s_out) in self._pending.items():
                self._worker_residuals[index] = w_out
                self._server_residuals[index] = s_out
                self._bucket_keys[index] = keys
                self._bucket_numels[index] = numels
                self._spares[index] = (w_in, s_in)
                if self._pool:
                    for key in keys:
                        self._pool.pop(key, None)
        self._pending = {}
        self._step_finite = True
        self._account(0, 0, False, finite, None, step, True, count=False)

    def _on_thread_error(self, exc: BaseException) -> None:
        """Fail every bucket in flight, drop their chunks and the step's uncommitted residuals after an error."""
        for f in self._inflight:
            if not f.done():
                f.set_exception(exc)
        self._inflight = []
        if self._pipe is not None:
            self._pipe.abort()
        self._pending = {}
        self._step_finite = True

    def _account(self, sent: int, fp32: int, compressed: bool, finite: bool, rel: Optional[float], step: int, last: bool, intra: int = 0, count: bool = True) -> None:
        with self._lock:
            acc = self._acc
            acc["sent"] += sent
            acc["intra"] += intra
            acc["fp32"] += fp32
            acc["compressed"] += int(compressed)
            acc["buckets"] += int(count)
            acc["nonfinite"] |= not finite
            s = self._stats
            s["bytes_sent_total"] += sent
            s["fp32_bytes_total"] += fp32
            s["intra_node_bytes_total"] += intra
            if rel is not None and math.isfinite(rel):
                s["rel_error"] = rel
            if not last:
                return
            s["bytes_sent_step"] = acc["sent"]
            s["fp32_bytes_step"] = acc["fp32"]
            s["compressed_buckets_step"] = acc["compressed"]
            s["buckets_step"] = acc["buckets"]
            s["intra_node_bytes_step"] = acc["intra"]
            s["nonfinite_steps"] += int(acc["nonfinite"])
            self._acc = {"sent": 0, "fp32": 0, "compressed": 0, "buckets": 0, "nonfinite": False, "intra": 0}
            snapshot = dict(s)
        cfg = self.config
        if cfg.log_every and self.rank == 0 and (step + 1) % cfg.log_every == 0:
            ratio = snapshot["fp32_bytes_step"] / max(1, snapshot["bytes_sent_step"])
            logger.info(
                "gradcomp step %d: sent %d bytes (fp32 all-reduce: %d, %.2fx less), rel. quantization error %.3g",
                step + 1, snapshot["bytes_sent_step"], snapshot["fp32_bytes_step"], ratio, snapshot["rel_error"],
            )

    # ---- on the training thread

    def _reduce(self, bucket: dist.GradBucket) -> torch.futures.Future:
        guard.check_alive(self)
        buf = bucket.buffer()
        index = bucket.index()
        guard.check_bucket(buf, index)
        if self._verify_pending and self.world_size > 1:  # the first step after construction or a load
            self._verify_step(self.step, buf.device)
        last = bucket.is_last()
        step = self.step
        if last:
            self.step += 1
        if self.world_size == 1:
            fut = torch.futures.Future()
            fut.set_result(buf)
            return fut
        cfg = self.config
        floating = buf.dtype in (torch.float32, torch.float16, torch.bfloat16)
        if floating and self.kernels is None:  # registered without register(): ready them before the first exchange
            self._prepare_kernels(buf.device, buf.dtype)
        compress = step >= cfg.warmup_steps and buf.numel() >= cfg.min_compress_numel and floating
        bits = cfg.bits
        if compress and self._policy is not None:
            # a function of the bucket's size and of figures every rank agreed on: the same everywhere
            bits = self._policy.choose(buf.numel())
            if self.rank == 0 and buf.numel() not in self._logged_choices:
                self._logged_choices.add(buf.numel())
                logger.info("gradcomp policy: bucket %d: %s", index, self._policy.describe_choice(buf.numel()))
            compress = bits != PLAIN
        if self._comm_group is None:  # unpickled state: make the groups now (every rank is here too)
            self._comm_group = self._new_comm_group()
            guard.check_agreement(guard.wire_config(cfg, self.world_size), self._comm_group, self._timeout)
            if cfg.topology is not None:
                self._hier = self._new_hier_groups()
        if not compress:
            return self._plain(buf, step, last, index)
        params = bucket.parameters()
        if self._param_keys is not None:
            keys = tuple(self._param_keys.get(id(p), -1 - id(p)) for p in params)
        else:
            keys = tuple(-1 - id(p) for p in params)
        plan = self._plans.get(index)
        if plan is None or plan.keys != keys or plan.bits != bits:
            plan = self._plans[index] = self._plan(keys, tuple(p.numel() for p in params), bits)
        if self._thread is None:
            self._thread = _CommThread(self._on_thread_error)
            # stop and join it when the state goes away, and at interpreter exit at the latest
            weakref.finalize(self, self._thread.stop)
        ready = None
        if buf.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(buf.device))
            fut = torch.futures.Future(devices=[buf.device])
        else:
            fut = torch.futures.Future()
        checks = []
        if last:
            checks, self._step_plain = self._step_plain, []
            self._thread_buckets = 0
        else:
            self._thread_buckets += 1
        what = "hierarchical exchange" if self._hier is not None else "quantized exchange (chunked all-to-all, then all-gather)"
        run = guard.guarded(self, lambda: self._run_bucket(buf, index, step, last, plan, ready, fut, checks), step=step, bucket=index, what=what)
        self._thread.submit(run, fut)
        return guard.for_ddp(fut)

    def _verify_step(self, step: int, device) -> None:
        """Raise the same ValueError on every rank unless all hold the same step and residual layout.

        Runs at the first bucket after construction or a load, on the training thread, on the
        user's group (where DDP's order of calls is the same on every rank); until the ranks
        agree, every step checks again and raises.
        """
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        digest = guard.layout_digest(step, self._bucket_keys, self._bucket_numels)
        guard.check_step_agreement(step, digest, group, device)
        self._verify_pending = False

    def _plain(self, buf: torch.Tensor, step: int, last: bool, index: int) -> torch.futures.Future:
        """A bucket that is not compressed: ``dist.all_reduce`` on DDP's own group, not through the hook's thread.

        The all-reduces are issued here, on the training thread, in DDP's bucket order (the same on
        every rank); the hook's thread issues its collectives on the hook's own group, so the order
        per group is the same on every rank. In a step where some buckets go through the thread,
        the plain buckets' finiteness joins the residual commit at the step's end, and the last
        bucket's future completes after that commit.
        """
        P = self.world_size
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        fut = dist.all_reduce(buf.div_(P), group=group, async_op=True).get_future().then(guard.plain_result(self, step, index))
        self._account(2 * (P - 1) * buf.numel() * buf.element_size() // P, 2 * (P - 1) * buf.numel() * 4 // P, False, True, None, step, False)
        if self.config.error_feedback and step >= self.config.warmup_steps:
            self._step_plain.append((fut, buf))
        if not last:
            return fut
        checks, self._step_plain = self._step_plain, []
        if self._thread_buckets == 0:  # nothing of this step went through the thread
            self._account(0, 0, False, True, None, step, True, count=False)
            return fut
        self._thread_buckets = 0
        done = torch.futures.Future(devices=[buf.device]) if buf.is_cuda else torch.futures.Future()

        def end() -> torch.Tensor:
            fut.wait()
            self._end_step(step, checks)
            return buf

        self._thread.submit(guard.guarded(self, end, step=step, bucket=index, what="end of step (residual commit)"), done)
        return guard.for_ddp(done)


def _chunk_job(plan: ExchangePlan, bufs: ExchangeBuffers, c: int, bucket: torch.Tensor, residuals, noise, header, fused: bool,
               before_encode=None, decoded=None) -> ChunkJob:
    """Chunk ``c`` of ``bucket``'s exchange as the pipeline runs it: encode, check and reduce, check and decode.

    The one job builder of the step and of the policy's probe. ``residuals`` is ``(worker in,
    server in, worker out, server out)`` (None each without error feedback), ``noise`` the two
    phases' stochastic rounding noise (None each), ``header`` the messages' ``(step, bucket)``,
    ``fused`` whether the fused kernels run; ``before_encode(c)`` runs before the encode and
    ``decoded(finite)`` after the decode, with whether the chunk's values were all finite.
    """
    w_in, s_in, w_out, s_out = residuals
    n0, n1 = noise
    step, index = header

    def enc() -> None:
        if before_encode is not None:
            before_encode(c)
        exchange.encode(plan, bufs, c, bucket, residual=w_in, residual_out=w_out, noise=n0, header=header, fused=fused)

    def red() -> torch.Tensor:
        exchange.check_header(plan, c, bufs.recv[c], step, index)
        return exchange.reduce_shard(plan, bufs, c, residual=s_in, residual_out=s_out, noise=n1, header=header, fused=fused)

    def dec() -> None:
        exchange.check_header(plan, c, bufs.gathered[c], step, index, "all-gather")
        finite = exchange.decode(plan, bufs, c, bucket, fused=fused)
        if decoded is not None:
            decoded(finite)

    return ChunkJob(enc, bufs.send[c], bufs.recv[c], red, bufs.gathered[c], dec)


_SIDE_STREAMS: Dict[Any, Any] = {}


def _stream_context(buf: torch.Tensor, ready_event):
    """On CUDA: a side stream of the communication thread that first waits for the bucket to be ready."""
    if not buf.is_cuda:
        return contextlib.nullcontext()
    torch.cuda.set_device(buf.device)
    stream = _SIDE_STREAMS.get(buf.device)
    if stream is None:
        stream = _SIDE_STREAMS[buf.device] = torch.cuda.Stream(buf.device)
    if ready_event is not None:
        stream.wait_event(ready_event)
    return torch.cuda.stream(stream)


def quantized_allreduce_hook(state: QuantizedAllReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a gradient bucket over the ranks with int8/int4/int2 codes and error feedback.

    The DDP communication hook; register it with
    ``ddp.register_comm_hook(QuantizedAllReduceState(...), quantized_allreduce_hook)`` or use
    :func:`register`. Returns a future holding the averaged bucket, bit-identical on every rank.
    """
    return state._reduce(bucket)


def register(ddp_model: torch.nn.parallel.DistributedDataParallel, bits: int = 8, **options: Any) -> QuantizedAllReduceState:
    """Build a :class:`QuantizedAllReduceState`, register the hook on ``ddp_model`` and return the state.

    Call it on every rank, right after wrapping the model in DDP and before the first step.

    Args:
        ddp_model: a ``DistributedDataParallel`` model.
        bits: 8, 4 or 2.
        **options: ``process_group`` and the fields of :class:`HookConfig`.

    Example:
        >>> state = gradcomp.register(ddp, bits=4, warmup_steps=10)  # doctest: +SKIP
        >>> state.stats()["compression_ratio"]                        # doctest: +SKIP
        7.76
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp_model).__name__}")
    if getattr(ddp_model, "_comm_hooks", None):
        # refused here, before the state's process group (a collective) exists
        raise ValueError(
            "ddp_model already has a communication hook (DDP takes one); register gradcomp once per DDP model, "
            "on a model without another hook"
        )
    guard.check_model(ddp_model.module)
    process_group = options.pop("process_group", getattr(ddp_model, "process_group", None))
    state = QuantizedAllReduceState(process_group, bits=bits, **options)
    state.track_parameters(ddp_model.module)
    ddp_model.register_comm_hook(state, quantized_allreduce_hook)
    return state
