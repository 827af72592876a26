"""The default batching backend: an in-process queue per model version, no Redis needed.

What the well-known servers' users trip over, and what this does instead:
- items, not requests, count against `max_batch_size`: a 64-input request is split across
  batches, and small requests are merged, with results put back in input order;
- the delay timer starts when the oldest waiting item arrived, so no item waits longer
  than `max_batch_delay_ms` for its batch to close;
- items whose deadline passed or whose client went away are dropped before compute;
- if ONNX Runtime fails on a batch, its requests are retried one at a time, so a poison
  input fails only its own request (service/batching/policy.py, shared with the Redis
  worker).

Inference runs in a thread (ONNX Runtime releases the GIL); one batch per model at a
time, because on a few cores concurrent runs of one model only contend for them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from service import metrics
from service.batching import policy
from service.batching.base import (
    BackendUnavailable,
    BatchingError,
    DeadlineExceeded,
    InferenceFailed,
    ModelRef,
    QueueFull,
    Scored,
)

if TYPE_CHECKING:
    from service.registry import Registry
    from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    x: np.ndarray
    future: asyncio.Future[Scored]
    arrival: float  # monotonic
    deadline: float  # monotonic
    reconstruction: bool = True
    anomaly_map: bool = False
    scores: np.ndarray | None = None
    recons: np.ndarray | None = None
    maps: np.ndarray | None = None
    remaining: int = 0
    timer: asyncio.TimerHandle | None = None

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
        if self.timer is not None:
            self.timer.cancel()


@dataclass(eq=False)
class _Chunk:
    """`count` consecutive inputs of one request, starting at `start`."""

    request: _Request
    start: int
    count: int


@dataclass(eq=False)
class _ModelQueue:
    ref: ModelRef
    chunks: deque[_Chunk] = field(default_factory=deque)
    items: int = 0
    wake: asyncio.Future[None] | None = None
    idle: bool = True
    task: asyncio.Task[None] | None = None


class EmbeddedBatcher:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.max_batch = settings.max_batch_size
        self.delay = settings.max_batch_delay_ms / 1000.0
        self.max_queue = settings.max_queue_items
        self._queues: dict[ModelRef, _ModelQueue] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._running = False

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gansentry-infer")
        self._running = True

    async def stop(self) -> None:
        self._running = False
        for q in self._queues.values():
            if q.task is not None:
                q.task.cancel()
            for chunk in q.chunks:
                chunk.request.fail(BackendUnavailable("the server is shutting down"))
            q.chunks.clear()
            q.items = 0
        tasks = [q.task for q in self._queues.values() if q.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._queues.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def ready(self) -> tuple[bool, str]:
        if not self._running:
            return False, "embedded batcher is not running"
        dead = [q.ref.key for q in self._queues.values() if q.task is not None and q.task.done()]
        if dead:
            return False, f"batching stopped for {', '.join(dead)}"
        return True, "embedded batcher running"

    def serves(self, model: ModelRef) -> bool:
        return True  # computes with this process's registry: whatever it loaded

    async def models_reloaded(self) -> None:
        return None

    async def submit(
        self,
        model: ModelRef,
        x: np.ndarray,
        deadline: float,
        reconstruction: bool = True,
        anomaly_map: bool = False,
    ) -> Scored:
        if not self._running:
            raise BackendUnavailable("the batcher is not running")
        n = len(x)
        q = self._queues.get(model)
        if q is None:
            q = self._queues[model] = _ModelQueue(model)
            q.task = asyncio.create_task(self._collect(q), name=f"batcher-{model.key}")
        if q.items + n > self.max_queue:
            metrics.REJECTED.labels(model.name, "queue_full").inc()
            raise QueueFull(
                f"{q.items} inputs already queued for {model.key} (limit {self.max_queue})",
                retry_after_s=max(1.0, self.delay * 2),
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        remaining_s = deadline - time.time()
        if remaining_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        request = _Request(
            x,
            loop.create_future(),
            now,
            now + remaining_s,
            reconstruction,
            anomaly_map,
            remaining=n,
        )
        request.timer = loop.call_later(remaining_s, self._expire, q, request)
        q.chunks.append(_Chunk(request, 0, n))
        q.items += n
        metrics.QUEUE_DEPTH.labels(model.name).set(q.items)
        if q.wake is not None and not q.wake.done() and (q.idle or q.items >= self.max_batch):
            q.wake.set_result(None)
        try:
            return await request.future
        except asyncio.CancelledError:
            self._drop(q, request)
            raise

    def _expire(self, q: _ModelQueue, request: _Request) -> None:
        if request.future.done():
            return
        metrics.EXPIRED.labels(q.ref.name).inc()
        self._drop(q, request)
        request.future.set_exception(
            DeadlineExceeded(f"no result for {q.ref.key} within the request's deadline")
        )

    def _drop(self, q: _ModelQueue, request: _Request) -> None:
        """Take a request's waiting inputs out of the queue (client gone or deadline)."""
        if request.timer is not None:
            request.timer.cancel()
        if any(c.request is request for c in q.chunks):
            kept = deque(c for c in q.chunks if c.request is not request)
            q.items = sum(c.count for c in kept)
            q.chunks = kept
            metrics.QUEUE_DEPTH.labels(q.ref.name).set(q.items)

    async def _wait(self, q: _ModelQueue, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        q.wake = loop.create_future()
        q.idle = timeout is None
        handle = loop.call_later(timeout, _resolve, q.wake) if timeout is not None else None
        try:
            await q.wake
        finally:
            if handle is not None:
                handle.cancel()
            q.wake = None

    async def _collect(self, q: _ModelQueue) -> None:
        while True:
            if q.items == 0:
                await self._wait(q, None)
                continue
            wait = q.chunks[0].request.arrival + self.delay - time.monotonic()
            if q.items < self.max_batch and wait > 0:
                await self._wait(q, wait)
                continue
            batch = self._take(q)
            if batch:
                try:
                    await self._compute(q.ref, batch)
                except asyncio.CancelledError:
                    for chunk in batch:
                        chunk.request.fail(BackendUnavailable("the server is shutting down"))
                    raise
                except Exception as e:  # never let one batch stop the model's queue
                    if not isinstance(e, BatchingError | LookupError):
                        log.exception("batch for %s failed", q.ref.key)
                        e = InferenceFailed(f"inference failed: {e}")
                    for chunk in batch:
                        chunk.request.fail(e)

    def _take(self, q: _ModelQueue) -> list[_Chunk]:
        batch: list[_Chunk] = []
        size = 0
        now = time.monotonic()
        while q.chunks and size < self.max_batch:
            chunk = q.chunks[0]
            request = chunk.request
            if request.future.done() or request.deadline <= now:
                q.chunks.popleft()
                q.items -= chunk.count
                if not request.future.done():
                    self._expire(q, request)
                continue
            take = min(chunk.count, self.max_batch - size)
            if take == chunk.count:
                q.chunks.popleft()
                batch.append(chunk)
            else:
                batch.append(_Chunk(request, chunk.start, take))
                chunk.start += take
                chunk.count -= take
            q.items -= take
            size += take
        metrics.QUEUE_DEPTH.labels(q.ref.name).set(q.items)
        for chunk in batch:
            metrics.QUEUE_WAIT.labels(q.ref.name).observe(now - chunk.request.arrival)
        return batch

    async def _compute(self, ref: ModelRef, batch: list[_Chunk]) -> None:
        model = self.registry.get(ref.name, ref.version)
        parts = [
            policy.Part(
                c.request.x[c.start : c.start + c.count],
                c.request.reconstruction,
                c.start,
                c.request.anomaly_map,
            )
            for c in batch
        ]
        loop = asyncio.get_running_loop()
        outcomes = await loop.run_in_executor(self._executor, policy.run, model, parts)
        for chunk, outcome in zip(batch, outcomes, strict=True):
            if outcome.error is not None:
                chunk.request.fail(outcome.error)
            else:
                assert outcome.scores is not None
                _deliver(chunk, outcome.scores, outcome.recons, outcome.maps)


def _deliver(
    chunk: _Chunk, scores: np.ndarray, recons: np.ndarray | None, maps: np.ndarray | None
) -> None:
    request = chunk.request
    if request.future.done():
        return
    n = len(request.x)
    if not request.reconstruction:
        recons = None
    if not request.anomaly_map:
        maps = None
    if chunk.count == n:
        if request.timer is not None:
            request.timer.cancel()
        request.future.set_result(Scored(scores, recons, maps))
        return
    if request.scores is None:
        request.scores = np.empty(n, dtype=np.float32)
        if recons is not None:
            request.recons = np.empty((n, *recons.shape[1:]), dtype=np.float32)
        if maps is not None:
            request.maps = np.empty((n, *maps.shape[1:]), dtype=np.float32)
    span = slice(chunk.start, chunk.start + chunk.count)
    request.scores[span] = scores
    if request.recons is not None and recons is not None:
        request.recons[span] = recons
    if request.maps is not None and maps is not None:
        request.maps[span] = maps
    request.remaining -= chunk.count
    if request.remaining == 0:
        if request.timer is not None:
            request.timer.cancel()
        request.future.set_result(Scored(request.scores, request.recons, request.maps))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
