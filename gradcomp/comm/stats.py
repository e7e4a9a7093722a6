"""The hook's statistics: bytes sent per step and in total, what fp32 would have sent, the quantization error.

Both of the hook's threads account here (plain buckets on the training thread, compressed ones on the
communication thread), so every method takes the lock. A step's figures are published at its last
bucket; the totals go on counting across a checkpoint and resume.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Dict, Optional

logger = logging.getLogger("gradcomp.comm.hook")  # where the hook's users look for it

__all__ = ["HookStats"]


def _fresh() -> Dict[str, Any]:
    return {
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


def _fresh_step() -> Dict[str, Any]:
    return {"sent": 0, "fp32": 0, "compressed": 0, "buckets": 0, "nonfinite": False, "intra": 0}


class HookStats:
    """Thread-safe byte and error accounting of one hook state (see :meth:`QuantizedAllReduceState.stats`).

    Example:
        >>> s = HookStats()
        >>> s.account(sent=100, fp32=400, compressed=True, finite=True)
        >>> s.end_step()["bytes_sent_step"]
        100
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = _fresh()
        self._step = _fresh_step()

    def __getstate__(self) -> Dict[str, Any]:
        """Pickle the figures, not the lock."""
        with self._lock:
            return {"_stats": dict(self._stats), "_step": dict(self._step)}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Restore pickled figures with a new lock."""
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget every figure."""
        with self._lock:
            self._stats, self._step = _fresh(), _fresh_step()

    def account(self, sent: int, fp32: int, compressed: bool, finite: bool, rel: Optional[float] = None,
                intra: int = 0, count: bool = True) -> None:
        """Add one bucket of the current step: bytes this rank sent, an fp32 ring's bytes, and so on."""
        with self._lock:
            acc, s = self._step, self._stats
            acc["sent"] += sent
            acc["intra"] += intra
            acc["fp32"] += fp32
            acc["compressed"] += int(compressed)
            acc["buckets"] += int(count)
            acc["nonfinite"] |= not finite
            s["bytes_sent_total"] += sent
            s["fp32_bytes_total"] += fp32
            s["intra_node_bytes_total"] += intra
            if rel is not None and math.isfinite(rel):
                s["rel_error"] = rel

    def end_step(self, finite: bool = True, log: Optional[int] = None) -> Dict[str, Any]:
        """Publish the current step's figures (``finite``: whether the whole step was finite); return a snapshot.

        With ``log`` (a step number) the figures are also logged, at INFO, as that step's.
        """
        with self._lock:
            acc, s = self._step, self._stats
            s["bytes_sent_step"] = acc["sent"]
            s["fp32_bytes_step"] = acc["fp32"]
            s["compressed_buckets_step"] = acc["compressed"]
            s["buckets_step"] = acc["buckets"]
            s["intra_node_bytes_step"] = acc["intra"]
            s["nonfinite_steps"] += int(acc["nonfinite"] or not finite)
            self._step = _fresh_step()
            snapshot = dict(s)
        if log is not None:
            ratio = snapshot["fp32_bytes_step"] / max(1, snapshot["bytes_sent_step"])
            logger.info(
                "gradcomp step %d: sent %d bytes (fp32 all-reduce: %d, %.2fx less), rel. quantization error %.3g",
                log, snapshot["bytes_sent_step"], snapshot["fp32_bytes_step"], ratio, snapshot["rel_error"],
            )
        return snapshot

    def snapshot(self) -> Dict[str, Any]:
        """A copy of the published figures (what a checkpoint stores)."""
        with self._lock:
            return dict(self._stats)

    def load(self, saved: Optional[Dict[str, Any]]) -> None:
        """Restore a checkpoint's figures (totals go on counting from there); reset them if it has none."""
        self.reset()
        if saved:
            with self._lock:
                self._stats.update({k: v for k, v in saved.items() if k in self._stats})
