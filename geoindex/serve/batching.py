"""Dynamic micro-batching: requests that arrive together go through the model together.

A model thread blocks for the first waiting item, then keeps taking items until it holds max_batch
or max_wait has passed since the first, and runs them all in one call. With workers > 1, several
model threads take turns forming batches (one forms while the others run theirs), so on a CPU two
batches run side by side on a thread each instead of one batch whose operators wait for the
slowest of their threads at every step. When told
how many items are on their way (`expecting`, say request bodies still arriving), it waits only while some
are, so a lone request pays no batching delay. Under load
the queue fills while a batch runs, so the next batch forms with no waiting at all; alone, a
request waits at most max_wait. max_batch=1 turns batching off (one model call per photo, still one
at a time), which is the baseline `benchmarks/serve.py` compares with.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from ..config import ServeConfig  # the service's defaults are written once, there


class QueueFull(Exception):
    """More photos are waiting than the server will hold; the client should retry later."""


@dataclass
class _Item:
    payload: Any
    group: Hashable
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchTiming:
    """What one item went through: its wait in the queue, and the batch it ran in."""

    queue_ms: float
    batch_ms: float
    batch_size: int


_STOP = object()


class MicroBatcher:
    """run_batch(payloads, group) -> one result per payload, called from `workers` model threads (one batch each).

    Items of different groups (say, different k) never share a batch. A result that is an Exception
    fails its own item only; if a whole batch raises, its items are retried one by one, so one bad
    item fails only its own request.
    """

    def __init__(self, run_batch: Callable[[Sequence[Any], Hashable], Sequence[Any]],
                 max_batch: int = ServeConfig.max_batch, max_wait_ms: float = ServeConfig.max_wait_ms,
                 max_queue: int = ServeConfig.max_queue, expecting: Callable[[], int] | None = None,
                 workers: int = 1, name: str = "geoindex-batcher"):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.max_queue = max_queue
        self.expecting = expecting
        self._queue: queue.Queue = queue.Queue()
        self._held: list[_Item] = []  # taken from the queue but of another group than the batch being formed
        self.batch_sizes: Counter = Counter()
        self.items_done = 0
        self.busy_seconds = 0.0
        self._forming = threading.Lock()  # one thread forms a batch at a time: arrivals are not split between them
        self._counting = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    # ------------------------------------------------------------------ client side
    @property
    def pending(self) -> int:
        return self._queue.qsize() + len(self._held)

    def submit(self, payload, group: Hashable = None) -> Future:
        """Queue one item; the Future resolves to (result, BatchTiming)."""
        if self.pending >= self.max_queue:
            raise QueueFull(f"{self.pending} photos are already waiting; retry in a moment")
        future: Future = Future()
        self._queue.put(_Item(payload, group, future))
        return future

    async def __call__(self, payload, group: Hashable = None):
        """Await one item's (result, BatchTiming) without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(payload, group))

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(_STOP)  # each model thread that sees it puts it back for the next
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def stats(self) -> dict:
        batches = sum(self.batch_sizes.values())
        return {"items": self.items_done, "batches": batches, "pending": self.pending,
                "mean_batch_size": round(self.items_done / batches, 2) if batches else None,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "busy_seconds": round(self.busy_seconds, 3), "workers": self.workers, "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait * 1000}

    # ------------------------------------------------------------------ worker side
    def _next(self, timeout: float | None):
        if self._held:
            return self._held.pop(0)
        if timeout is None:
            return self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout)

    def _loop(self) -> None:
        while True:
            with self._forming:
                batch = self._form()
            if batch is None:
                return
            self._run(batch)

    def _form(self) -> list[_Item] | None:
        """The next batch, or None when the batcher is closing."""
        first = self._next(None)
        if first is _STOP:
            self._queue.put(_STOP)
            return None
        batch, deferred = [first], []
        deadline = first.enqueued + self.max_wait  # the window starts when the first item arrived
        while len(batch) < self.max_batch:
            try:
                item = self._next(0)
            except queue.Empty:
                if self.expecting is not None and self.expecting() == 0:
                    break  # nobody else is on the way: waiting would only add latency
                try:
                    item = self._next(deadline - time.perf_counter())
                except queue.Empty:
                    break
            if item is _STOP:
                self._queue.put(_STOP)
                break
            (batch if item.group == first.group else deferred).append(item)
        self._held = deferred + self._held
        return batch

    def _run(self, batch: list[_Item]) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]  # drop what clients gave up
        if not live:
            return
        start = time.perf_counter()
        try:
            results = list(self.run_batch([item.payload for item in live], live[0].group))
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
        except BaseException as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
            else:
                for item in live:  # find the culprit: each item alone
                    self._run_single(item)
            self._account(start, len(live))
            return
        seconds = self._account(start, len(live))
        for item, result in zip(live, results):
            if isinstance(result, Exception):  # this item alone was refused (a photo that does not decode, say)
                item.future.set_exception(result)
                continue
            item.future.set_result((result, BatchTiming(round((start - item.enqueued) * 1000, 2),
                                                        round(seconds * 1000, 2), len(live))))

    def _run_single(self, item: _Item) -> None:
        start = time.perf_counter()
        try:
            (result,) = self.run_batch([item.payload], item.group)
        except BaseException as exc:
            item.future.set_exception(exc)
            return
        if isinstance(result, Exception):
            item.future.set_exception(result)
            return
        item.future.set_result((result, BatchTiming(round((start - item.enqueued) * 1000, 2),
                                                    round((time.perf_counter() - start) * 1000, 2), 1)))

    def _account(self, start: float, n: int) -> float:
        seconds = time.perf_counter() - start
        with self._counting:
            self.busy_seconds += seconds  # summed over the model threads
            self.items_done += n
            self.batch_sizes[n] += 1
        return seconds
