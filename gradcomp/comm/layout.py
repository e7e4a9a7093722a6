"""DDP's bucket layout, recorded step by step, so that a resumed run exchanges exactly what the uninterrupted one did.

DDP groups parameters into buckets by the order their gradients became ready in the first iteration
of a process: a new process starts from its initial layout (on recent torch, every parameter in one
bucket) and regroups after its first iteration. A run resumed from a checkpoint therefore meets, in
its first step, buckets the uninterrupted run never had; compressing (or not) and summing them would
change the result. So the hook records the layout of every step (:class:`LayoutRecorder`), the
checkpoint carries it, and a DDP bucket that merges several recorded buckets is split back into them
(:func:`split`, :class:`Regroup`): each is exchanged on its own, plain or compressed exactly as
before, with the same bytes, the same residuals and the same sums.

A layout is a tuple of ``(bucket index, parameter keys, parameter sizes)`` in DDP's order.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["Entry", "LayoutRecorder", "Regroup", "split"]

Keys = Tuple[int, ...]
Entry = Tuple[int, Keys, Keys]


def split(layout: Optional[Sequence[Entry]], index: int, keys: Keys) -> Optional[List[Entry]]:
    """The recorded buckets that DDP's bucket ``index`` (parameters ``keys``) merges, in recorded order; else None.

    None when nothing is recorded, when the recorded bucket ``index`` has the very same parameters,
    or when ``keys`` are not exactly the union of two or more recorded buckets (for instance after
    DDP's first regrouping, whose buckets are parts of the initial one, not unions).

    Example: recorded ``[(0, (3, 2), (10, 20)), (1, (1, 0), (30, 40))]`` and a bucket 0 of keys
    ``(3, 2, 1, 0)`` split into both recorded buckets; a bucket 0 of keys ``(3, 2)`` does not.
    """
    if not layout:
        return None
    if any(b == index and k == keys for b, k, _ in layout):
        return None
    mine = set(keys)
    parts = [e for e in layout if set(e[1]) <= mine]
    if len(parts) < 2 or sum(len(e[1]) for e in parts) != len(keys):
        return None
    return sorted(parts, key=lambda e: e[0])


class LayoutRecorder:
    """The buckets of the current step, and the layout of the last complete one (what a checkpoint stores).

    Built from a checkpoint's layout (``last``), the recorder is *resuming*: :meth:`split` then splits
    the DDP buckets that merge recorded ones, until a step passes without any (DDP has regrouped
    into the recorded layout). A run that was not resumed always exchanges DDP's own buckets.
    """

    def __init__(self, last: Optional[Sequence[Entry]] = None) -> None:
        self.last: Optional[Tuple[Entry, ...]] = tuple(last) if last else None
        self.resuming = self.last is not None
        self._step: List[Entry] = []
        self._split_this_step = False

    def split(self, index: int, keys: Keys) -> Optional[List[Entry]]:
        """While resuming: the recorded buckets DDP's bucket ``index`` merges (:func:`split`); else None."""
        if not self.resuming:
            return None
        parts = split(self.last, index, keys)
        self._split_this_step |= parts is not None
        return parts

    def add(self, index: int, keys: Keys, numels: Keys) -> None:
        """Record one bucket of the current step (a split bucket records its recorded parts)."""
        self._step.append((index, tuple(keys), tuple(numels)))

    def end_step(self) -> None:
        """The current step is complete: its buckets become the last layout."""
        if self._step:
            self.last = tuple(self._step)
        self.resuming = self.resuming and self._split_this_step
        self._step, self._split_this_step = [], False

    def to_list(self) -> Optional[List[list]]:
        """The last layout as plain lists (for a checkpoint), or None."""
        return None if self.last is None else [[b, list(k), list(n)] for b, k, n in self.last]


class Regroup:
    """Copies between one DDP bucket and the recorded buckets it merges (vectorised gathers and scatters).

    Args:
        keys, numels: the DDP bucket's parameters in its order.
        parts: the recorded buckets (:func:`split`), each ``(index, keys, sizes)``.
        device: where the index tensors live (the bucket's device).
    """

    def __init__(self, keys: Keys, numels: Keys, parts: Sequence[Entry], device) -> None:
        start, offset = {}, 0
        for key, n in zip(keys, numels):
            start[key] = offset
            offset += n
        self.parts = list(parts)
        self._index = [
            torch.cat([torch.arange(start[k], start[k] + n) for k, n in zip(pk, pn)]).to(device) for _, pk, pn in self.parts
        ]

    def gather(self, buf: torch.Tensor) -> List[torch.Tensor]:
        """Each recorded bucket's values, contiguous, in its own parameter order (new tensors)."""
        return [buf[idx] for idx in self._index]

    def scatter(self, buf: torch.Tensor, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """Write each recorded bucket's values back to their places in ``buf``; return ``buf``."""
        for idx, v in zip(self._index, values):
            buf[idx] = v
        return buf
