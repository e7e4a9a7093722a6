"""Keep the ranks of the hook in step, or stop them all with a clear error.

The quantized exchange pairs messages by position: every rank must issue the same collectives, with
the same sizes, in the same order, and decode them with the same options. Nothing in the wire format
can repair a disagreement, so this module checks what can be checked and turns what cannot be
prevented into an error on every rank:

1. **Agreement at construction** (:func:`check_agreement`): the ranks all-gather everything that
   shapes the wire (bits, block size, error feedback, warm-up, ``min_compress_numel``, rounding and
   seed, topology, policy, gradcomp version) and every rank raises the same ``ValueError`` naming the
   fields and which ranks differ.
2. **Timeouts** (:func:`group_timeout`): the hook's own groups get the timeout of the user's group
   (or the ``timeout`` option), so a stalled peer makes the others raise after about that long,
   naming the collective, the step and the bucket (:func:`describe_failure`).
3. **Poisoning** (:func:`guarded`): an exception on the communication thread marks the state as
   failed; every later step, ``synchronize`` and ``state_dict`` raise :class:`HookFailedError`
   instead of issuing collectives that would pair one rank's step ``s`` with another's ``s + 1``.
   The failing rank leaves a note in the rendezvous store, so the others name it in their error.
4. **Checkpoints** (:mod:`gradcomp.comm.state_checks`): ``state_dict`` records a CRC-32 of every
   residual's bytes; ``load_state_dict`` checks keys, types, dtypes, shapes against the recorded
   bucket layout, finiteness and checksums before it changes anything. The first step after
   construction or a load compares step and layout across ranks (:func:`check_step_agreement`).
5. **Unsupported input** (:func:`check_bucket`, :func:`check_model`): sparse, complex and
   non-floating gradients are refused up front with what to do instead.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from gradcomp._version import __version__
from gradcomp.comm.plan import chunk_numel_for

logger = logging.getLogger(__name__)

__all__ = [
    "FailureLatch",
    "HookFailedError",
    "WIRE_FIELDS",
    "check_agreement",
    "check_alive",
    "check_bucket",
    "check_model",
    "check_step_agreement",
    "for_ddp",
    "group_timeout",
    "guarded",
    "layout_digest",
    "new_group_or_raise",
    "plain_result",
    "seconds",
    "wire_config",
]

#: The options that decide what a rank sends and how it decodes what it receives.
WIRE_FIELDS = (
    "bits", "format", "block_size", "error_feedback", "warmup_steps", "min_compress_numel",
    "stochastic_rounding", "seed", "topology", "policy", "chunk_numel",
)


class HookFailedError(RuntimeError):
    """The hook failed on this or another rank; its state refuses further steps.

    A failed exchange leaves the ranks at different points of the collective sequence; any further
    collective on the hook's groups would pair messages of different steps or buckets. Restart the
    job (from its last checkpoint) instead of continuing.
    """


# ---- timeouts


def group_timeout(process_group, backend: str, override: Optional[float] = None) -> datetime.timedelta:
    """Return the timeout of the hook's groups: ``override`` seconds, else the user's group's, else torch's default.

    Args:
        process_group: the group the hook averages over (None: the default group).
        backend: its backend name (``dist.get_backend``).
        override: seconds from the ``timeout`` option, or None.

    Returns:
        A positive ``timedelta``. The group's own timeout is read from its backend's options
        (``init_process_group(timeout=...)`` / ``new_group(timeout=...)``) where torch exposes it.
    """
    if override is not None:
        return datetime.timedelta(seconds=float(override))
    pg = process_group if process_group is not None else dist.group.WORLD
    for device in (torch.device("cpu"), torch.device("cuda")):
        try:
            value = pg._get_backend(device).options._timeout
        except Exception:  # this torch or backend does not expose it for this device
            continue
        if isinstance(value, datetime.timedelta) and value.total_seconds() > 0:
            return value
    getter = getattr(dist.distributed_c10d, "_get_default_timeout", None)
    if getter is not None:
        try:
            return getter(backend)
        except Exception:  # unknown backend name
            pass
    return dist.distributed_c10d.default_pg_timeout


def new_group_or_raise(ranks: List[int], backend, timeout: datetime.timedelta, what: str):
    """``dist.new_group`` with ``timeout``; a rank that never joins gives a clear error after ``timeout``."""
    try:
        return dist.new_group(ranks=ranks, backend=backend, timeout=timeout)
    except Exception as exc:
        raise RuntimeError(
            f"gradcomp: creating {what} (dist.new_group over ranks {ranks}) failed after at most "
            f"{timeout.total_seconds():.0f} s: {type(exc).__name__}: {exc}. Every rank must build the hook "
            "state (QuantizedAllReduceState / gradcomp.register) at the same point of the program, "
            "after the same process groups were created."
        ) from exc


# ---- agreement across ranks


def wire_config(config: Any, world_size: int) -> Dict[str, Any]:
    """Return the fields of ``config`` (a ``HookConfig``) that shape the wire, plus the gradcomp version."""
    out: Dict[str, Any] = {"gradcomp_version": __version__, "world_size": world_size}
    for name in WIRE_FIELDS:
        if not hasattr(config, name):  # an option this version does not have
            continue
        value = getattr(config, name)
        if name == "chunk_numel" and value is None:  # the default: the size the hook picks for P ranks
            value = chunk_numel_for(world_size)
        out[name] = asdict(value) if hasattr(value, "__dataclass_fields__") else value
    return out


def _disagreement(values: Sequence[Any]) -> Optional[str]:
    """Describe which ranks hold which value, or None when they all agree."""
    groups: List[Tuple[Any, List[int]]] = []
    for rank, v in enumerate(values):
        for known, ranks in groups:
            if known == v:
                ranks.append(rank)
                break
        else:
            groups.append((v, [rank]))
    if len(groups) == 1:
        return None
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {v!r}" for v, r in groups)


def check_agreement(mine: Dict[str, Any], group, timeout: datetime.timedelta) -> None:
    """All-gather ``mine`` over ``group`` and raise the same ``ValueError`` on every rank if any field differs.

    Args:
        mine: this rank's :func:`wire_config`.
        group: a group of all the hook's ranks (a collective call on it).
        timeout: the group's timeout, for the message when a rank never arrives.

    Raises:
        ValueError: naming every field that differs and which ranks hold which value.
        RuntimeError: when the gather fails (a rank did not build the state, or died).
    """
    world = dist.get_world_size(group)
    gathered: List[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, mine, group=group)
    except Exception as exc:
        raise RuntimeError(
            f"gradcomp: comparing the hook options across the {world} ranks (all_gather_object at construction) "
            f"failed within the {timeout.total_seconds():.0f} s timeout: {type(exc).__name__}: {exc}. Every rank "
            "must build the hook state at the same point of the program."
        ) from exc
    problems = []
    for name in mine:
        what = _disagreement([g.get(name) if isinstance(g, dict) else None for g in gathered])
        if what is not None:
            problems.append(f"{name} ({what})")
    if problems:
        raise ValueError(
            "gradcomp: the ranks built the hook with different options, which would corrupt or hang the "
            f"exchange: {'; '.join(problems)}. Build it with the same options on every rank."
        )


def layout_digest(step: int, bucket_keys: Dict[int, Sequence[int]], bucket_numels: Dict[int, Sequence[int]]) -> int:
    """Return a 63-bit digest of the step and the bucket layout (the same on every rank of a healthy job)."""
    text = repr((int(step), sorted((int(k), tuple(v)) for k, v in bucket_keys.items()),
                 sorted((int(k), tuple(v)) for k, v in bucket_numels.items())))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def check_step_agreement(step: int, digest: int, group, device) -> None:
    """Raise the same ``ValueError`` on every rank unless all ranks hold the same step and layout digest.

    Runs once after construction and after every ``load_state_dict``, on the communication thread
    (every rank meets it at the same point: the first bucket of the next step).
    """
    world = dist.get_world_size(group)
    mine = torch.tensor([step, digest], dtype=torch.int64, device=device)
    out = torch.empty(world * 2, dtype=torch.int64, device=device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, mine, group=group)
    rows = out.view(world, 2).tolist()
    steps = _disagreement([r[0] for r in rows])
    layouts = _disagreement([r[1] for r in rows])
    if steps or layouts:
        parts = []
        if steps:
            parts.append(f"step ({steps})")
        if layouts:
            parts.append("bucket layout of the residuals (digests " + layouts + ")")
        raise ValueError(
            f"gradcomp: the ranks hold different hook states: {'; '.join(parts)}. Load every rank's own "
            "checkpoint of the same step (state.load_state_dict) on every rank, or none."
        )


# ---- failures on the communication thread


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def _note_key(tag: str, rank: int) -> str:
    return f"gradcomp/failure/{tag}/{rank}"


def leave_note(tag: str, rank: int, text: str) -> None:
    """Tell the other ranks (through the rendezvous store) that this rank's hook failed and why."""
    store = _store()
    if store is None:
        return
    try:
        store.set(_note_key(tag, rank), text[:500])
    except Exception:  # the store is gone too: the peers' own errors will have to do
        pass


def read_notes(tag: str, world_size: int, rank: int) -> List[str]:
    """Return the failure notes other ranks left, without waiting."""
    store = _store()
    notes: List[str] = []
    if store is None:
        return notes
    for r in range(world_size):
        if r == rank:
            continue
        key = _note_key(tag, r)
        try:
            if store.check([key]):
                notes.append(f"rank {r}: {store.get(key).decode(errors='replace')}")
        except Exception:
            break
    return notes


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text or isinstance(exc, TimeoutError)


def describe_failure(exc: BaseException, *, step: int, bucket: int, what: str, timeout: datetime.timedelta,
                     notes: Sequence[str]) -> str:
    """Return the message for an exchange that failed: gradcomp, the collective, the step, the bucket, the cause."""
    where = f"gradcomp: {what} at step {step}, bucket {bucket}"
    if _is_timeout(exc):
        head = (f"{where} timed out after the {timeout.total_seconds():.0f} s timeout of the hook's process group "
                "(a peer stalled, died, or issued other collectives)")
    elif "closed by peer" in str(exc).lower() or "connection reset" in str(exc).lower():
        head = f"{where} lost its connection to a peer (it died or stopped)"
    else:
        head = f"{where} failed"
    tail = f" Other ranks reported: {' | '.join(notes)}." if notes else ""
    return f"{head}: {type(exc).__name__}: {exc}.{tail}"


def _same_type(exc: BaseException, message: str) -> BaseException:
    """A new exception of ``exc``'s type with ``message`` (RuntimeError where the type takes no message)."""
    try:
        new = type(exc)(message)
        if str(new) != message:
            raise TypeError
    except Exception:
        new = RuntimeError(message)
    new.__cause__ = exc
    return new


@dataclass
class FailureLatch:
    """Whether a hook state failed, on this rank or a peer, and where to tell the peers.

    One per hook state (:attr:`QuantizedAllReduceState.failure`). Once :attr:`failure` is set the
    state refuses every further step (:func:`check_alive`): continuing would pair one rank's step s
    with another's s + 1.

    Attributes:
        rank, world_size: this rank in the hook's group, and the group's size.
        timeout: the hook's collective timeout (named in timeout errors).
        tag: the hook's group name, the same on every rank: the key of the notes peers leave.
        failure: the first failure's message, or None.
    """

    rank: int
    world_size: int
    timeout: datetime.timedelta
    tag: str = ""
    failure: Optional[str] = None


def poison(latch: FailureLatch, message: str) -> None:
    """Mark the state as failed: from now on it refuses steps (see :func:`check_alive`)."""
    if latch.failure is None:
        latch.failure = message
        leave_note(latch.tag, latch.rank, message)
        logger.error("%s", message)


def check_alive(latch: FailureLatch) -> None:
    """Raise :class:`HookFailedError` if the hook failed before (on this rank or a peer)."""
    if latch.failure is not None:
        raise HookFailedError(
            f"gradcomp: this hook state stopped after a failed exchange and refuses further steps, since "
            f"continuing would pair different steps across ranks. First failure: {latch.failure} "
            "Restart the job (from its last checkpoint)."
        )


def _failed(latch: FailureLatch, exc: BaseException, *, step: int, bucket: int, what: str) -> BaseException:
    notes = read_notes(latch.tag, latch.world_size, latch.rank)
    message = describe_failure(exc, step=step, bucket=bucket, what=what, timeout=latch.timeout, notes=notes)
    poison(latch, message)
    return _same_type(exc, message)


def guarded(latch: FailureLatch, fn: Callable[[], Any], *, step: int, bucket: int, what: str) -> Callable[[], Any]:
    """Wrap a job of the communication thread: refuse it on a failed state; on an exception, poison the state.

    The exception is re-raised with its original type, its message prefixed by where it happened
    (step, bucket, collective; for a timeout, the timeout and the other ranks' notes).
    """

    def job():
        check_alive(latch)
        try:
            return fn()
        except BaseException as exc:
            raise _failed(latch, exc, step=step, bucket=bucket, what=what) from exc

    return job


def plain_result(latch: FailureLatch, step: int, bucket: int) -> Callable[[torch.futures.Future], torch.Tensor]:
    """Return a ``then`` callback for a plain all-reduce on DDP's group: its tensor, or a poisoned state and
    an error naming gradcomp, the collective, the step and the bucket."""

    def result(fut: torch.futures.Future) -> torch.Tensor:
        try:
            return fut.value()[0]
        except BaseException as exc:
            raise _failed(latch, exc, step=step, bucket=bucket, what="plain all-reduce (DDP's group)") from exc

    return result


def _value(fut: torch.futures.Future):
    return fut.wait()


def for_ddp(fut: torch.futures.Future) -> torch.futures.Future:
    """Return a future that DDP can fail properly: its error carries the original type name and message.

    DDP casts a future's value to a tensor; an exception stored with ``set_exception`` would come out
    as "Unable to cast ... to Tensor". Re-raising it in a ``then`` callback makes the future fail
    with ``<Type>: <message>``, which DDP raises from ``backward``.
    """
    return fut.then(_value)


# ---- unsupported input


def check_bucket(buf: torch.Tensor, index: int) -> None:
    """Refuse a gradient bucket the exchange cannot carry: sparse, complex or not floating point."""
    if buf.layout != torch.strided:
        raise ValueError(
            f"gradcomp: bucket {index} holds sparse gradients ({buf.layout}), which the quantized exchange cannot "
            "carry. Use dense gradients (nn.Embedding(sparse=False)), or keep the sparse module out of this DDP model."
        )
    if buf.is_complex():
        raise TypeError(
            f"gradcomp: bucket {index} holds complex gradients ({buf.dtype}). Store complex parameters as real "
            "pairs (torch.view_as_real) or leave them out of this DDP model."
        )
    if not buf.is_floating_point():
        raise TypeError(
            f"gradcomp: bucket {index} holds {buf.dtype} gradients; the hook averages floating-point gradients only "
            "(fp32, fp16, bf16, fp64). Leave non-floating parameters out of this DDP model."
        )


def check_model(module: torch.nn.Module) -> None:
    """Refuse, at registration, a model whose gradients would be sparse, complex or not floating point."""
    for name, sub in module.named_modules():
        if getattr(sub, "sparse", False) is True and any(p.requires_grad for p in sub.parameters(recurse=False)):
            raise ValueError(
                f"gradcomp: module {name or '<root>'} ({type(sub).__name__}) has sparse=True and would make sparse "
                "gradients, which the quantized exchange cannot carry. Build it with sparse=False, or keep it out of "
                "the DDP model this hook is registered on."
            )
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(
                f"gradcomp: parameter {name} is {p.dtype}; the hook averages real floating-point gradients only. "
                "Store complex parameters as real pairs (torch.view_as_real) or leave it out of the DDP model."
            )


def seconds(value: Any) -> Optional[float]:
    """Validate the ``timeout`` option: None, or positive finite seconds (int, float or timedelta)."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"timeout must be None or a positive number of seconds (or a timedelta), got {value!r}")
    return float(value)
