"""The Redis batching backend (API side): each request becomes one entry in its model
version's stream; `gansentry worker` processes batch and compute them and push the
answer to this API process's reply list.

Why one reply list per process, read by one task, and not a BLPOP per request: a BLPOP
holds a connection for the whole wait, so N requests in flight need N connections (and
as many sockets on Redis, per API replica). One reader drains many answers per round
trip (BLPOP, then LPOP with a count), and when Redis goes away it notices at once and
fails every waiting request with 503 instead of leaving each to find out alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from service import metrics
from service.batching.base import (
    BackendUnavailable,
    DeadlineExceeded,
    ModelRef,
    QueueFull,
    Scored,
)
from service.batching.redis.protocol import (
    ENQUEUE_LUA,
    GROUP,
    RELOAD_CHANNEL,
    WORKER_KEY_PREFIX,
    Heartbeat,
    ProtocolError,
    Request,
    Result,
    decode_result,
    reply_key,
    stream_key,
)

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from service.registry import Registry
    from service.settings import Settings

log = logging.getLogger(__name__)

CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
MONITOR_INTERVAL_S = 1.0
READ_BLOCK_S = 1.0
DRAIN_COUNT = 512
POOL_SIZE = 64


def redis_location(url: str) -> str:
    """host:port/db for messages, without any password in the URL."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"


class _RestartAwarePool(aioredis.BlockingConnectionPool):
    """A Redis restart kills every pooled connection, but each idle one only finds out on
    its next use, which can be long after Redis is back, when a burst reaches deep into
    the pool (measured: 19 of 20 concurrent commands failed after one restart). So a
    connection that comes back broken takes the idle ones with it: they reconnect on use."""

    async def release(self, connection: AbstractConnection) -> None:
        await super().release(connection)
        if not connection.is_connected:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self.disconnect(inuse_connections=False)


def connect(url: str, max_connections: int) -> aioredis.Redis:
    """A client that never retries by itself: a request must not sit in a hidden retry
    loop while Redis is down. Callers retry where it is safe (see `_enqueue_once_more`)."""
    pool = _RestartAwarePool.from_url(
        url,
        max_connections=max_connections,
        timeout=2.0,
        socket_timeout=READ_BLOCK_S + 4.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis(connection_pool=pool)


class RedisBatcher:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        if not settings.redis_url:
            raise ValueError("RedisBatcher needs settings.redis_url")
        self.settings = settings
        self.registry = registry
        self.url = settings.redis_url
        self.where = redis_location(self.url)
        self.api_id = uuid.uuid4().hex[:16]
        self.reply_key = reply_key(self.api_id)
        self._pending: dict[str, asyncio.Future[Result]] = {}
        self._workers: dict[str, Heartbeat] = {}
        self._served: set[str] = set()
        self._redis: aioredis.Redis | None = None
        self._reader: aioredis.Redis | None = None
        self._enqueue: object = None
        self._tasks: list[asyncio.Task[None]] = []
        self._monitored: dict[str, str] = {}
        self._running = False
        self._background: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        """Never fails because Redis is down: the API starts, reports not-ready, and the
        background tasks connect as soon as Redis answers."""
        self._redis = connect(self.url, POOL_SIZE)
        self._reader = connect(self.url, 2)
        self._enqueue = self._redis.register_script(ENQUEUE_LUA)
        self._running = True
        await self._refresh()
        self._tasks = [
            asyncio.create_task(self._read_replies(), name="redis-replies"),
            asyncio.create_task(self._monitor(), name="redis-monitor"),
        ]

    async def stop(self) -> None:
        self._running = False
        tasks = [*self._tasks, *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        self._fail_pending(BackendUnavailable("the server is shutting down"))
        for client in (self._redis, self._reader):
            if client is not None:
                await client.aclose()
        self._redis = self._reader = None

    async def ready(self) -> tuple[bool, str]:
        if not self._running or self._redis is None:
            return False, "redis batcher is not running"
        try:
            try:
                await asyncio.wait_for(self._redis.ping(), timeout=1.0)
            except CONNECTION_ERRORS:  # a pooled connection left dead by a restart
                await asyncio.wait_for(self._redis.ping(), timeout=1.0)
        except (*CONNECTION_ERRORS, RedisError, asyncio.TimeoutError) as e:
            return False, f"redis at {self.where} unreachable: {e or type(e).__name__}"
        if not self._workers:
            return False, f"no live gansentry worker (no {WORKER_KEY_PREFIX}* key in Redis)"
        return True, f"redis at {self.where}, {len(self._workers)} worker(s) alive"

    def serves(self, model: ModelRef) -> bool:
        """A live worker advertised this version in its last heartbeat (as of the last
        refresh, at most MONITOR_INTERVAL_S old)."""
        return model.key in self._served

    async def models_reloaded(self) -> None:
        """Workers subscribed to RELOAD_CHANNEL rescan at once; each advertises the new
        versions in a heartbeat right after loading them, and `serves` (hence "latest")
        follows at the next refresh. Until then the previous version keeps serving."""
        if self._redis is None:
            return
        try:
            listeners = await self._redis.publish(RELOAD_CHANNEL, self.api_id)
            log.info("reload notice sent to %d worker(s)", listeners)
        except (*CONNECTION_ERRORS, RedisError) as e:
            log.warning("could not send the reload notice (%s); workers rescan by themselves", e)

    async def submit(
        self,
        model: ModelRef,
        x: np.ndarray,
        deadline: float,
        reconstruction: bool = True,
        anomaly_map: bool = False,
    ) -> Scored:
        if not self._running or self._redis is None:
            raise BackendUnavailable("the batcher is not running")
        now = time.time()
        if deadline <= now:
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        if not self._workers:
            metrics.REJECTED.labels(model.name, "no_worker").inc()
            raise BackendUnavailable("no live gansentry worker is connected to Redis")
        if model.key not in self._served:
            metrics.REJECTED.labels(model.name, "no_worker").inc()
            raise BackendUnavailable(
                f"no live worker serves {model.name} version {model.version}; "
                f"workers serve {sorted(self._served) or 'nothing'}"
            )
        rid = uuid.uuid4().hex
        request = Request(rid, deadline, now, self.reply_key, x, reconstruction, anomaly_map)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        stream = stream_key(model)
        self._monitored[stream] = model.name
        try:
            args: list[object] = [self.settings.redis_stream_maxlen]
            for k, v in request.fields().items():
                args += [k, v]
            try:
                entry_id = await self._enqueue_once_more(stream, args)
            except CONNECTION_ERRORS as e:
                metrics.REJECTED.labels(model.name, "redis_down").inc()
                raise BackendUnavailable(f"redis at {self.where} unreachable: {e}") from e
            if entry_id is None:
                metrics.REJECTED.labels(model.name, "queue_full").inc()
                raise QueueFull(
                    f"{self.settings.redis_stream_maxlen} requests already queued for "
                    f"{model.key} (GANSENTRY_REDIS_STREAM_MAXLEN)",
                    retry_after_s=1.0,
                )
            try:
                result = await asyncio.wait_for(future, timeout=max(deadline - time.time(), 0))
            except asyncio.TimeoutError as e:
                raise DeadlineExceeded(
                    f"no result for {model.key} within the request's deadline"
                ) from e
            except asyncio.CancelledError:
                self._withdraw(stream, entry_id)
                raise
        finally:
            self._pending.pop(rid, None)
        if result.error is not None:
            raise result.error
        assert result.scored is not None
        return result.scored

    async def _enqueue_once_more(self, stream: str, args: list[object]) -> bytes | None:
        """A Redis restart leaves every pooled connection dead, and each fails once when
        next used; one immediate retry on a fresh connection hides that. With Redis still
        down the retry fails at once (connection refused), so the request still gets its
        503 fast. Should the first attempt have reached Redis after all, the duplicate
        entry is harmless: the answer is delivered once per request id."""
        try:
            return await self._enqueue(keys=[stream], args=args)  # type: ignore[operator]
        except CONNECTION_ERRORS:
            return await self._enqueue(keys=[stream], args=args)  # type: ignore[operator]

    def _withdraw(self, stream: str, entry_id: bytes | str) -> None:
        """The client went away: delete its entry so no worker computes it. An entry a
        worker already holds is still answered (to nobody) and acknowledged; one whose
        worker died reads back empty when reclaimed and is acknowledged and skipped."""
        if self._redis is None:
            return
        task = asyncio.create_task(self._redis.xdel(stream, entry_id))
        self._background.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[object]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("could not withdraw a cancelled request: %s", task.exception())

    def _fail_pending(self, error: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_result(Result("", error=error))

    def _dispatch(self, raws: Iterable[bytes]) -> None:
        for raw in raws:
            try:
                result = decode_result(raw)
            except ProtocolError as e:
                log.error("dropping an unreadable answer: %s", e)
                continue
            future = self._pending.get(result.request_id)
            if future is None or future.done():
                log.debug("answer for %s arrived after its request ended", result.request_id)
                continue
            future.set_result(result)

    async def _read_replies(self) -> None:
        assert self._reader is not None
        backoff = 0.05
        while True:
            try:
                item = await self._reader.blpop([self.reply_key], timeout=READ_BLOCK_S)
                if item is not None:
                    self._dispatch([item[1]])
                    more = await self._reader.lpop(self.reply_key, DRAIN_COUNT)
                    if more:
                        self._dispatch(more)
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except (*CONNECTION_ERRORS, RedisError) as e:
                if self._pending:
                    log.warning(
                        "lost redis at %s (%s): failing %d waiting request(s) with 503",
                        self.where,
                        e,
                        len(self._pending),
                    )
                self._fail_pending(
                    BackendUnavailable(f"lost the connection to redis at {self.where}: {e}")
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            await self._refresh()

    async def _refresh(self) -> None:
        """Worker liveness and queue gauges, polled once a second rather than per request."""
        assert self._redis is not None
        try:
            keys = [k async for k in self._redis.scan_iter(f"{WORKER_KEY_PREFIX}*", count=1000)]
            values = await self._redis.mget(keys) if keys else []
            workers: dict[str, Heartbeat] = {}
            for value in values:
                if value is None:
                    continue
                try:
                    beat = Heartbeat.decode(value)
                except ProtocolError as e:
                    log.warning("ignoring a worker heartbeat: %s", e)
                    continue
                workers[beat.name] = beat
            self._workers = workers
            self._served = {m for w in workers.values() for m in w.models}
            metrics.WORKERS_ALIVE.set(len(workers))
            await self._queue_gauges()
        except asyncio.CancelledError:
            raise
        except (*CONNECTION_ERRORS, RedisError) as e:
            if self._workers:
                log.warning("redis at %s unreachable: %s", self.where, e)
            self._workers, self._served = {}, set()
            metrics.WORKERS_ALIVE.set(0)

    async def _queue_gauges(self) -> None:
        assert self._redis is not None
        streams = {stream_key(m.ref): m.ref.name for m in self.registry.all()}
        for stream, name in self._monitored.items():
            streams.setdefault(stream, name)
        if not streams:
            return
        pipe = self._redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xlen(stream)
            pipe.xpending(stream, GROUP)
        replies = await pipe.execute(raise_on_error=False)
        depth: dict[str, int] = {}
        pending: dict[str, int] = {}
        for i, (_stream, name) in enumerate(streams.items()):
            length, summary = replies[2 * i], replies[2 * i + 1]
            length = length if isinstance(length, int) else 0
            in_flight = summary.get("pending", 0) if isinstance(summary, dict) else 0
            depth[name] = depth.get(name, 0) + max(length - in_flight, 0)
            pending[name] = pending.get(name, 0) + in_flight
        for name in depth:
            metrics.QUEUE_DEPTH.labels(name).set(depth[name])
            metrics.QUEUE_PENDING.labels(name).set(pending[name])
