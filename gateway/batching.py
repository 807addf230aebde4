"""Dynamic batching: many requests, one model+defense call, answers split back in order.

Contract (cf. ray-project/ray ``serve/batching.py``):

* ``submit(rows[n, D])`` is called with rows that are already validated; it returns a future
  that settles with exactly those ``n`` rows of output, in order.
* A batch flushes when it holds ``max_batch_size`` rows or when its oldest request has waited
  ``max_delay_s``. A slow pipeline (``fill_wait`` × the recent time to process a batch is longer than
  ``max_delay_s``; MemGuard takes ~100 ms a batch) waits that long for batch-mates instead, or until the
  queue also holds as many rows as the previous batch: the clients it just answered come back a few ms
  apart, and batches stay full instead of alternating between two halves of the clients (``_flush_rule``).
  A request larger than ``max_batch_size`` runs as a batch of its own.
* The queue is bounded in rows; beyond it ``submit`` raises ``TooManyRequests`` (429).
* Requests whose client went away (``submit(..., gone=)`` completed, or the waiter was cancelled) are
  dropped before their batch runs: a burst of abandoned requests costs no model or defense time.
* If a batch call raises, every request in it is retried alone, so one poisonous request
  never fails its batch-mates; a request that fails alone gets a 500.
* Every waiter is settled: with a result, an error, or on ``close`` after the queue drains.
* With ``quantum_s`` > 0 a batch's answers leave at the first multiple of it after the batch started (a
  defense whose work varies by row, like MemGuard's, would otherwise tell each client through its latency how
  much work its row took; docs/ARCHITECTURE.md, "Timing"). The worker goes on to the next batch meanwhile.
* A batch call that has not returned after ``batch_timeout_s`` is stuck (a native call cannot be interrupted):
  its requests and every queued one get 503 with Retry-After, new ones too, and ``stuck_s`` tells readiness
  and liveness, until the call returns (its answer is discarded).
* The blocking call runs on a single worker thread: the event loop stays free, and batches
  reach the model (and the GPU) one at a time.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import (
    ClientDisconnected,
    DefenseRejected,
    GatewayError,
    InputOutOfRange,
    ServiceUnavailable,
    TooManyRequests,
)
from gateway.logs import RequestTrace, batch_headers, upstream_headers
from gateway.metrics import GatewayMetrics
from gateway.pipeline import BatchOutput

log = logging.getLogger("gateway.batching")


@dataclass(frozen=True)
class RequestOutput:
    probabilities: np.ndarray  # [n, C] float64
    labels: np.ndarray  # [n] int64


@dataclass
class _Item:
    rows: np.ndarray  # [n, D] float32
    future: asyncio.Future[RequestOutput]
    enqueued: float = field(default_factory=time.perf_counter)
    gone: Callable[[], Awaitable[object]] | None = None  # completes if the client disconnects
    trace: RequestTrace | None = None  # forwarded to an upstream model server (proxy mode)

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])


class BatchQueue:
    def __init__(
        self,
        process: Callable[[np.ndarray], BatchOutput],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_rows: int,
        metrics: GatewayMetrics,
        fill_wait: float = 0.0,
        quantum_s: float = 0.0,
        batch_timeout_s: float = 60.0,
    ) -> None:
        self._process = process
        self.quantum_s = quantum_s
        self.batch_timeout_s = batch_timeout_s
        self._stuck_since: float | None = None  # perf_counter() when the running batch call started, while stuck
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.fill_wait = fill_wait
        self._batch_s = 0.0  # moving average of the seconds one batch takes to process
        self._answered = 0  # rows of the previous batch: their clients may come back for the next one
        self.max_queue_rows = max_queue_rows
        self._metrics = metrics
        self._pending: collections.deque[_Item] = collections.deque()
        self._pending_rows = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._refusing = False  # past the drain deadline: nothing new is queued
        self._sweeper: asyncio.Task[None]
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-batch")

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="gateway-batcher")
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="gateway-watch")

    async def close(self) -> None:
        """Stop accepting, finish everything queued, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
            self._sweeper.cancel()
        self._executor.shutdown(wait=True)

    def refuse_after(self, seconds: float) -> None:
        """Drain under a deadline: after ``seconds``, every request still queued (not in a running batch) and
        every new one gets 503 with Retry-After instead of waiting past the shutdown limit."""
        asyncio.get_running_loop().call_later(seconds, self._refuse)

    def _refuse(self) -> None:
        self._refusing = True
        self._fail_pending(_draining())

    def _fail_pending(self, exc: GatewayError) -> None:
        while self._pending:
            _settle_error(self._pending.popleft(), exc)
        self._pending_rows = 0
        self._metrics.queue_depth.set(0)

    @property
    def stuck_s(self) -> float | None:
        """How long the running batch call has run, once that is past ``batch_timeout_s``; else None."""
        return None if self._stuck_since is None else time.perf_counter() - self._stuck_since

    # --- producer side ---------------------------------------------------------------------
    async def submit(
        self, rows: np.ndarray, gone: Callable[[], Awaitable[object]] | None = None, trace: RequestTrace | None = None
    ) -> RequestOutput:
        """Queue validated rows; their output. ``gone()`` completes if the client disconnects: its rows are then
        dropped before their batch runs (or their answer discarded) and ``ClientDisconnected`` is raised."""
        if self._closing or self._refusing:
            raise _draining()
        if (stuck := self.stuck_s) is not None:
            raise _stuck(stuck)
        n = int(rows.shape[0])
        if self._pending_rows + n > self.max_queue_rows:
            raise TooManyRequests(
                f"the batch queue is full ({self._pending_rows} rows waiting, limit {self.max_queue_rows}); "
                "retry after the Retry-After delay or send fewer rows per request",
                retry_after_s=1,
            )
        item = _Item(rows=rows, future=asyncio.get_running_loop().create_future(), gone=gone, trace=trace)
        self._pending.append(item)
        self._pending_rows += n
        self._metrics.queue_depth.set(self._pending_rows)
        self._wakeup.set()
        return await item.future

    # --- consumer side ---------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline, target = self._flush_rule()
            while self._pending_rows < target and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                start = time.perf_counter()
                await self._run(loop, batch)
                took = time.perf_counter() - start
                self._batch_s = took if not self._batch_s else self._batch_s + 0.2 * (took - self._batch_s)
                self._answered = sum(it.n for it in batch)

    async def _sweep(self) -> None:
        """Watch the connections of requests queued for WATCH_AFTER_S or more. Watching costs a task per request
        (~15% of defense=none's throughput when every request had one), so only the requests that wait long,
        the ones a disconnect could save work for, get one."""
        while True:
            await asyncio.sleep(WATCH_AFTER_S)
            old = time.perf_counter() - WATCH_AFTER_S
            for item in self._pending:
                if item.enqueued > old:
                    break  # the queue is in arrival order
                if item.gone is not None:
                    _watch(item.future, item.gone)
                    item.gone = None

    def _flush_rule(self) -> tuple[float, int]:
        """(deadline, rows) of the batch being formed: it flushes at whichever comes first.

        A fast pipeline: the oldest row's enqueue time + ``max_delay_s``, or a full batch. A slow one (``fill_wait``
        × its recent batch time is longer): that long from now, or once the queue also holds the rows whose
        clients were just answered. Counting from the oldest row instead would flush at once the rows that
        queued while the last batch ran, and two halves of the clients would alternate for good."""
        wait = self.fill_wait * self._batch_s
        if wait <= self.max_delay_s:
            return self._pending[0].enqueued + self.max_delay_s, self.max_batch_size
        return time.perf_counter() + wait, min(self.max_batch_size, self._pending_rows + self._answered)

    def _take(self) -> list[_Item]:
        """Pop requests (skipping cancelled ones) up to max_batch_size rows; at least one."""
        batch: list[_Item] = []
        rows = 0
        while self._pending:
            item = self._pending[0]
            if item.future.done():  # client went away
                self._pending.popleft()
                self._pending_rows -= item.n
                continue
            if batch and rows + item.n > self.max_batch_size:
                break
            self._pending.popleft()
            self._pending_rows -= item.n
            batch.append(item)
            rows += item.n
        self._metrics.queue_depth.set(self._pending_rows)
        return batch

    async def _within_timeout(
        self, call: asyncio.Future[BatchOutput], batch: list[_Item], start: float
    ) -> BatchOutput | None:
        """The batch call's output (or its exception); None if it overran ``batch_timeout_s``: then its requests
        and the queued ones got 503, and this returns once the call does."""
        done, _ = await asyncio.wait({call}, timeout=self.batch_timeout_s)
        if done:
            return call.result()
        self._stuck_since = start
        log.error("a batch of %d rows has run for %g s (GATEWAY_BATCH_TIMEOUT_S): the model or defense is stuck; "
                  "its requests and the queued ones get 503, readiness and liveness fail until it returns",
                  sum(it.n for it in batch), self.batch_timeout_s)  # fmt: skip
        for item in batch:
            _settle_error(item, _stuck(self.batch_timeout_s))
        self._fail_pending(_stuck(self.batch_timeout_s))
        try:
            await call
        except Exception as exc:  # its requests were answered already
            log.warning("the stuck batch call ended with %s", type(exc).__name__)
        log.warning("the stuck batch call returned after %.1f s; serving again", time.perf_counter() - start)
        self._stuck_since = None
        return None

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        start = time.perf_counter()
        for item in batch:
            self._metrics.queue_wait.observe(start - item.enqueued)
        x = batch[0].rows if len(batch) == 1 else np.concatenate([it.rows for it in batch])  # [B, D]
        self._metrics.batch_size.observe(x.shape[0])
        try:
            traces = [it.trace for it in batch if it.trace is not None]
            if traces:  # proxy mode: the upstream call reads its headers from this batch's context
                context = contextvars.copy_context()
                context.run(upstream_headers.set, batch_headers(traces))
                call = loop.run_in_executor(self._executor, context.run, self._process, x)
            else:
                call = loop.run_in_executor(self._executor, self._process, x)
            if (out := await self._within_timeout(call, batch, start)) is None:
                return
            if len(out) != x.shape[0]:
                raise RuntimeError(f"batch call returned {len(out)} rows for {x.shape[0]}")
        except GatewayError as exc:  # e.g. the upstream failed: the runner already retried; fail the batch once
            for item in batch:
                _settle_error(item, exc)
            return
        except Exception as exc:
            if len(batch) > 1:
                log.warning("batch of %d requests failed (%s); retrying each alone", len(batch), type(exc).__name__)
                for item in batch:
                    if not item.future.done():
                        await self._run(loop, [item])
                return
            log.error("model or defense failed for a request: %s", type(exc).__name__, exc_info=False)
            _settle_error(batch[0], GatewayError("the model failed on this request; see the gateway log"))
            return
        if self.quantum_s:
            elapsed = time.perf_counter() - start
            loop.call_later(self.quantum_s * math.ceil(elapsed / self.quantum_s) - elapsed, _settle, batch, out)
        else:
            _settle(batch, out)


def _settle(batch: list[_Item], out: BatchOutput) -> None:
    """Each request's rows of a batch's output, or the error that withholds them."""
    offset = 0
    for item in batch:
        part = slice(offset, offset + item.n)
        offset += item.n
        if item.future.done():
            continue
        if out.out_of_range[part].any():
            rows = np.flatnonzero(out.out_of_range[part])[:5].tolist()
            _settle_error(item, InputOutOfRange(
                f"the model's output is not finite for row(s) {rows} of this request: their values are out of "
                "the range the model handles (e.g. ±3e38); send features scaled as in training"))  # fmt: skip
        elif out.rejected[part].any():
            _settle_error(
                item,
                DefenseRejected(
                    "the defense could not protect the output for this request, so it is withheld; "
                    "retry later (the operator can set GATEWAY_ON_DEFENSE_ERROR=label_only)"
                ),
            )
        else:
            item.future.set_result(RequestOutput(probabilities=out.probabilities[part], labels=out.labels[part]))


#: A request still waiting this long starts watching its connection (``BatchQueue.submit``).
WATCH_AFTER_S = 0.02


def _watch(future: asyncio.Future[RequestOutput], gone: Callable[[], Awaitable[object]]) -> None:
    """From now until ``future`` settles: if the client disconnects, settle it with ``ClientDisconnected``, so
    ``_take`` skips its rows (a batch already running discards their answer)."""
    if future.done():
        return

    async def wait() -> None:
        await gone()
        if not future.done():
            future.set_exception(ClientDisconnected("the client closed the connection while its request was queued"))

    task = asyncio.ensure_future(wait())
    future.add_done_callback(lambda _: task.cancel())


def _draining() -> ServiceUnavailable:
    return ServiceUnavailable("the gateway is shutting down; retry on another replica", headers={"Retry-After": "1"})


def _stuck(seconds: float) -> ServiceUnavailable:
    return ServiceUnavailable(f"the model has not answered a batch for {seconds:.0f} s; retry on another replica",
                              headers={"Retry-After": "1"})  # fmt: skip


def _settle_error(item: _Item, exc: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(exc)
