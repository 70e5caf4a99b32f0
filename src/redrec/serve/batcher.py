"""A generic asyncio micro-batcher: concurrent requests become one call of a batch function in a worker thread.

    batcher = MicroBatcher(fn, max_batch=32, max_wait_ms=2, max_queue=256)
    await batcher.start()
    result = await batcher.submit(item)        # from many concurrent request handlers
    await batcher.stop()                        # drains what is queued, then returns

``fn(items: list[T]) -> Sequence[R | BaseException]`` runs in one dedicated worker thread (torch and the numba /
BLAS retrieval kernels release the GIL, so the event loop keeps accepting requests meanwhile).  It returns one
result per item, in order; an exception instance in the list fails that item only, an exception raised by ``fn``
fails the whole batch.

Batching policy: a batch starts when ``max_batch`` items are waiting, or as many as the recent load (the largest,
over the last ``history`` batches, of a batch's size plus the items that arrived while it ran: at steady load every
client's next request is then taken as soon as it is in, instead of waiting out ``max_wait_ms`` for requests that are
not coming -- a lone client no longer waits at all -- and clients whose requests alternate with the running batch
are gathered again into one), or when ``max_wait_ms`` has passed since the oldest waiting item arrived or since the
worker became free, whichever is later (``history=0``: since the item arrived).  An item may wait longer for the
worker while a previous batch runs: the items arriving meanwhile make the next batch.  Only one batch runs at a
time.

Back-pressure: at most ``max_queue`` items wait (the running batch not included); :meth:`submit` raises
:class:`QueueFull` at once beyond that, instead of letting latency grow without bound.  After :meth:`stop` began it
raises :class:`BatcherClosed`.  Both are :class:`Overloaded` (``redrec serve`` answers 503 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Overloaded(RuntimeError):
    """The batcher cannot take the item now; ``retry_after`` = suggested wait in seconds."""

    reason = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Overloaded):
    reason = "queue_full"


class BatcherClosed(Overloaded):
    reason = "shutting_down"


@dataclass
class BatchInfo:
    """What one batch did (passed to ``on_batch``).

    Attributes:
        size: items in the batch.
        queue_wait: seconds each item waited from :meth:`MicroBatcher.submit` to the batch start.
        seconds: wall time of the batch function.
        failed: the batch function raised.
    """

    size: int
    queue_wait: list[float]
    seconds: float
    failed: bool


class MicroBatcher(Generic[T, R]):
    """Gathers concurrent :meth:`submit` calls into calls of ``fn`` (see the module docstring).

    Args:
        fn: the batch function ``list[T] -> Sequence[R | BaseException]`` (same length, same order).
        max_batch: most items per call (>= 1).
        max_wait_ms: longest wait, in milliseconds, for a batch to fill once its first item arrived (>= 0).
        max_queue: most items waiting (>= 1); beyond that :meth:`submit` raises :class:`QueueFull`.
        on_batch: called (in the event loop) with a :class:`BatchInfo` after each batch.
        name: worker thread name prefix.
        history: batches over which the fill target is taken (0: always wait for ``max_batch`` or ``max_wait_ms``).
    """

    def __init__(
        self, fn: Callable[[list[T]], Sequence[R | BaseException]], *, max_batch: int = 32, max_wait_ms: float = 2.0,
        max_queue: int = 256, on_batch: Callable[[BatchInfo], None] | None = None, name: str = "batcher",
        history: int = 8,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0 or not max_wait_ms == max_wait_ms:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.fn = fn
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self.name = name
        self._queue: deque[tuple[T, asyncio.Future, float]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._busy = False
        self._last_batch_seconds = 0.0
        self._sizes: deque[int] = deque(maxlen=max(1, int(history)))  # batch size + arrivals during the batch
        self._submitted = 0
        self._adaptive = int(history) > 0

    # -- state -----------------------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the running batch)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        """Started and not stopping."""
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def busy(self) -> bool:
        """A batch is running now."""
        return self._busy

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the worker (in the running event loop)."""
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self, drain: bool = True) -> None:
        """Refuse new items; with ``drain`` finish every queued item first, else fail them with
        :class:`BatcherClosed`.  Returns once the worker has stopped."""
        self._closing = True
        if not drain:
            while self._queue:
                _, fut, _ = self._queue.popleft()
                if not fut.done():
                    fut.set_exception(BatcherClosed("the server is shutting down"))
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- submitting ------------------------------------------------------------------------------------------------
    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result (raises what ``fn`` raised or returned for it).

        Raises:
            QueueFull: ``max_queue`` items are already waiting.
            BatcherClosed: the batcher is stopping (or was never started).
        """
        if self._closing or self._task is None or self._task.done():
            raise BatcherClosed("the server is shutting down", retry_after=1.0)
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{len(self._queue)} requests are already waiting (max_queue={self.max_queue})",
                            retry_after=self._retry_after())
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut, time.perf_counter()))
        self._submitted += 1
        assert self._wakeup is not None
        self._wakeup.set()
        return await fut

    def _retry_after(self) -> float:
        """Seconds until the queue has likely drained: the batches ahead of it times the last batch's duration."""
        batches = len(self._queue) / self.max_batch + (1 if self._busy else 0)
        return max(1.0, batches * self._last_batch_seconds)

    # -- the worker ------------------------------------------------------------------------------------------------
    async def _wait(self, timeout: float | None) -> None:
        assert self._wakeup is not None
        self._wakeup.clear()
        if timeout is None:
            await self._wakeup.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _take(self) -> list[tuple[T, asyncio.Future, float]]:
        batch = []
        while self._queue and len(batch) < self.max_batch:
            entry = self._queue.popleft()
            if not entry[1].done():  # a cancelled waiter (client gone) is dropped
                batch.append(entry)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        free_since = time.perf_counter()  # when the worker last became free
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._wait(None)
                continue
            # let the batch fill: until it is full, holds as many items as the recent load, or max_wait has passed
            # since its oldest item arrived (adaptive: or since the worker became free, whichever is later -- items
            # that queued behind the previous batch still wait for the requests the load says are coming)
            target = min(self.max_batch, max(self._sizes)) if self._adaptive and self._sizes else self.max_batch
            while not self._closing and len(self._queue) < target:
                since = max(self._queue[0][2], free_since) if self._adaptive else self._queue[0][2]
                remaining = since + self.max_wait - time.perf_counter()
                if remaining <= 0:
                    break
                await self._wait(remaining)
                if not self._queue:
                    break
            batch = self._take()
            if not batch:
                continue
            submitted = self._submitted
            t0 = time.perf_counter()
            waits = [t0 - t for _, _, t in batch]
            failed = False
            self._busy = True
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [item for item, _, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except BaseException as e:  # noqa: BLE001 - handed to every waiter
                failed = True
                if isinstance(e, asyncio.CancelledError):
                    for _, fut, _ in batch:
                        if not fut.done():
                            fut.set_exception(BatcherClosed("the server is shutting down"))
                    raise
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)
            else:
                for (_, fut, _), r in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(r, BaseException):
                        fut.set_exception(r)
                    else:
                        fut.set_result(r)
            finally:
                self._busy = False
            self._last_batch_seconds = time.perf_counter() - t0
            self._sizes.append(len(batch) + self._submitted - submitted)
            free_since = time.perf_counter()
            if self.on_batch is not None:
                with contextlib.suppress(Exception):
                    self.on_batch(BatchInfo(len(batch), waits, self._last_batch_seconds, failed))
