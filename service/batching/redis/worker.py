"""`gansentry worker`: takes requests from the Redis streams of the models it serves,
batches them, runs ONNX Runtime and answers each request exactly once.

A worker is stateless: everything it has not acknowledged stays pending in Redis, so a
worker killed mid-batch loses nothing. Another worker claims its entries once they have
been idle for `redis_claim_idle_ms` (XAUTOCLAIM); an entry delivered more than
`redis_max_deliveries` times is treated as poison (it keeps killing workers), answered
with an error and moved to the dead-letter stream instead of being tried again.

The loop is synchronous on purpose: reading, computing and answering one batch at a time
leaves nothing half-done in memory when SIGTERM arrives, and entries that arrive while a
batch computes simply wait in the stream and form the next batch. Heartbeats run in a
thread so a long batch does not make the worker look dead.

Reloads run in a thread too, so a worker keeps answering while it loads a new version:
on SIGHUP, on a reload notice the API publishes after its own reload (RELOAD_CHANNEL),
and every RELOAD_INTERVAL_S in case a notice was missed. The heartbeat advertises the
new version as soon as it is loaded, and the API routes "latest" to it only then."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import redis
from prometheus_client import start_http_server
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from service import metrics
from service.batching import policy
from service.batching.base import ModelRef
from service.batching.redis.protocol import (
    BAD_INPUT,
    DEADLINE,
    DELIVER_LUA,
    DLQ_STREAM,
    GROUP,
    INFERENCE,
    POISON,
    RELOAD_CHANNEL,
    Envelope,
    Heartbeat,
    ProtocolError,
    Request,
    decode_envelope,
    decode_request,
    done_key,
    encode_error,
    encode_result,
    model_of_stream,
    stream_key,
    worker_key,
)
from service.gc_tuning import settle_after_startup
from service.registry import LoadedModel, Registry, publish_model_info
from service.settings import Settings

log = logging.getLogger("gansentry.worker")

CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
READ_BLOCK_MS = 200
RELOAD_INTERVAL_S = 30.0
DLQ_MAXLEN = 10_000


@dataclass
class Entry:
    """One stream entry as delivered to this worker."""

    stream: str
    model: ModelRef
    entry_id: str
    fields: dict[bytes, bytes] | None  # None: trimmed from the stream while pending
    received: float
    reclaimed: bool = False
    deliveries: int = 1


@dataclass
class Job:
    entry: Entry
    request: Request
    model: LoadedModel  # resolved once: a reload may drop the version while it computes


@dataclass
class Answer:
    entry: Entry
    envelope: Envelope | None  # None: nobody to answer, acknowledge only
    body: bytes  # b"": acknowledge only
    expired: bool = False  # a deadline error: counted as expired only if delivered


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=READ_BLOCK_MS / 1000 + 5.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )


class Worker:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        if not settings.redis_url:
            raise ValueError("a worker needs settings.redis_url")
        self.settings = settings
        self.registry = registry
        self.name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
        self.max_batch = settings.max_batch_size
        self.delay = settings.max_batch_delay_ms / 1000.0
        self.redis = redis_client(settings.redis_url)
        self._deliver = self.redis.register_script(DELIVER_LUA)
        self._stop = threading.Event()
        self._beat_now = threading.Event()
        self._reload_now = threading.Event()
        self._reload_why = "periodic"
        self._groups_ready = False
        self._claim_idle_s = settings.redis_claim_idle_ms / 1000.0
        self._claim_every = min(self._claim_idle_s / 2, 1.0)
        self._last_claim = 0.0
        self._started_at = time.time()
        self._threads = [
            threading.Thread(target=self._beat, name="heartbeat", daemon=True),
            threading.Thread(target=self._reloads, name="reload", daemon=True),
            threading.Thread(target=self._listen, name="reload-notices", daemon=True),
        ]

    # --- lifecycle

    def stop(self) -> None:
        """Finish the current batch, answer and acknowledge it, then return from run()."""
        self._stop.set()
        self._beat_now.set()
        self._reload_now.set()

    def request_reload(self, why: str) -> None:
        """Rescan the model repository in the reload thread. Safe in a signal handler: it
        only sets an event (the reload thread does the logging)."""
        self._reload_why = why
        self._reload_now.set()

    def run(self) -> int:
        publish_model_info(self.registry)
        for thread in self._threads:
            thread.start()
        log.info(
            "worker %s serving %s from redis, batches of up to %d items within %g ms",
            self.name,
            ", ".join(f"{m.ref.key} ({m.provider})" for m in self.registry.all()),
            self.max_batch,
            self.settings.max_batch_delay_ms,
        )
        backoff = 0.1
        down = False
        while not self._stop.is_set():
            try:
                if not self._groups_ready:
                    self._ensure_groups()
                entries = self._reclaim() if self._claim_due() else []
                entries += self._read()
                if entries:
                    self._process(entries)
                if down:
                    log.info("worker %s reconnected to redis", self.name)
                    self._beat_now.set()  # a restarted Redis lost the heartbeat key
                down, backoff = False, 0.1
            except CONNECTION_ERRORS as e:
                if not down:
                    log.warning("redis unreachable (%s); retrying", e)
                down, self._groups_ready = True, False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            except ResponseError as e:
                # NOGROUP: Redis restarted without persistence and lost the groups.
                if "NOGROUP" not in str(e):
                    log.exception("redis refused a command")
                    self._stop.wait(backoff)
                self._groups_ready = False
            except Exception:
                # Keep serving: entries in hand stay pending, are claimed again after
                # the idle timeout, and become poison if they keep failing.
                log.exception("worker loop failed; continuing")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        for thread in self._threads:
            thread.join(timeout=5)
        log.info("worker %s stopped", self.name)
        return 0

    def _streams(self) -> dict[str, LoadedModel]:
        return {stream_key(m.ref): m for m in self.registry.all()}

    def _ensure_groups(self) -> None:
        for stream in self._streams():
            try:
                # From id 0: requests queued before any worker (re)created the group are
                # still served. Answered entries are deleted, so 0 re-reads nothing old.
                self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._groups_ready = True

    # --- reloads

    def _reloads(self) -> None:
        """The reload thread: the main loop keeps reading and computing while a new
        version loads (and runs its test inference)."""
        while True:
            asked = self._reload_now.wait(RELOAD_INTERVAL_S)
            if self._stop.is_set():
                return
            self._reload_now.clear()
            why = self._reload_why if asked else "periodic"
            self._reload_why = "periodic"
            if why != "periodic":
                log.info("%s: reloading models from %s", why, self.settings.models_dir)
            try:
                self._reload()
            except Exception:
                log.exception("reloading the model repository failed; the loaded models serve")

    def _reload(self) -> None:
        """Registry.reload logs what it serves and what it refused."""
        before = set(self._streams())
        self.registry.reload()
        after = set(self._streams())
        if after != before:
            publish_model_info(self.registry)
            # Groups before the heartbeat: once the API sees the new version it queues
            # to it. (Entries queued before the group exists are read anyway: id 0.)
            try:
                self._ensure_groups()
            except (*CONNECTION_ERRORS, ResponseError):
                self._groups_ready = False  # the main loop retries
            self._beat_now.set()

    def _listen(self) -> None:
        """Reload notices from the API. After a lost connection the worker rescans at
        once: a notice sent meanwhile is gone (pub/sub keeps nothing)."""
        backoff, missed = 0.1, False
        while not self._stop.is_set():
            client = redis_client(self.settings.redis_url or "")
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(RELOAD_CHANNEL)
                if missed:
                    self.request_reload("reconnected to redis")
                backoff = 0.1
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=READ_BLOCK_MS / 1000) is not None:
                        self.request_reload("reload notice")
            except CONNECTION_ERRORS:
                missed = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    pubsub.close()
                client.close()

    def _beat(self) -> None:
        client = redis_client(self.settings.redis_url or "")
        key = worker_key(self.name)
        ttl_ms = int(self.settings.worker_heartbeat_s * 3000)
        while not self._stop.is_set():
            beat = Heartbeat(
                name=self.name,
                pid=os.getpid(),
                host=socket.gethostname(),
                models={m.ref.key: m.provider for m in self.registry.all()},
                started_at=self._started_at,
            )
            try:
                client.set(key, beat.encode(), px=ttl_ms)
                metrics.WORKER_HEARTBEAT.set(beat.beat_at)
                wait = self.settings.worker_heartbeat_s
            except CONNECTION_ERRORS:
                wait = min(0.25, self.settings.worker_heartbeat_s)
            self._beat_now.wait(wait)
            self._beat_now.clear()
        with contextlib.suppress(*CONNECTION_ERRORS):
            client.delete(key)
        client.close()

    # --- taking entries

    def _entries(self, reply: list | None, reclaimed: bool = False) -> list[Entry]:
        now = time.time()
        out: list[Entry] = []
        for stream, items in reply or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            model = model_of_stream(name)
            for entry_id, fields in items:
                if entry_id is None:
                    continue
                eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                out.append(Entry(name, model, eid, fields or None, now, reclaimed))
        return out

    def _read(self) -> list[Entry]:
        """Up to max_batch_size items (not entries) per model, gathered until
        max_batch_delay_ms after the first request was queued."""
        streams = {s: ">" for s in self._streams()}
        if not streams:
            self._stop.wait(READ_BLOCK_MS / 1000)
            return []
        first = self.redis.xreadgroup(
            GROUP, self.name, streams, count=self.max_batch, block=READ_BLOCK_MS
        )
        entries = self._entries(first)
        if not entries or self.delay <= 0:
            return entries
        oldest = min(_enqueued_at(e) for e in entries)
        close_at = min(oldest, entries[0].received) + self.delay
        while not self._stop.is_set():
            biggest = max(_items_by_model(entries).values())
            remaining = close_at - time.time()
            if biggest >= self.max_batch or remaining <= 0:
                break
            # Polled, not BLOCKed: Redis times out blocked reads only on its cron tick
            # (every 100 ms at the default hz 10), far coarser than a few-ms batch delay.
            more = self.redis.xreadgroup(GROUP, self.name, streams, count=self.max_batch - biggest)
            new = self._entries(more)
            if new:
                entries += new
                continue
            time.sleep(min(remaining, max(0.0005, min(remaining / 8, 0.01))))
        return entries

    def _claim_due(self) -> bool:
        if time.monotonic() - self._last_claim < self._claim_every:
            return False
        self._last_claim = time.monotonic()
        return True

    def _reclaim(self) -> list[Entry]:
        """Entries another worker took and never acknowledged (it died or hangs)."""
        out: list[Entry] = []
        for stream in self._streams():
            reply = self.redis.xautoclaim(
                stream,
                GROUP,
                self.name,
                min_idle_time=self.settings.redis_claim_idle_ms,
                start_id="0-0",
                count=self.max_batch,
            )
            claimed = self._entries([(stream, reply[1])], reclaimed=True)
            label = model_of_stream(stream).name
            gone = len(reply[2]) if len(reply) > 2 else 0  # Redis 7 reports deleted IDs
            if not claimed and not any(i is None for i, _ in reply[1]):
                if gone:
                    metrics.WORKER_ERRORS.labels(label, "trimmed").inc(gone)
                continue
            mine = {
                _text(p["message_id"]): int(p["times_delivered"])
                for p in self.redis.xpending_range(
                    stream, GROUP, min="-", max="+", count=10_000, consumername=self.name
                )
            }
            for entry in claimed:
                entry.deliveries = mine.get(entry.entry_id, 2)
            # Redis 6.2 returns entries trimmed while pending as nil without their ID: they
            # stay in this worker's pending list with no payload. Acknowledge them.
            known = {e.entry_id for e in claimed}
            for eid in mine:
                if eid not in known and not self.redis.xrange(stream, eid, eid, count=1):
                    gone += 1
                    self.redis.xack(stream, GROUP, eid)
            if gone:
                metrics.WORKER_ERRORS.labels(label, "trimmed").inc(gone)
            if claimed:
                metrics.RECLAIMED.labels(label).inc(len(claimed))
                log.warning("reclaimed %d idle entries from %s", len(claimed), stream)
            out += claimed
        return out

    # --- answering

    def _process(self, entries: list[Entry]) -> None:
        now = time.time()
        answers: list[Answer] = []
        dead: list[tuple[Entry, str, str]] = []
        jobs: dict[ModelRef, list[Job]] = defaultdict(list)
        # Another worker may have answered an entry this one took: one it reclaimed, or one
        # it held past the claim timeout (it was slow, or stopped with SIGSTOP), which
        # another worker could claim meanwhile. Those are acknowledged, not recomputed.
        held_long = now - self._claim_idle_s / 2
        already = self._already_answered(
            [e for e in entries if e.fields and (e.reclaimed or e.received <= held_long)]
        )
        for entry in entries:
            label = entry.model.name
            if entry.fields is None:
                metrics.WORKER_ERRORS.labels(label, "trimmed").inc()
                answers.append(Answer(entry, None, b""))
                continue
            try:
                env = decode_envelope(entry.fields)
            except ProtocolError as e:
                metrics.WORKER_ERRORS.labels(label, BAD_INPUT).inc()
                dead.append((entry, BAD_INPUT, str(e)))
                answers.append(Answer(entry, None, b""))
                continue
            if env.request_id in already:
                metrics.DUPLICATES.labels(label).inc()
                answers.append(Answer(entry, env, b""))
                continue
            if entry.deliveries > self.settings.redis_max_deliveries:
                message = (
                    f"request delivered {entry.deliveries} times without an answer "
                    f"(limit {self.settings.redis_max_deliveries}); it may crash workers"
                )
                metrics.WORKER_ERRORS.labels(label, POISON).inc()
                dead.append((entry, POISON, message))
                answers.append(Answer(entry, env, encode_error(env.request_id, POISON, message)))
                continue
            if env.deadline <= now:
                message = "deadline passed while queued; not computed"
                body = encode_error(env.request_id, DEADLINE, message)
                answers.append(Answer(entry, env, body, expired=True))
                continue
            try:
                model = self.registry.get(entry.model.name, entry.model.version)
                request = decode_request(entry.fields, model.sample_shape)
            except (ProtocolError, LookupError) as e:
                metrics.WORKER_ERRORS.labels(label, BAD_INPUT).inc()
                dead.append((entry, BAD_INPUT, str(e)))
                answers.append(Answer(entry, env, encode_error(env.request_id, BAD_INPUT, str(e))))
                continue
            jobs[entry.model].append(Job(entry, request, model))
        self._dead_letter(dead)
        self._send(answers)
        for model_jobs in jobs.values():
            model = model_jobs[0].model
            for chunk in policy.pack(model_jobs, _size, self.max_batch):
                self._send(self._compute(model, chunk))

    def _already_answered(self, entries: list[Entry]) -> set[str]:
        rids = []
        for entry in entries:
            try:
                rids.append(decode_envelope(entry.fields or {}).request_id)
            except ProtocolError:
                continue
        if not rids:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for rid in rids:
            pipe.exists(done_key(rid))
        return {rid for rid, found in zip(rids, pipe.execute(), strict=True) if found}

    def _compute(self, model: LoadedModel, chunk: list[Job]) -> list[Answer]:
        started = time.time()
        for job in chunk:
            metrics.QUEUE_WAIT.labels(model.ref.name).observe(
                max(started - job.request.enqueued_at, 0)
            )
        # A worker whose copy of the model has no maps answers without them, and the API
        # says so, rather than failing the batch in ONNX Runtime.
        maps = model.has_anomaly_map
        parts = [
            policy.Part(
                j.request.x,
                j.request.want_reconstruction,
                anomaly_map=maps and j.request.want_anomaly_map,
            )
            for j in chunk
        ]
        answers = []
        for job, outcome in zip(chunk, policy.run(model, parts), strict=True):
            rid = job.request.request_id
            if outcome.error is not None:
                answers.append(self._failed(model, job, outcome.error))
                continue
            assert outcome.scores is not None
            body = encode_result(rid, outcome.scores, outcome.recons, outcome.maps)
            answers.append(Answer(job.entry, _envelope(job.request), body))
        return answers

    def _failed(self, model: LoadedModel, job: Job, error: Exception) -> Answer:
        message = str(error)
        log.warning("request %s for %s failed: %s", job.request.request_id, model.ref.key, error)
        self._dead_letter([(job.entry, INFERENCE, message)])
        return Answer(
            job.entry,
            _envelope(job.request),
            encode_error(job.request.request_id, INFERENCE, message),
        )

    def _send(self, answers: list[Answer]) -> None:
        by_stream: dict[str, list[Answer]] = defaultdict(list)
        for a in answers:
            by_stream[a.entry.stream].append(a)
        for stream, group in by_stream.items():
            keys = [stream]
            args: list[object] = [GROUP, self.settings.redis_result_ttl_s]
            for a in group:
                rid = a.envelope.request_id if a.envelope else f"unanswerable-{a.entry.entry_id}"
                reply = a.envelope.reply_to if a.envelope else f"{stream}:unanswerable"
                keys += [done_key(rid), reply]
                args += [a.entry.entry_id, a.body if a.envelope else b""]
            delivered = self._deliver(keys=keys, args=args)
            for a, flag in zip(group, delivered, strict=True):
                if not (a.envelope and a.body):
                    continue  # acknowledge only
                label = a.entry.model.name
                if not flag:  # another worker answered this request first
                    metrics.DUPLICATES.labels(label).inc()
                elif a.expired:
                    metrics.EXPIRED.labels(label).inc()

    def _dead_letter(self, dead: list[tuple[Entry, str, str]]) -> None:
        if not dead:
            return
        pipe = self.redis.pipeline(transaction=False)
        for entry, reason, message in dead:
            fields: dict[str | bytes, bytes | str | int] = dict(entry.fields or {})
            fields.update(
                {
                    "dlq_stream": entry.stream,
                    "dlq_entry_id": entry.entry_id,
                    "dlq_reason": reason,
                    "dlq_message": message,
                    "dlq_deliveries": entry.deliveries,
                    "dlq_worker": self.name,
                    "dlq_at": repr(time.time()),
                }
            )
            pipe.xadd(DLQ_STREAM, fields, maxlen=DLQ_MAXLEN, approximate=True)
        pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _envelope(r: Request) -> Envelope:
    return Envelope(r.request_id, r.reply_to, r.deadline, r.enqueued_at)


def _enqueued_at(entry: Entry) -> float:
    try:
        return float((entry.fields or {}).get(b"enq", b"") or entry.received)
    except ValueError:
        return entry.received


def _size(job: Job) -> int:
    return job.request.n


def _items_by_model(entries: list[Entry]) -> dict[ModelRef, int]:
    """Items per model, read from the payload shape without decoding the arrays."""
    counts: dict[ModelRef, int] = defaultdict(int)
    for e in entries:
        counts[e.model] += _item_count(e)
    return counts


def _item_count(entry: Entry) -> int:
    raw = (entry.fields or {}).get(b"n")
    try:
        return max(int(raw), 1) if raw is not None else 1
    except ValueError:
        return 1


# --- command line


def run_worker(settings: Settings) -> int:
    """Load the models, serve /metrics, run until SIGTERM/SIGINT; 0 on a clean stop."""
    from gansentry.cli import CliError
    from service.providers import ProviderError

    try:
        registry = Registry(settings.models_dir, settings).load()
    except ProviderError as e:
        raise CliError(str(e)) from e
    if not registry.all():
        problems = "; ".join(f"{k}: {v}" for k, v in registry.errors.items())
        raise CliError(
            f"no loadable model in {settings.models_dir}" + (f" ({problems})" if problems else "")
        )
    worker = Worker(settings, registry)
    settle_after_startup()
    if settings.worker_metrics_port:
        try:
            start_http_server(settings.worker_metrics_port, addr=settings.host)
        except OSError as e:
            raise CliError(f"--metrics-port {settings.worker_metrics_port}: {e}") from e
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    signal.signal(signal.SIGHUP, lambda *_: worker.request_reload("SIGHUP"))
    return worker.run()


if __name__ == "__main__":
    from gansentry.cli import main

    sys.exit(main(["worker", *sys.argv[1:]]))
