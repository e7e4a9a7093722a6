"""Saving and restoring the DDP hook's state: ``state_dict``, ``load_state_dict``, pickling.

A mixin of :class:`~gradcomp.comm.hook.QuantizedAllReduceState` (its methods are the state's own): a
checkpoint holds this rank's residuals with their bucket layout, space (rotated or not) and CRC-32
checksums, the step, the config (the wire format among it), DDP's last bucket layout
(:mod:`gradcomp.comm.layout`), the policy's network figures, the error budget's verdicts per bucket
and the statistics. Loading checks everything before it changes anything (:mod:`gradcomp.comm.guard`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Dict, Tuple

from gradcomp.comm import guard, state_checks
from gradcomp.comm.layout import LayoutRecorder
from gradcomp.comm.policy import CommPolicy, NetworkFit

logger = logging.getLogger("gradcomp.comm.hook")

__all__ = ["HookCheckpointing"]


class HookCheckpointing:
    """``state_dict``, ``load_state_dict`` and pickling of the hook's state (mixed into it)."""

    def __getstate__(self) -> Dict[str, Any]:
        """Drop the process groups, the thread and this process's bookkeeping so the state can be pickled."""
        drop = ("process_group", "_comm_group", "_route", "_thread", "_param_keys", "_param_numels", "_plans",
                "_step_plain", "_inflight", "_probe_held")
        return {k: v for k, v in self.__dict__.items() if k not in drop}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Restore a pickled state; it runs on the default group (set ``process_group`` before use to change it)."""
        self.__dict__.update(state)
        self.process_group = None
        self._reset_runtime()
        self._param_keys = self._param_numels = None

    def state_dict(self) -> Dict[str, Any]:
        """Return this rank's residuals, step, config, DDP's last bucket layout and statistics (tensors on CPU).

        ``checksums`` holds a CRC-32 of every residual's bytes; :meth:`load_state_dict` verifies them.
        """
        self.synchronize()
        res = self.residuals.export()
        return {
            "config": asdict(self.config),
            "world_size": self.world_size,
            "rank": self.rank,
            "step": self.step,
            "param_keys": "index" if self._param_keys is not None else "identity",
            "bucket_keys": res["keys"],
            "bucket_numels": res["numels"],
            "worker_residuals": res["worker"],
            "server_residuals": res["server"],
            "checksums": state_checks.checksums_of(res["worker"], res["server"]),
            "residuals_rotated": res["rotated"],
            "budget": {i: v.to_dict() for i, v in self._budget.items()},
            "layout": self._layout.to_list() if self._param_keys is not None else None,
            "network_fit": self._policy.fit.to_dict() if self._policy is not None else None,
            "stats": self.statistics.snapshot(),
        }

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
        guard.check_alive(self.failure)
        if not isinstance(state_dict, dict) or "config" not in state_dict:
            raise TypeError(f"state_dict must be a dict made by QuantizedAllReduceState.state_dict(), got {type(state_dict).__name__}")
        state_checks.check_checkpoint_config(state_dict.get("config"), self.config)
        parsed = state_checks.validate_state_dict(
            state_dict, world_size=self.world_size, rank=self.rank, residual_sizes=self.residual_sizes, num_params=self._param_numels,
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
                self.config.block_size, chunk_numel=self._route.chunk_numel,
            )
        keep = state_dict["param_keys"] == "index" and self._param_keys is not None
        if not keep and parsed["worker"]:
            logger.warning(
                "the checkpoint's residuals are keyed by parameter identity in another process (or this state "
                "tracks no model); they are dropped. Use gradcomp.register() or state.track_parameters(model)."
            )
        self.synchronize()
        # nothing below can fail: the load is all or nothing
        self._policy = policy
        self._seen_sizes = set()
        self.step = parsed["step"]
        self.statistics.load(state_dict.get("stats"))
        self._plans = {}
        if self._route is not None:
            self._route.reset()
        self._budget = dict(parsed["budget"]) if keep else {}
        if keep:
            self.residuals.load(parsed["worker"], parsed["server"], parsed["bucket_keys"], parsed["bucket_numels"], parsed["rotated"])
            self._layout = LayoutRecorder(parsed["layout"])
        else:
            self.residuals.clear()
            self._layout = LayoutRecorder()
        self._verify_pending = True

    def residual_sizes(self, keys: Tuple[int, ...], numels: Tuple[int, ...]) -> Tuple[int, int]:
        """Lengths of this rank's worker and server residuals for a bucket of these parameters."""
        plan = self._plan(keys, numels, self.config.format)
        sl = self._route.slices(plan) if self._route is not None else None
        if sl is None or sl.server is None:
            return plan.padded_numel, plan.server_numel
        return sl.worker[1], sl.server[1]
