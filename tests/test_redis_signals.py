"""Signals to real `gansentry worker` subprocesses against a real redis-server: SIGHUP
reloads the model repository (the worker keeps running), a reload notice from the API does
the same, and a worker stopped with SIGSTOP while holding entries that another worker then
answered neither answers them again nor counts them as expired when it resumes."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import redis

from service.batching.base import ModelRef
from service.batching.redis.protocol import (
    GROUP,
    RELOAD_CHANNEL,
    Request,
    decode_result,
    stream_key,
    worker_key,
)
from service.registry import Registry
from service.settings import Settings
from tests.fixtures_models import IMAGE_MODEL, ModelRepo, add_version
from tests.fixtures_redis import POISON_FEATURES, POISON_MODEL, wait_for

FAST = {"redis_claim_idle_ms": 300, "worker_heartbeat_s": 0.5, "max_batch_delay_ms": 2}


def advertised(r: redis.Redis, name: str) -> set[str]:
    raw = r.get(worker_key(name))
    return set(json.loads(raw)["models"]) if raw else set()


def score_once(r: redis.Redis, ref: ModelRef, x: np.ndarray, timeout: float = 10.0):  # noqa: ANN201
    reply = f"gansentry:reply:{uuid.uuid4().hex}"
    request = Request(uuid.uuid4().hex, time.time() + timeout, time.time(), reply, x, False)
    r.xadd(stream_key(ref), request.fields())
    item = r.blpop([reply], timeout=timeout)
    assert item is not None, f"no answer from {ref.key}"
    return decode_result(item[1])


def direct_scores(models: Path, name: str, version: int, x: np.ndarray) -> np.ndarray:
    settings = Settings(models_dir=models, providers="cpu", intra_op_threads=1)
    return Registry(models, settings).load().get(name, version).run(x, False)[0]


def test_sighup_and_reload_notices_reload_a_worker(
    redis_server, mutable_repo: ModelRepo, start_worker
) -> None:
    """SIGHUP used to kill a worker (no handler). Now it rescans at once, well inside the
    periodic rescan's 30 s, and keeps serving; so does a notice on RELOAD_CHANNEL."""
    root = mutable_repo.root
    worker = start_worker(redis_server.url, root, "w-hup", **FAST).wait_alive()
    r = redis_server.client()
    assert advertised(r, "w-hup") == {f"{IMAGE_MODEL}:1", f"{IMAGE_MODEL}:2", "traffic:1"}
    x = np.random.default_rng(3).random((2, 1, 32, 32), dtype=np.float32)

    add_version(root, IMAGE_MODEL, 1, 3)
    worker.process.send_signal(signal.SIGHUP)
    wait_for(lambda: f"{IMAGE_MODEL}:3" in advertised(r, "w-hup"), 15, "digits:3 after SIGHUP")
    assert worker.process.poll() is None, "SIGHUP stopped the worker"
    result = score_once(r, ModelRef(IMAGE_MODEL, 3), x)
    np.testing.assert_allclose(
        result.scored.scores, direct_scores(root, IMAGE_MODEL, 1, x), rtol=1e-5, atol=1e-7
    )

    add_version(root, IMAGE_MODEL, 2, 4)
    assert r.publish(RELOAD_CHANNEL, "test") == 1  # the worker is subscribed
    wait_for(lambda: f"{IMAGE_MODEL}:4" in advertised(r, "w-hup"), 15, "digits:4 after a notice")
    result = score_once(r, ModelRef(IMAGE_MODEL, 4), x)
    np.testing.assert_allclose(
        result.scored.scores, direct_scores(root, IMAGE_MODEL, 2, x), rtol=1e-5, atol=1e-7
    )
    assert worker.metric("gansentry_model_info", model=IMAGE_MODEL, version="4") == 1
    log = worker.log.read_text()
    assert "SIGHUP: reloading models" in log and "reload notice: reloading models" in log
    assert worker.stop() == 0, "the worker did not stop cleanly after the reloads"


def test_resumed_sigstopped_worker_counts_no_expiry_for_entries_answered_by_another(
    redis_server, start_worker, tmp_path: Path
) -> None:
    """The victim takes every entry and is frozen (SIGSTOP) while it gathers its batch; the
    rescuer claims the entries after the idle timeout and answers them. The victim resumes
    after their deadlines: it must acknowledge them as answered by someone else
    (duplicates skipped), not answer them again and not count them in
    gansentry_expired_total, which it did before."""
    from tests.fixtures_redis import write_poisonable_model

    models = tmp_path / "models"
    write_poisonable_model(models)
    ref = ModelRef(POISON_MODEL, 1)
    stream = stream_key(ref)
    r = redis_server.client()
    victim = start_worker(
        redis_server.url, models, "victim", **{**FAST, "max_batch_delay_ms": 3000}
    ).wait_alive()
    rescuer = start_worker(redis_server.url, models, "rescuer", **FAST).wait_alive()
    os.kill(rescuer.process.pid, signal.SIGSTOP)
    # A read the rescuer had blocked in Redis when it froze would still take an entry; it
    # times out after READ_BLOCK_MS (200 ms) plus Redis's 100 ms timer tick.
    time.sleep(0.6)
    try:
        reply = "gansentry:reply:sigstop"
        xs = [np.random.default_rng(i).random((1, POISON_FEATURES), np.float32) for i in range(6)]
        deadline = time.time() + 2.5
        rids = []
        for x in xs:
            request = Request(uuid.uuid4().hex, deadline, time.time(), reply, x, False)
            rids.append(request.request_id)
            r.xadd(stream, request.fields())
        wait_for(
            lambda: len(r.xpending_range(stream, GROUP, "-", "+", 100, "victim")) == len(xs),
            5,
            "the victim to hold every entry",
        )
        os.kill(victim.process.pid, signal.SIGSTOP)
    finally:
        os.kill(rescuer.process.pid, signal.SIGCONT)
    try:
        answers = {}
        for _ in xs:
            item = r.blpop([reply], timeout=10)
            assert item is not None, "the rescuer did not answer every entry"
            result = decode_result(item[1])
            answers[result.request_id] = result
        assert sorted(answers) == sorted(rids)
        for rid, x in zip(rids, xs, strict=True):
            want = direct_scores(models, POISON_MODEL, 1, x)
            np.testing.assert_allclose(answers[rid].scored.scores, want, rtol=1e-5, atol=1e-7)
        assert rescuer.metric("gansentry_reclaimed_total") == len(xs)
        time.sleep(max(deadline - time.time(), 0) + 0.3)  # every deadline has passed
    finally:
        os.kill(victim.process.pid, signal.SIGCONT)
    handled = wait_for(
        lambda: (
            victim.metric("gansentry_expired_total")
            + victim.metric("gansentry_duplicates_skipped_total")
            >= len(xs)
        ),
        10,
        "the resumed victim to handle its entries",
    )
    assert handled
    assert victim.metric("gansentry_expired_total") == 0
    assert victim.metric("gansentry_duplicates_skipped_total") == len(xs)
    assert victim.metric("gansentry_batch_size_count") == 0, "answered entries were recomputed"
    time.sleep(0.3)
    assert r.llen(reply) == 0, "an entry was answered twice"
    assert r.xlen(stream) == 0 and r.xpending(stream, GROUP)["pending"] == 0
    assert victim.process.poll() is None and rescuer.process.poll() is None
