"""`gansentry worker` against a real redis-server, driven through raw stream entries and
the API-side RedisBatcher: poison payloads, redelivery limits, trimmed entries, deadlines,
backpressure, and exactly-once answers when an entry is reclaimed."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from service.batching.base import (
    BackendUnavailable,
    DeadlineExceeded,
    InferenceFailed,
    ModelRef,
    QueueFull,
)
from service.batching.redis.client import RedisBatcher, connect
from service.batching.redis.protocol import (
    DLQ_STREAM,
    GROUP,
    Request,
    decode_result,
    done_key,
    encode_array,
    stream_key,
)
from service.registry import Registry
from service.settings import Settings
from tests.fixtures_redis import POISON_FEATURES, POISON_MODEL, wait_for

REF = ModelRef(POISON_MODEL, 1)
STREAM = stream_key(REF)
FAST = {"redis_claim_idle_ms": 300, "worker_heartbeat_s": 0.5, "max_batch_delay_ms": 2}


def raw_entry(reply: str, x: np.ndarray | None = None, payload: bytes | None = None) -> dict:
    rid = uuid.uuid4().hex
    if payload is None:
        assert x is not None
        return Request(rid, time.time() + 10, time.time(), reply, x).fields()
    return {
        "rid": rid,
        "deadline": repr(time.time() + 10),
        "enq": repr(time.time()),
        "reply": reply,
        "n": "1",
        "payload": payload,
    }


def sample(n: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, POISON_FEATURES), dtype=np.float32)


@pytest.fixture
def poison_models(tmp_path: Path) -> Path:
    from tests.fixtures_redis import write_poisonable_model

    root = tmp_path / "models"
    write_poisonable_model(root)
    return root


@pytest.fixture
def direct(poison_models: Path):
    settings = Settings(models_dir=poison_models, providers="cpu", intra_op_threads=1)
    return Registry(poison_models, settings).load().get(POISON_MODEL)


def test_bad_payloads_are_answered_acked_and_dead_lettered_once(
    redis_server, poison_models, start_worker
):
    worker = start_worker(redis_server.url, poison_models, "w-poison", **FAST).wait_alive()
    r = redis_server.client()
    reply = "gansentry:reply:test"
    bad = [
        raw_entry(reply, payload=b"\xc1 not msgpack"),
        raw_entry(reply, payload=msgpack.packb({"x": encode_array(np.zeros((1, 3), np.float32))})),
        raw_entry(reply, payload=msgpack.packb({"x": {"shape": [1, 6], "dtype": "float64"}})),
    ]
    good = raw_entry(reply, x=sample(2))
    for fields in [*bad, good]:
        r.xadd(STREAM, fields)
    answers = {}
    while len(answers) < 4:
        item = r.blpop([reply], timeout=10)
        assert item is not None, "the worker did not answer every entry"
        result = decode_result(item[1])
        answers[result.request_id] = result
    messages = [str(answers[b["rid"]].error) for b in bad]
    assert "not msgpack" in messages[0]
    assert "shape [1, 3], expected [n, 6]" in messages[1]
    assert "missing or malformed" in messages[2] or "dtype" in messages[2]
    assert all(isinstance(answers[b["rid"]].error, InferenceFailed) for b in bad)
    assert answers[good["rid"]].scored is not None
    # Acked and deleted; each bad one is in the dead-letter stream once, even after
    # the claim timeout has passed several times over (nothing is retried).
    time.sleep(1.0)
    assert r.xlen(STREAM) == 0
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    dlq = r.xrange(DLQ_STREAM)
    assert sorted(f[b"rid"].decode() for _, f in dlq) == sorted(b["rid"] for b in bad)
    assert {f[b"dlq_reason"] for _, f in dlq} == {b"bad_input"}
    assert r.llen(reply) == 0
    assert worker.metric("gansentry_worker_errors_total", kind="bad_input") == 3


def test_inference_failure_fails_only_the_poison_request(
    redis_server, poison_models, direct, start_worker
):
    worker = start_worker(redis_server.url, poison_models, "w-infer", **FAST).wait_alive()
    worker.process.send_signal(signal.SIGSTOP)  # let several entries queue into one batch
    r = redis_server.client()
    reply = "gansentry:reply:infer"
    xs = [sample(1 + i % 3, seed=i) for i in range(6)]
    xs[3] = xs[3].copy()
    xs[3][0, 2] = 5.0
    entries = [raw_entry(reply, x=x) for x in xs]
    for fields in entries:
        r.xadd(STREAM, fields)
    worker.process.send_signal(signal.SIGCONT)
    answers = {}
    while len(answers) < len(entries):
        item = r.blpop([reply], timeout=10)
        assert item is not None
        result = decode_result(item[1])
        answers[result.request_id] = result
    for i, (fields, x) in enumerate(zip(entries, xs, strict=True)):
        result = answers[fields["rid"]]
        if i == 3:
            assert isinstance(result.error, InferenceFailed)
            assert "Gather" in str(result.error)
        else:
            scores, recon = direct.run(x)
            np.testing.assert_allclose(result.scored.scores, scores, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(result.scored.reconstructions, recon, rtol=1e-5, atol=1e-7)
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    assert [f[b"dlq_reason"] for _, f in r.xrange(DLQ_STREAM)] == [b"inference"]
    assert worker.metric("gansentry_worker_errors_total", kind="inference") == 1


def test_entry_redelivered_too_often_is_poison(redis_server, poison_models, start_worker):
    """An entry whose workers keep dying (delivery count past the limit) is answered with
    an error and dead-lettered by the next worker instead of being run again."""
    r = redis_server.client()
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    reply = "gansentry:reply:redelivered"
    fields = raw_entry(reply, x=sample(1))
    entry_id = r.xadd(STREAM, fields)
    r.xreadgroup(GROUP, "crashed-worker", {STREAM: ">"}, count=1)
    r.xclaim(STREAM, GROUP, "crashed-worker", 0, [entry_id], retrycount=3)  # limit is 3
    worker = start_worker(redis_server.url, poison_models, "w-redeliver", **FAST).wait_alive()
    item = r.blpop([reply], timeout=10)
    assert item is not None
    result = decode_result(item[1])
    assert isinstance(result.error, InferenceFailed)
    assert "delivered 4 times" in str(result.error)
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    ((_, dead),) = r.xrange(DLQ_STREAM)
    assert dead[b"dlq_reason"] == b"poison" and dead[b"rid"].decode() == fields["rid"]
    assert worker.metric("gansentry_batch_size_count") == 0


def test_reclaimed_entries_are_answered_exactly_once(
    redis_server, poison_models, direct, start_worker
):
    """A worker that took entries and died: a live worker claims them after the idle
    timeout and answers each once; one whose answer was already delivered is acked
    without recomputing, and one trimmed from the stream is acked and skipped."""
    r = redis_server.client()
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    reply = "gansentry:reply:reclaim"
    xs = [sample(2, seed=i) for i in range(3)]
    entries = [raw_entry(reply, x=x) for x in xs]
    ids = [r.xadd(STREAM, f) for f in entries]
    r.xreadgroup(GROUP, "dead-worker", {STREAM: ">"}, count=10)
    r.set(done_key(entries[1]["rid"]), 1)  # answered before that worker died
    r.xdel(STREAM, ids[2])  # trimmed while pending
    rpush_before = r.info("commandstats").get("cmdstat_rpush", {}).get("calls", 0)
    worker = start_worker(redis_server.url, poison_models, "w-reclaim", **FAST).wait_alive()
    item = r.blpop([reply], timeout=10)
    assert item is not None
    result = decode_result(item[1])
    assert result.request_id == entries[0]["rid"]
    np.testing.assert_allclose(result.scored.scores, direct.run(xs[0])[0], rtol=1e-5)
    wait_for(lambda: r.xpending(STREAM, GROUP)["pending"] == 0, what="pending list to empty")
    time.sleep(0.5)
    assert r.llen(reply) == 0
    rpush_after = r.info("commandstats").get("cmdstat_rpush", {}).get("calls", 0)
    assert rpush_after - rpush_before == 1  # one answer pushed in all
    assert worker.metric("gansentry_reclaimed_total") >= 1
    assert worker.metric("gansentry_duplicates_skipped_total") == 1
    assert worker.metric("gansentry_worker_errors_total", kind="trimmed") == 1
    assert worker.metric("gansentry_batch_size_sum") == 2  # only entry 0 was computed


def batcher_for(redis_url: str, models: Path, **settings: object) -> RedisBatcher:
    s = Settings(models_dir=models, redis_url=redis_url, providers="cpu", **{**FAST, **settings})
    return RedisBatcher(s, Registry(models, s).load())


async def test_batcher_fails_fast_without_worker_then_scores_like_direct_runs(
    redis_server, poison_models, direct, start_worker
):
    batcher = batcher_for(redis_server.url, poison_models)
    await batcher.start()
    try:
        ok, why = await batcher.ready()
        assert not ok and "no live gansentry worker" in why
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="no live gansentry worker"):
            await batcher.submit(REF, sample(1), time.time() + 5)
        assert time.monotonic() - started < 0.1

        # a wide batching window, so a loaded machine enqueueing slowly still merges entries
        gather = {**FAST, "max_batch_delay_ms": 50}
        worker = start_worker(redis_server.url, poison_models, "w-batcher", **gather)
        await asyncio.to_thread(worker.wait_alive)
        await asyncio.sleep(1.2)  # the batcher's worker cache refreshes every second
        assert (await batcher.ready())[0]
        xs = [sample(1 + i % 4, seed=i) for i in range(24)]
        results = await asyncio.gather(*(batcher.submit(REF, x, time.time() + 5) for x in xs))
        for x, result in zip(xs, results, strict=True):
            scores, recon = direct.run(x)
            np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(result.reconstructions, recon, rtol=1e-5, atol=1e-7)
        assert worker.metric("gansentry_batch_size_sum") == sum(len(x) for x in xs)
        # several requests per ORT call: batching happened across entries
        assert worker.metric("gansentry_batch_size_count") < len(xs)

        # no reconstruction asked for: none travels back, and the scores are the same,
        # also for a request batched with one that does want them
        lean, full = await asyncio.gather(
            batcher.submit(REF, xs[1], time.time() + 5, reconstruction=False),
            batcher.submit(REF, xs[2], time.time() + 5, reconstruction=True),
        )
        assert lean.reconstructions is None
        np.testing.assert_allclose(lean.scores, results[1].scores, rtol=1e-6)
        np.testing.assert_allclose(full.reconstructions, results[2].reconstructions, rtol=1e-6)
    finally:
        await batcher.stop()


async def test_backpressure_and_deadline_with_a_paused_worker(
    redis_server, poison_models, start_worker
):
    worker = start_worker(redis_server.url, poison_models, "w-paused", worker_heartbeat_s=2)
    await asyncio.to_thread(worker.wait_alive)
    batcher = batcher_for(redis_server.url, poison_models, redis_stream_maxlen=3)
    await batcher.start()
    try:
        assert (await batcher.ready())[0]
        os.kill(worker.process.pid, signal.SIGSTOP)
        try:
            short = asyncio.ensure_future(batcher.submit(REF, sample(1), time.time() + 0.3))
            waiting = [
                asyncio.ensure_future(batcher.submit(REF, sample(1, seed=i), time.time() + 10))
                for i in range(2)
            ]
            await asyncio.sleep(0.1)
            with pytest.raises(QueueFull) as full:
                await batcher.submit(REF, sample(1), time.time() + 5)
            assert full.value.retry_after_s >= 1
            with pytest.raises(DeadlineExceeded):
                await short
        finally:
            os.kill(worker.process.pid, signal.SIGCONT)
        for result in await asyncio.gather(*waiting):
            assert result.scores.shape == (1,)
        # The expired request was dropped by the worker, not computed.
        await asyncio.to_thread(
            wait_for, lambda: worker.metric("gansentry_expired_total") == 1, 5, "expired count"
        )
        assert worker.metric("gansentry_batch_size_sum") == 2
    finally:
        await batcher.stop()


async def test_pooled_connections_recover_together_after_a_redis_restart(redis_server):
    """Every pooled connection dies with a restart; without dropping the idle ones on the
    first failure, a later burst meets them one by one (19 of 20 failed), long after
    Redis is back."""
    client = connect(redis_server.url, 64)
    try:
        await asyncio.gather(*(client.blpop(["nothing"], timeout=0.2) for _ in range(20)))
        await asyncio.to_thread(redis_server.restart, 0.2)
        with pytest.raises(RedisConnectionError):  # the first use still finds out
            await client.ping()
        answers = await asyncio.gather(*(client.ping() for _ in range(20)), return_exceptions=True)
        assert [a for a in answers if a is not True] == []
    finally:
        await client.aclose()
