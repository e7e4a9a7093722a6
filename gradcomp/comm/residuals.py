"""Error-feedback residuals of the DDP hook, kept per bucket and keyed by parameter.

Every compressed bucket has two residuals on each rank: the **worker** residual (what quantizing this
rank's gradient left behind, laid out like the bucket's aligned layout, or this rank's part of it in
hierarchical mode) and the **server** residual (what requantizing the shards this rank owns left
behind). Both are stored with the parameter keys of their bucket, so that:

* **double buffering**: a step reads the committed residuals and writes a second buffer; only at the
  end of a step whose every bucket was finite is the second buffer committed (:meth:`commit`), so a
  step the GradScaler skips leaves no trace;
* **relocation**: when DDP regroups its buckets (it does after the first iteration, and a resumed
  process starts from its initial layout), the residuals move into a pool keyed by parameter
  (:meth:`relocate`; the server shards are all-gathered once, by the route) and each new bucket
  takes its parameters' segments from the pool;
* **checkpoints**: :meth:`export` and :meth:`load` carry the residuals with their bucket layout;
* **rotated formats**: a rotating wire format keeps its residuals in the rotated space (block by
  block). The store remembers which space each bucket's residuals are in; when a bucket changes
  between a rotating and a plain format (the policy's choice), :meth:`take` rotates them over or
  back, and the pool keeps every parameter's residual in the plain space. A parameter's segment
  in the pool spans its whole blocks, padding included: rotated, the padding carries residual too.

The store does no communication itself: what a relocation must gather, the route does
(:meth:`~gradcomp.comm.routes.FlatRoute.gather_residuals`).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Mapping, Tuple

import torch

from gradcomp.codec.kernels import rotate_blocks
from gradcomp.comm.plan import ExchangePlan

logger = logging.getLogger(__name__)

__all__ = ["ResidualStore"]

Keys = Tuple[int, ...]
Residuals = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class ResidualStore:
    """The committed, pending and spare residuals of one hook state (see the module docstring).

    Public views: :attr:`layout` (the committed buckets' parameter keys and sizes), :meth:`worker`
    and :meth:`server` (a bucket's committed residuals), ``len(store)``.
    """

    def __init__(self) -> None:
        self._worker: Dict[int, torch.Tensor] = {}
        self._server: Dict[int, torch.Tensor] = {}
        self._keys: Dict[int, Keys] = {}
        self._numels: Dict[int, Keys] = {}
        self._pool: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # parameter key -> (worker, server)
        self._spares: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # second buffers, by bucket index
        self._pending: Dict[int, tuple] = {}  # written this step, committed at its end if finite
        self._rotated: Dict[int, bool] = {}  # whether a bucket's committed residuals are in the rotated space

    # ---- views

    @property
    def layout(self) -> Dict[int, Tuple[Keys, Keys]]:
        """``{bucket index: (parameter keys, parameter sizes)}`` of the committed residuals."""
        return {i: (self._keys[i], self._numels[i]) for i in self._worker}

    def worker(self, index: int) -> torch.Tensor:
        """Bucket ``index``'s committed worker residual (read it, do not write it)."""
        return self._worker[index]

    def server(self, index: int) -> torch.Tensor:
        """Bucket ``index``'s committed server residual (read it, do not write it)."""
        return self._server[index]

    def __len__(self) -> int:
        return len(self._worker)

    # ---- one step

    def take(self, plan: ExchangePlan, index: int, device, slices, relocate: Callable[[], None]) -> Residuals:
        """Return ``(worker in, server in, worker out, server out)`` for bucket ``index`` laid out for ``plan``.

        The "in" pair is the committed residual (taken from the pool by parameter if the buckets
        changed; ``relocate()`` is called first when residuals of other layouts are still stored);
        the "out" pair is the spare buffer the exchange writes. ``slices`` is the route's
        ``(worker start, worker length, server start, server length)`` of this rank in the plan's
        aligned layout, and ``server_of(aligned)`` cuts the server part (both from the route).
        """
        rotate = plan.format.rotate
        B = plan.block_size
        if self._keys.get(index) == plan.keys and index in self._worker:
            w_in, s_in = self._worker[index].to(device), self._server[index].to(device)
            if self._rotated.get(index, False) != rotate:  # the policy moved the bucket to or from a rotating format
                w_in = rotate_blocks(w_in.view(-1, B), inverse=not rotate).view(-1)
                s_in = rotate_blocks(s_in.view(-1, B), inverse=not rotate).view(-1)
        else:
            stored = {key for keys in self._keys.values() for key in keys}
            if index in self._keys or not stored.isdisjoint(plan.keys):
                relocate()  # the buckets changed: residuals follow their parameters
            wres = torch.zeros(plan.padded_numel, dtype=torch.float32, device=device)
            full = torch.zeros(plan.padded_numel, dtype=torch.float32, device=device)
            for key, off, n in zip(plan.keys, plan.offsets, plan.numels):
                seg = self._pool.get(key)
                span = -(-n // B) * B
                if seg is not None and seg[0].numel() == span:
                    wres[off : off + span] = seg[0]
                    full[off : off + span] = seg[1]
            if rotate and self._pool:  # the pool is in the plain space
                wres = rotate_blocks(wres.view(-1, B)).view(-1)
                full = rotate_blocks(full.view(-1, B)).view(-1)
            w0, wn, server_of = slices
            w_in = wres[w0 : w0 + wn].clone()
            s_in = server_of(full)
        spare = self._spares.get(index)
        if spare is not None and spare[0].shape == w_in.shape and spare[1].shape == s_in.shape and spare[0].device == w_in.device:
            w_out, s_out = spare
        else:
            w_out, s_out = torch.zeros_like(w_in), torch.zeros_like(s_in)
        self._pending[index] = (plan.keys, plan.numels, w_in, s_in, w_out, s_out, rotate)
        return w_in, s_in, w_out, s_out

    def commit(self, finite: bool) -> None:
        """End a step: if it was finite everywhere, its new residuals become the committed ones."""
        if finite:
            for index, (keys, numels, w_in, s_in, w_out, s_out, rotate) in self._pending.items():
                self._worker[index], self._server[index] = w_out, s_out
                self._keys[index], self._numels[index] = keys, numels
                self._rotated[index] = rotate
                self._spares[index] = (w_in, s_in)
                for key in keys:
                    self._pool.pop(key, None)
        self._pending = {}

    def discard_pending(self) -> None:
        """Forget this step's uncommitted residuals (after a failed exchange)."""
        self._pending = {}

    # ---- relocation

    def relocate(self, device, gather: Callable[[int, Keys, Keys, torch.Tensor, torch.Tensor], Tuple[ExchangePlan, torch.Tensor, torch.Tensor]]) -> None:
        """Move every bucket's residuals into the pool keyed by parameter.

        ``gather(index, keys, numels, worker, server)`` returns the bucket's plan and its whole worker
        and server residuals in the plan's aligned layout (a collective: the route all-gathers the
        server shards, and in hierarchical mode the node's worker parts).
        """
        pool = dict(self._pool)
        for index in sorted(self._worker):
            keys, numels = self._keys[index], self._numels[index]
            plan, wres, full = gather(index, keys, numels, self._worker[index].to(device), self._server[index].to(device))
            B = plan.block_size
            if self._rotated.get(index, False):  # the pool keeps the plain space
                wres = rotate_blocks(wres.view(-1, B), inverse=True).view(-1)
                full = rotate_blocks(full.view(-1, B), inverse=True).view(-1)
            for key, off, n in zip(keys, plan.offsets, numels):
                span = -(-n // B) * B  # whole blocks: rotated, the padding carried residual too
                pool[key] = (wres[off : off + span].clone(), full[off : off + span].clone())
        logger.info("DDP buckets changed: residuals of %d parameters relocated", len(pool))
        self._pool = pool
        self._worker, self._server, self._keys, self._numels, self._spares = {}, {}, {}, {}, {}
        self._rotated = {}

    # ---- checkpoints

    def export(self) -> Dict[str, Dict[int, object]]:
        """The committed residuals (CPU copies), their layout and space (``rotated``), for a checkpoint."""
        return {
            "worker": {k: v.detach().cpu().clone() for k, v in self._worker.items()},
            "server": {k: v.detach().cpu().clone() for k, v in self._server.items()},
            "keys": {k: list(v) for k, v in self._keys.items()},
            "numels": {k: list(v) for k, v in self._numels.items()},
            "rotated": {k: bool(self._rotated.get(k, False)) for k in self._worker},
        }

    def load(self, worker: Mapping[int, torch.Tensor], server: Mapping[int, torch.Tensor],
             keys: Mapping[int, Keys], numels: Mapping[int, Keys], rotated: Mapping[int, bool] = None) -> None:
        """Replace everything with a checkpoint's (already validated) residuals, layout and space."""
        self.clear()
        self._worker = {k: v.detach().to("cpu", copy=True) for k, v in worker.items()}
        self._server = {k: v.detach().to("cpu", copy=True) for k, v in server.items()}
        self._keys = {k: tuple(v) for k, v in keys.items() if k in self._worker}
        self._numels = {k: tuple(v) for k, v in numels.items() if k in self._worker}
        self._rotated = {k: bool(v) for k, v in (rotated or {}).items() if k in self._worker}

    def clear(self) -> None:
        """Forget every residual."""
        self._worker, self._server, self._keys, self._numels = {}, {}, {}, {}
        self._pool, self._spares, self._pending, self._rotated = {}, {}, {}, {}

    def bucket_keys(self) -> Dict[int, Keys]:
        """``{bucket index: parameter keys}`` of the committed residuals (for the cross-rank layout check)."""
        return dict(self._keys)

    def bucket_numels(self) -> Dict[int, Keys]:
        """``{bucket index: parameter sizes}`` of the committed residuals."""
        return dict(self._numels)

    def __getstate__(self) -> Dict[str, object]:
        """Pickle the committed residuals and the pool; the spare and pending buffers are rebuilt."""
        state = dict(self.__dict__)
        state["_spares"], state["_pending"] = {}, {}
        return state
