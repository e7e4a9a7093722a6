"""Every rank's hook state in one checkpoint entry, for frameworks that write checkpoints from one rank.

Lightning, accelerate and the HF Trainer call ``state_dict()`` on every rank but write the file from
rank 0 only, and every rank reads that one file on resume. The hook's state is per rank (each rank
keeps its own residuals), so a plain ``state.state_dict()`` would resume every rank from rank 0's
residuals. :func:`gather_state_dict` collects all ranks' state dicts into one object, identical on
every rank; :func:`load_gathered_state_dict` picks this rank's entry from it.

Example:
    >>> blob = gather_state_dict(state)          # doctest: +SKIP
    >>> torch.save({"hook": blob, ...}, path)    # doctest: +SKIP
    >>> load_gathered_state_dict(state, torch.load(path, weights_only=True)["hook"])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Dict

import torch.distributed as dist

from gradcomp.comm.hook import QuantizedAllReduceState

FORMAT = "gradcomp.gathered_hook_state"
VERSION = 1

__all__ = ["FORMAT", "gather_state_dict", "load_gathered_state_dict"]


def _check_state(state: Any) -> None:
    if not isinstance(state, QuantizedAllReduceState):
        raise TypeError(f"state must be a gradcomp QuantizedAllReduceState, got {type(state).__name__}")


def gather_state_dict(state: QuantizedAllReduceState) -> Dict[str, Any]:
    """Collect every rank's ``state.state_dict()`` into one dict, the same on every rank (collective).

    Call it on every rank of the hook's process group at the same point. Tensors are on CPU.
    Memory: each rank holds all ranks' residuals (world size x the model's fp32 size at most) until
    the result is dropped.

    Returns:
        ``{"format": FORMAT, "version": 1, "world_size": P, "ranks": [state dict of rank 0, ..., rank P-1]}``
        (ranks numbered within the hook's process group).
    """
    _check_state(state)
    mine = state.state_dict()
    entries = [mine]
    if state.world_size > 1:
        entries = [None] * state.world_size
        dist.all_gather_object(entries, mine, group=state.process_group)
    return {"format": FORMAT, "version": VERSION, "world_size": state.world_size, "ranks": entries}


def load_gathered_state_dict(state: QuantizedAllReduceState, blob: Dict[str, Any]) -> None:
    """Load this rank's entry of a :func:`gather_state_dict` result into ``state`` (no communication).

    Every rank checks the same things on the same blob, so either all ranks load or all raise.

    Raises:
        TypeError: ``blob`` is not what :func:`gather_state_dict` returned.
        ValueError: the blob was written by a job of another world size, or this rank's entry does
            not fit ``state`` (see :meth:`QuantizedAllReduceState.load_state_dict`); nothing is changed.
    """
    _check_state(state)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        got = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise TypeError(f"expected a dict made by gradcomp's gather_state_dict (format {FORMAT!r}), got {got!r}")
    if blob.get("version") != VERSION:
        raise ValueError(f"gathered hook state has version {blob.get('version')!r}; this gradcomp reads version {VERSION}")
    ranks = blob.get("ranks")
    if blob.get("world_size") != state.world_size or not isinstance(ranks, list) or len(ranks) != state.world_size:
        raise ValueError(
            f"the checkpoint holds the hook states of {blob.get('world_size')!r} ranks, this job has {state.world_size}; "
            "resume with the world size it was saved with"
        )
    state.load_state_dict(ranks[state.rank])
