"""The DDP communication hook: quantized all-reduce of gradient buckets with error feedback.

Register it in any torchrun job::

    import gradcomp
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = gradcomp.register(ddp, bits=8)          # or bits=4
    # ... train as usual; state.stats() tells the bytes saved

or, equivalently::

    state = gradcomp.QuantizedAllReduceState(bits=4)
    ddp.register_comm_hook(state, gradcomp.quantized_allreduce_hook)

The state is a small holder, like PyTorch's ``PowerSGDState``: the options (:class:`HookConfig`), the
groups, the step, and the objects it delegates to, each with a public view:

* :attr:`~QuantizedAllReduceState.route` (:mod:`gradcomp.comm.routes`): how a compressed bucket
  crosses the group, flat (chunked, pipelined) or hierarchical, chosen once;
* :attr:`~QuantizedAllReduceState.residuals` (:mod:`gradcomp.comm.residuals`): error feedback keyed
  by parameter, double-buffered, relocated when DDP regroups, checkpointed;
* :attr:`~QuantizedAllReduceState.policy` (:mod:`gradcomp.comm.policy`): with ``policy=`` the width
  of each bucket, from the measured network;
* :attr:`~QuantizedAllReduceState.kernels`: the codec kernels that run (native C++ on CPU, built at
  install, ready at the first step; on CUDA ``torch.compile``'d ones, compiled before any step).

Buckets that are not compressed (warm-up, small buckets, the policy's plain choice) go straight to
``dist.all_reduce`` on DDP's group. Compressed ones go, in DDP's order, to one communication thread
per state with a process group of its own; the backward pass goes on meanwhile, and every rank issues
the same collectives in the same order. A DDP bucket that merges buckets of the recorded layout (the
first step of a resumed process) is split back into them (:mod:`gradcomp.comm.layout`), so a resumed
run is bit-identical to the uninterrupted one with every default option.

This module does not use ``from __future__ import annotations``: DDP compares the hook's annotations
with ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]`` as objects, not strings.
"""

import logging
import types
import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from gradcomp.codec import kernels
from gradcomp.codec.formats import wire_format
from gradcomp.comm import budget, guard
from gradcomp.comm.budget import BudgetVerdict
from gradcomp.comm.config import HookConfig
from gradcomp.comm.hook_checkpoint import HookCheckpointing
from gradcomp.comm.plan import ExchangePlan, chunk_numel_for
from gradcomp.comm.hierarchical import HierarchicalGroups
from gradcomp.comm.layout import LayoutRecorder, Regroup
from gradcomp.comm.pipeline import PENDING, CommThread, comm_stream
from gradcomp.comm.policy import PLAIN, CommPolicy, NetworkFit, probe_network
from gradcomp.comm.residuals import ResidualStore
from gradcomp.comm.routes import FlatRoute, HierarchicalRoute
from gradcomp.comm.stats import HookStats

logger = logging.getLogger(__name__)

__all__ = ["HookConfig", "QuantizedAllReduceState", "quantized_allreduce_hook", "register"]

_FLOATING = (torch.float32, torch.float16, torch.bfloat16)


class QuantizedAllReduceState(HookCheckpointing):
    """All per-run data of the quantized all-reduce hook, for one DDP model on one rank.

    Fields, by role:
        user knobs: ``config`` (a :class:`HookConfig`) and ``process_group``;
        what it delegates to, with public views: :attr:`route`, :attr:`residuals`, :attr:`policy`,
        :attr:`plans`, :attr:`kernels`, :attr:`failure`;
        statistics: :meth:`stats`.

    Construct it on every rank (it creates a process group of its own, which is a collective call).

    Args:
        process_group: the group to average over (default: the default group).
        bits: shorthand for ``format`` (8, 4 or 2).
        config: a whole :class:`HookConfig` instead of ``bits`` and the options. With a topology the
            intra- and inter-node groups are created here; with a policy and no injected figures the
            network and the codec are probed here (collective calls: every rank constructs the state).
        **options: the other fields of :class:`HookConfig`.

    Example:
        >>> state = QuantizedAllReduceState(bits=4, warmup_steps=5)  # doctest: +SKIP
        >>> state = QuantizedAllReduceState(config=HookConfig(bits=4))  # doctest: +SKIP
        >>> ddp.register_comm_hook(state, quantized_allreduce_hook)   # doctest: +SKIP
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, bits: Optional[int] = None,
                 config: Optional[HookConfig] = None, **options: Any):
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
                raise TypeError(f"unknown option(s) {sorted(unknown)}; expected some of {sorted(HookConfig.__dataclass_fields__)}")
            self.config = HookConfig(bits=8 if bits is None else bits, **options)
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed must be initialized (dist.init_process_group) before building the hook state")
        if self.config.topology is not None:
            self.config.topology.num_nodes(dist.get_world_size(process_group))  # refuse a misfit before any group exists
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.step = 0
        self.residuals = ResidualStore()
        self.kernels: Optional[str] = None  # the codec kernels the exchange runs (kernels.backend), once known
        timeout = guard.group_timeout(process_group, dist.get_backend(process_group), self.config.timeout)
        self.failure = guard.FailureLatch(self.rank, self.world_size, timeout)
        self.statistics = HookStats()  # what stats() reports
        self._reset_runtime()
        self._param_keys: Optional[Dict[int, int]] = None  # id(parameter) -> index in the model
        self._param_numels: Optional[List[int]] = None  # numel of each tracked parameter, by index
        self._layout = LayoutRecorder()
        self._policy: Optional[CommPolicy] = None
        self._budget: Dict[int, BudgetVerdict] = {}  # the error budget's verdict per bucket index
        if self.world_size > 1:
            self._make_groups()
            if self.config.policy is not None:
                self._policy = self._make_policy(self.config.policy.fit)
        logger.info("gradcomp hook: %s on %d ranks", self.config, self.world_size)

    def _reset_runtime(self) -> None:
        """What lives only in this process: groups, route, thread, plans, this step's bookkeeping."""
        self._comm_group = None
        self._route = None
        self._thread: Optional[CommThread] = None
        self._plans: Dict[int, ExchangePlan] = {}
        self._step_finite = True
        self._step_plain: List[Tuple[Any, torch.Tensor]] = []  # plain buckets of this step (training thread)
        self._thread_buckets = 0  # buckets of the current step handed to the thread
        self._inflight: List[torch.futures.Future] = []  # futures of buckets still in the pipeline
        self._verify_pending = True  # compare step and layout across ranks at the next step
        self._seen_sizes: set = set()  # bucket sizes the policy decided for (rank 0 logs each once)
        self._probe_held: Dict[tuple, tuple] = {}  # the policy probe's buffers, while it runs

    # ---- public views

    @property
    def route(self) -> str:
        """``"flat"`` or ``"hierarchical"`` (None on one rank, where nothing is exchanged)."""
        return None if self._route is None else ("hierarchical" if self._route.hierarchical else "flat")

    @property
    def policy(self) -> Optional[CommPolicy]:
        """The policy that picks each bucket's width (``config.policy`` given), or None."""
        return self._policy

    @property
    def plans(self) -> Mapping[int, ExchangePlan]:
        """The exchange plan of each compressed bucket, by bucket index (read-only)."""
        return types.MappingProxyType(self._plans)

    @property
    def policy_choices(self) -> Dict[int, Any]:
        """The network policy's choice per bucket size met so far: ``{numel: format}`` (short spelling; 32: plain; with an error budget see :attr:`budget`)."""
        return {n: self._policy.choose(n) for n in sorted(self._seen_sizes)} if self._policy is not None else {}

    @property
    def budget(self) -> Dict[int, Dict[str, Any]]:
        """The error budget's verdict per bucket index (``PolicyConfig(error_budget=...)``): step, errors, allowed, choice."""
        return {i: v.to_dict() for i, v in sorted(self._budget.items())}

    @property
    def verifies_next_step(self) -> bool:
        """Whether the next step first compares step and layout across the ranks (after construction or a load)."""
        return self._verify_pending

    def plan_for(self, keys: Tuple[int, ...], numels: Tuple[int, ...], bits: Any) -> ExchangePlan:
        """The exchange plan a bucket of these parameters (keys and sizes, in bucket order) gets in format ``bits`` (a name or 8/4/2)."""
        return self._plan(keys, numels, bits)

    def probe_exchange(self, bits: Any, x: torch.Tensor) -> None:
        """Run the whole exchange of one bucket ``x`` in format ``bits`` as a step runs it (the policy's probe; collective).

        For timing what a bucket costs (``benchmarks/chunk_size.py``): persistent buffers across calls,
        error feedback, the hook's chunks and pipeline, decoded into ``x``'s copy.
        """
        self._route.probe(bits, x, self.config.fused, self._probe_held)

    @property
    def chunk_numel(self) -> int:
        """Values per chunk of the flat exchange: ``config.chunk_numel``, or ``P * 2**20`` when it is None."""
        return self.config.chunk_numel if self.config.chunk_numel is not None else chunk_numel_for(self.world_size)

    # ---- construction

    def _make_groups(self) -> None:
        """The hook's own group, the option agreement across ranks, and the route (collectives)."""
        ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
        backend = dist.get_backend(self.process_group)
        self._comm_group = guard.new_group_or_raise(ranks, backend, self.failure.timeout, "the hook's process group")
        self.failure.tag = str(getattr(self._comm_group, "group_name", ""))  # the same name on every rank
        # every rank raises the same error if the options differ, before anything else is sent
        guard.check_agreement(guard.wire_config(self.config, self.world_size), self._comm_group, self.failure.timeout)
        B = self.config.block_size
        if self.config.topology is not None:
            hier = HierarchicalGroups(self.config.topology, ranks, self.rank, backend, timeout=self.failure.timeout)
            self._route = HierarchicalRoute(hier, self._comm_group, self.world_size, self.rank, B)
        else:
            self._route = FlatRoute(self._comm_group, self.world_size, self.rank, B, self.chunk_numel)

    def _device(self):
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _prepare_kernels(self, device, dtype: torch.dtype) -> str:
        """Make the fused kernels ready for buckets of ``dtype`` on ``device`` (once): on CUDA they compile
        now, on this thread, before any exchange. Sets and returns :attr:`kernels`."""
        if self.kernels is None:
            cfg = self.config
            formats = [cfg.wire]
            if cfg.policy is not None:
                formats = list(cfg.policy.formats) or formats
            self.kernels = kernels.prepare(device, {torch.float32, dtype}, formats, cfg.block_size, fused=cfg.fused)
        return self.kernels

    def _make_policy(self, fit: Optional[NetworkFit]) -> CommPolicy:
        """Build the policy from ``fit``, or probe the network first when None (collective).

        The probe times the kernels the hook will run, through the hook's own route.
        """
        cfg = self.config
        hier = self._route.groups if self._route.hierarchical else None
        nodes = hier.nodes if hier is not None else None
        if fit is None:
            self._prepare_kernels(self._device(), torch.float32)
            self._probe_held = {}
            try:
                fit = probe_network(
                    cfg.policy, self._comm_group, hier.intra if hier is not None else None, block_size=cfg.block_size,
                    fused=cfg.fused, device=self._device(), nodes=nodes, chunk_numel=self._route.chunk_numel,
                    exchange=lambda bits, x: self._route.probe(bits, x, cfg.fused, self._probe_held),
                )
            finally:
                self._probe_held = {}  # the probe's buffers go
        policy = CommPolicy(cfg.policy, fit, self.world_size, nodes, cfg.block_size, chunk_numel=self._route.chunk_numel)
        if self.rank == 0:
            logger.info("gradcomp policy (%s): %s", self.route, policy.describe())
        return policy

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
            self._seen_sizes = set()
        return self._policy.fit.to_dict() if self._policy is not None else {}

    def track_parameters(self, module: torch.nn.Module) -> None:
        """Key residuals by each parameter's index in ``module`` (``register`` does this for you).

        With it, residuals follow their parameters when DDP rebuilds its buckets, and a checkpoint
        resumes bit-identically in a new process; without it, they follow parameter identity within
        this process only. The kernels are made ready here, before the first step (DDP's buckets
        have their parameters' dtype and device; on CUDA they compile now, never beside the training).
        """
        params = list(module.parameters())
        self._param_keys = {id(p): i for i, p in enumerate(params)}
        self._param_numels = [p.numel() for p in params]
        grads = [p for p in params if p.requires_grad and p.dtype in _FLOATING]
        if self.world_size > 1 and grads:
            self._prepare_kernels(grads[0].device, grads[0].dtype)

    # ---- lifetime

    def synchronize(self) -> None:
        """Wait until every submitted bucket is done (DDP already waits at the end of backward)."""
        if self._thread is not None:
            done = torch.futures.Future()
            self._thread.submit(self._flush, done)
            done.wait()
        guard.check_alive(self.failure)

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
        if self._route is not None:
            self._route.reset()
        self._inflight = []

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
        s = self.statistics.snapshot()
        s["step"] = self.step
        s["compression_ratio"] = s["fp32_bytes_step"] / s["bytes_sent_step"] if s["bytes_sent_step"] else float("nan")
        return s

    def _log_step(self, step: int) -> Optional[int]:
        """The step number to log at its end (every ``log_every`` steps, from the group's first rank), or None."""
        every = self.config.log_every
        return step + 1 if every and self.rank == 0 and (step + 1) % every == 0 else None

    # ---- per bucket, on the training thread

    def _keys(self, params) -> Tuple[int, ...]:
        if self._param_keys is not None:
            return tuple(self._param_keys.get(id(p), -1 - id(p)) for p in params)
        return tuple(-1 - id(p) for p in params)

    def _reduce(self, bucket: dist.GradBucket) -> torch.futures.Future:
        guard.check_alive(self.failure)
        buf, index = bucket.buffer(), bucket.index()
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
        if self._comm_group is None:  # unpickled state: make the groups now (every rank is here too)
            self._make_groups()
        if buf.dtype in _FLOATING and self.kernels is None:  # registered without register(): ready them now
            self._prepare_kernels(buf.device, buf.dtype)
        params = bucket.parameters()
        keys, numels = self._keys(params), tuple(p.numel() for p in params)
        parts = self._layout.split(index, keys)
        if parts is None:
            self._layout.add(index, keys, numels)
            fut = self._bucket(buf, index, keys, numels, step, last)
        else:  # DDP merged recorded buckets (a resumed process's first step): exchange each as before
            regroup = Regroup(keys, numels, parts, buf.device)
            values = regroup.gather(buf)
            futs = []
            for i, ((vindex, vkeys, vnumels), vbuf) in enumerate(zip(parts, values)):
                self._layout.add(vindex, vkeys, vnumels)
                futs.append(self._bucket(vbuf, vindex, vkeys, vnumels, step, last and i == len(parts) - 1))

            def scatter(_: torch.futures.Future) -> torch.Tensor:
                return regroup.scatter(buf, [f.wait() for f in futs])  # wait() re-raises a failed part

            fut = guard.for_ddp(torch.futures.collect_all(futs).then(scatter))
        if last:
            self._layout.end_step()
        return fut

    def _bucket(self, buf: torch.Tensor, index: int, keys, numels, step: int, last: bool) -> torch.futures.Future:
        """Exchange one bucket (DDP's, or a recorded one of a split): plain, or compressed on the thread."""
        cfg = self.config
        compress = step >= cfg.warmup_steps and buf.numel() >= cfg.min_compress_numel and buf.dtype in _FLOATING
        fmt = cfg.wire
        if compress and self._policy is not None:
            if cfg.policy.error_budget is not None:
                # measured on this bucket's gradient and agreed over the ranks: the same everywhere
                choice = self._budget_verdict(buf, index, keys, numels, step).choice
            else:
                # a function of the bucket's size and of figures every rank agreed on: the same everywhere
                choice = self._policy.choose(buf.numel())
                if buf.numel() not in self._seen_sizes:
                    self._seen_sizes.add(buf.numel())
                    if self.rank == 0:
                        logger.info("gradcomp policy: bucket %d: %s", index, self._policy.describe_choice(buf.numel()))
            compress = choice != PLAIN
            fmt = wire_format(choice) if compress else None
        if not compress:
            return self._plain(buf, step, last, index)
        plan = self._plans.get(index)
        if plan is None or plan.keys != keys or plan.format is not fmt:
            plan = self._plans[index] = self._plan(keys, numels, fmt)
        if self._thread is None:
            self._thread = CommThread(self._on_thread_error)
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
        run = guard.guarded(self.failure, lambda: self._run_bucket(buf, index, step, last, plan, ready, fut, checks),
                            step=step, bucket=index, what=self._route.what)
        self._thread.submit(run, fut)
        return guard.for_ddp(fut)

    def _budget_verdict(self, buf: torch.Tensor, index: int, keys, numels, step: int) -> BudgetVerdict:
        """The error budget's verdict for bucket ``index`` at ``step``: measured anew when due (a collective on DDP's group)."""
        verdict = self._budget.get(index)
        if budget.due(verdict, step, tuple(keys), self.config.policy.measure_every):
            group = self.process_group if self.process_group is not None else dist.group.WORLD
            verdict = self._budget[index] = budget.measure(self._policy, buf, index, tuple(keys), numels, step, group, self.rank,
                                                           self.config.block_size, self.config.fused)
        return verdict

    def _plan(self, keys, numels, bits) -> ExchangePlan:
        if self._route is None:  # one rank: what the flat route would plan
            return ExchangePlan.build(numels, self.world_size, bits, self.config.block_size, self.chunk_numel, keys=keys)
        return self._route.plan(keys, numels, bits)

    def _verify_step(self, step: int, device) -> None:
        """Raise the same ValueError on every rank unless all hold the same step and residual layout.

        Runs at the first bucket after construction or a load, on the training thread, on the
        user's group (where DDP's order of calls is the same on every rank); until the ranks
        agree, every step checks again and raises.
        """
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        digest = guard.layout_digest(step, self.residuals.bucket_keys(), self.residuals.bucket_numels())
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
        fut = dist.all_reduce(buf.div_(P), group=group, async_op=True).get_future().then(guard.plain_result(self.failure, step, index))
        self.statistics.account(2 * (P - 1) * buf.numel() * buf.element_size() // P, 2 * (P - 1) * buf.numel() * 4 // P, False, True)
        if self.config.error_feedback and step >= self.config.warmup_steps:
            self._step_plain.append((fut, buf))
        if not last:
            return fut
        checks, self._step_plain = self._step_plain, []
        if self._thread_buckets == 0:  # nothing of this step went through the thread
            self.statistics.end_step(log=self._log_step(step))
            return fut
        self._thread_buckets = 0
        done = torch.futures.Future(devices=[buf.device]) if buf.is_cuda else torch.futures.Future()

        def end() -> torch.Tensor:
            fut.wait()
            self._end_step(step, checks)
            return buf

        self._thread.submit(guard.guarded(self.failure, end, step=step, bucket=index, what="end of step (residual commit)"), done)
        return guard.for_ddp(done)

    # ---- per bucket, on the communication thread

    def _run_bucket(self, buf, index: int, step: int, last: bool, plan: ExchangePlan, ready_event, fut, plain_checks) -> Any:
        """Run on the communication thread: start ``buf``'s exchange on the route; the route's ``done`` completes ``fut``."""
        cfg = self.config
        self._inflight = [f for f in self._inflight if not f.done()] + [fut]
        with comm_stream(buf, ready_event):
            sl = self._route.slices(plan)
            if cfg.error_feedback:
                res = self.residuals.take(plan, index, buf.device, (sl.worker[0], sl.worker[1], lambda a: sl.server_of(plan, a)),
                                          lambda: self._relocate(buf.device))
            else:
                res = (None, None, None, None)
            P = self.world_size
            fp32_bytes = 2 * (P - 1) * buf.numel() * 4 // P
            measure = cfg.error_feedback and cfg.log_every > 0 and step % cfg.log_every == 0

            def done(finite: bool, rel: Optional[float], sent: int, intra: int) -> None:
                self._step_finite &= finite
                self.statistics.account(sent, fp32_bytes, True, finite, rel, intra)
                if not last:
                    if buf.is_cuda:
                        torch.cuda.current_stream(buf.device).synchronize()
                    fut.set_result(buf)

            noise = sl.noise(plan, cfg.seed, step, buf.device) if cfg.stochastic_rounding else (None, None)
            self._route.run(buf, index, step, plan, res, noise, cfg.fused, measure, done)
            if last:
                self._end_step(step, plain_checks)
                if buf.is_cuda:
                    torch.cuda.current_stream(buf.device).synchronize()
                fut.set_result(buf)
        return PENDING

    def _relocate(self, device) -> None:
        """Residuals of other bucket layouts go into the store's pool, by parameter (collective on the hook's group)."""

        def gather(index, keys, numels, wres, sres):
            plan = self._plan(keys, numels, self.config.format)
            return (plan,) + self._route.gather_residuals(plan, wres, sres)

        self.residuals.relocate(device, gather)

    def _flush(self) -> None:
        """Finish every chunk in flight."""
        if self._route is not None:
            self._route.flush()

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
        self.residuals.commit(finite)
        self._step_finite = True
        self.statistics.end_step(finite, log=self._log_step(step))

    def _on_thread_error(self, exc: BaseException) -> None:
        """Fail every bucket in flight, drop their chunks and the step's uncommitted residuals after an error."""
        for f in self._inflight:
            if not f.done():
                f.set_exception(exc)
        self._inflight = []
        if self._route is not None:
            self._route.abort()
        self.residuals.discard_pending()
        self._step_finite = True


def quantized_allreduce_hook(state: QuantizedAllReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a gradient bucket over the ranks in a quantized wire format (int8 by default) with error feedback.

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
        bits: 8, 4 or 2 (shorthand for ``format="int8"`` etc.).
        **options: ``process_group`` and the fields of :class:`HookConfig`.

    Example:
        >>> state = gradcomp.register(ddp, bits=4, warmup_steps=10)  # doctest: +SKIP
        >>> state.stats()["compression_ratio"]                        # doctest: +SKIP
        7.72
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
