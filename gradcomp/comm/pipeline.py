"""Overlap the exchange's CPU work with the wire: chunks in a fixed-lag pipeline of async collectives.

One thread (the hook's communication thread) pushes chunks in the order DDP produces buckets. For each
pushed chunk ``c`` the pipeline:

1. encodes chunk ``c`` and issues its all-to-all (``async_op=True``);
2. waits for chunk ``c - 1``'s all-to-all, reduces its shard and issues its all-gather;
3. waits for chunk ``c - 2``'s all-gather and decodes it into its bucket.

So while chunk ``c`` is on the wire the CPU reduces ``c - 1`` and decodes ``c - 2``, and the next
bucket's first chunk is coded while the previous bucket's last chunks travel. The order in which
collectives are issued (``a2a(c), ag(c-1), a2a(c+1), ag(c), ...``) depends only on the sequence of
chunks, never on timing, so every rank issues the same collectives in the same order on the group.
:meth:`ChunkPipeline.flush` drains it (the hook flushes at the last bucket of each step).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["ChunkJob", "ChunkPipeline", "CommThread", "PENDING", "all_gather_async", "comm_stream"]


def all_gather_async(output: torch.Tensor, inp: torch.Tensor, group):
    """Start an all-gather of ``inp`` from every rank into ``output``; return the work handle."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, inp, group=group, async_op=True)


class ChunkJob:
    """One chunk's exchange: the three CPU steps and the two buffers pairs the collectives use.

    Args:
        encode: fills ``send`` (the all-to-all's input).
        send, recv: the all-to-all's buffers.
        reduce: reads ``recv``, returns the all-gather's input.
        gathered: the all-gather's output.
        decode: reads ``gathered``; called last.
    """

    __slots__ = ("encode", "send", "recv", "reduce", "gathered", "decode", "_a2a", "_ag")

    def __init__(self, encode: Callable[[], None], send, recv, reduce: Callable[[], torch.Tensor], gathered, decode: Callable[[], None]):
        self.encode, self.send, self.recv, self.reduce, self.gathered, self.decode = encode, send, recv, reduce, gathered, decode
        self._a2a = None
        self._ag = None


class ChunkPipeline:
    """Run :class:`ChunkJob` s with a lag of one chunk per phase on ``group`` (see the module docstring)."""

    def __init__(self, group):
        self.group = group
        self._a2a: Deque[ChunkJob] = deque()
        self._ag: Deque[ChunkJob] = deque()

    def __len__(self) -> int:
        return len(self._a2a) + len(self._ag)

    def push(self, job: ChunkJob) -> None:
        """Encode ``job`` and put it on the wire; advance the older chunks by one phase."""
        job.encode()
        job._a2a = dist.all_to_all_single(job.recv, job.send, group=self.group, async_op=True)
        self._a2a.append(job)
        while len(self._a2a) > 1:
            self._reduce_oldest()
        while len(self._ag) > 1:
            self._decode_oldest()

    def _reduce_oldest(self) -> None:
        job = self._a2a.popleft()
        job._a2a.wait()
        job._a2a = None
        mine = job.reduce()
        job._ag = all_gather_async(job.gathered, mine, self.group)
        self._ag.append(job)

    def _decode_oldest(self) -> None:
        job = self._ag.popleft()
        job._ag.wait()
        job._ag = None
        job.decode()

    def flush(self) -> None:
        """Finish every pushed chunk (in order)."""
        while self._a2a:
            self._reduce_oldest()
        while self._ag:
            self._decode_oldest()

    def abort(self) -> None:
        """Forget every chunk in flight (after an error). Issued collectives are not waited for: a peer
        that failed the same way may never issue its side."""
        self._a2a.clear()
        self._ag.clear()


PENDING = object()  #: returned by a submitted function that completes its future later (the pipeline does)


class CommThread:
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
        """Run ``fn()`` on the thread after everything submitted before; complete ``fut`` with its result."""
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
                if result is not PENDING:
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


_SIDE_STREAMS: Dict[Any, Any] = {}


def comm_stream(buf: torch.Tensor, ready_event):
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
