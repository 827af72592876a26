"""One behavioural suite for every batching backend in `service.batching.BACKENDS`, over
real HTTP against `gansentry serve` subprocesses (and, for `redis`, a real redis-server
and `gansentry worker` subprocesses): answers in input order with the scores ONNX Runtime
gives directly, requests larger than a batch, deadlines (504), clients that hang up,
poison inputs, backpressure (503 with Retry-After) and a reload under load.

A new backend needs one branch in `Deployment.__init__` (whatever it must start beside
the API) and then runs every test here. What only one backend can do wrong (a killed
worker, a Redis restart, a paused worker) is tested in that backend's own modules."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service.batching import BACKENDS, create_batcher
from service.registry import Registry
from service.settings import Settings
from tests.fixtures_models import IMAGE_MODEL, ModelRepo, add_version
from tests.fixtures_redis import (
    MAPPED_MODEL,
    POISON_FEATURES,
    POISON_MODEL,
    ApiProcess,
    RedisServer,
    WorkerProcess,
    metric_sum,
)

# Quick failure detection for the Redis backend; harmless for the others.
FAST = {"redis_claim_idle_ms": 500, "worker_heartbeat_s": 0.5}
# Requests wait for company for a whole second unless a batch fills, so a queue, a deadline
# or a hang-up can be set up at leisure, the same way for every backend.
HOLD_MS = 1000


class Deployment:
    """An API, and whatever its backend needs beside it, serving `models`."""

    def __init__(self, backend: str, models: Path, root: Path, **settings: object) -> None:
        self.backend = backend
        self.models = models
        self.redis: RedisServer | None = None
        self.workers: list[WorkerProcess] = []
        settings = {**FAST, **settings}
        if backend == "embedded":
            pass
        elif backend == "redis":
            self.redis = RedisServer(root / "redis").start()
            self.workers = [
                WorkerProcess(self.redis.url, models, f"{root.name}-w{i}", root, **settings)
                for i in range(2)
            ]
            settings["redis_url"] = self.redis.url
        else:
            pytest.fail(f"no deployment for batching backend {backend!r}: add it here")
        self.api = ApiProcess(models, root, batching=backend, **settings)
        try:
            for w in self.workers:
                w.wait_alive()
            self.api.wait_up().wait_ready()
        except BaseException:
            self.stop()
            raise

    def computed(self, model: str) -> float:
        """Inputs run through ONNX Runtime for `model`, wherever this backend runs them."""
        if self.workers:
            return sum(w.metric("gansentry_batch_size_sum", model=model) for w in self.workers)
        return self.api_metric("gansentry_batch_size_sum", model=model)

    def api_metric(self, name: str, **labels: str) -> float:
        return metric_sum(httpx.get(f"{self.api.url}/metrics").text, name, **labels)

    def stop(self) -> None:
        self.api.stop()
        for w in self.workers:
            w.stop()
        if self.redis is not None:
            self.redis.stop()


def test_the_backend_is_the_setting_else_what_the_redis_url_implies(
    model_repo: ModelRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("GANSENTRY_BATCHING", "GANSENTRY_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    url = "redis://127.0.0.1:1/0"  # never connected to: the batchers are not started

    def chosen(**settings: object) -> str:
        s = Settings(_env_file=None, models_dir=model_repo.root, **settings)  # type: ignore[call-arg]
        return type(create_batcher(s, Registry(model_repo.root, s))).__name__

    assert chosen() == "EmbeddedBatcher"
    assert chosen(redis_url=url) == "RedisBatcher"
    assert chosen(batching="embedded", redis_url=url) == "EmbeddedBatcher"
    assert chosen(batching="redis", redis_url=url) == "RedisBatcher"
    monkeypatch.setenv("GANSENTRY_BATCHING", "redis")
    with pytest.raises(ValidationError, match="GANSENTRY_BATCHING=redis needs GANSENTRY_REDIS"):
        Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def quick(
    backend: str, redis_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """Small batches, a short wait for company: for ordering, splitting and poison."""
    d = Deployment(
        backend,
        redis_models,
        tmp_path_factory.mktemp(f"quick-{backend}"),
        max_batch_size=8,
        max_batch_delay_ms=30,
    )
    yield d
    d.stop()


@pytest.fixture(scope="module")
def holding(
    backend: str, redis_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """Batches that never fill, held HOLD_MS, and a queue bound of two 3-input requests
    (inputs for the embedded queue, entries for a Redis stream)."""
    d = Deployment(
        backend,
        redis_models,
        tmp_path_factory.mktemp(f"holding-{backend}"),
        max_batch_size=256,
        max_batch_delay_ms=HOLD_MS,
        max_queue_items=6,
        redis_stream_maxlen=2,
    )
    yield d
    d.stop()


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 32, 32), dtype=np.float32)


def body(model: str, x: np.ndarray, **extra: object) -> dict:
    return {"model": model, "inputs": [{"array": a.tolist()} for a in x], **extra}


def scores(answer: httpx.Response) -> list[float]:
    assert answer.status_code == 200, answer.text
    return [r["score"] for r in answer.json()["results"]]


def direct(models: Path, name: str, x: np.ndarray, version: int | None = None) -> np.ndarray:
    settings = Settings(models_dir=models, providers="cpu", intra_op_threads=1)
    return Registry(models, settings).load().get(name, version).run(x, False)[0]


async def post_all(url: str, bodies: list[dict], timeout: float = 30) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        return await asyncio.gather(*(client.post("/score", json=b) for b in bodies))


async def test_concurrent_requests_answer_in_order_like_onnx_runtime(quick: Deployment) -> None:
    xs = [images(1 + i % 3, seed=i) for i in range(30)]
    rows = np.random.default_rng(1).random((12, POISON_FEATURES), dtype=np.float32)
    bodies = [body(IMAGE_MODEL, x) for x in xs] + [
        body(POISON_MODEL, rows[i : i + 3]) for i in range(0, 12, 3)
    ]
    computed0 = quick.computed(IMAGE_MODEL)
    answers = await post_all(quick.api.url, bodies)
    got = [s for a in answers[:30] for s in scores(a)]
    want = direct(quick.models, IMAGE_MODEL, np.concatenate(xs))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    tabular = [s for a in answers[30:] for s in scores(a)]
    np.testing.assert_allclose(tabular, direct(quick.models, POISON_MODEL, rows), rtol=1e-5)
    assert quick.computed(IMAGE_MODEL) - computed0 == sum(len(x) for x in xs)


async def test_anomaly_maps_go_only_to_the_requests_that_ask(quick: Deployment) -> None:
    """Requests with and without maps batched together, one larger than a batch: each
    gets what it asked for, in input order, equal to ONNX Runtime's own maps."""
    xs = [images(n, seed=40 + i) for i, n in enumerate((1, 2, 11, 3, 1, 20))]
    asks = [i % 2 == 0 for i in range(len(xs))]
    bodies = [
        body(MAPPED_MODEL, x, return_anomaly_map=ask, anomaly_map_format="array")
        for x, ask in zip(xs, asks, strict=True)
    ]
    answers = await post_all(quick.api.url, bodies)
    settings = Settings(models_dir=quick.models, providers="cpu", intra_op_threads=1)
    model = Registry(quick.models, settings).load().get(MAPPED_MODEL)
    for x, ask, answer in zip(xs, asks, answers, strict=True):
        want_scores, _, want_maps = model.infer(x, reconstruction=False, anomaly_map=True)
        np.testing.assert_allclose(scores(answer), want_scores, rtol=1e-5, atol=1e-7)
        results = answer.json()["results"]
        if not ask:
            assert all("anomaly_map" not in r for r in results)
            continue
        got = np.array([r["anomaly_map"] for r in results], np.float32)
        np.testing.assert_allclose(got, want_maps, rtol=1e-5, atol=1e-7)
        assert [r["anomaly_map_max"] for r in results] == pytest.approx(
            want_maps.max(axis=(1, 2)).tolist(), rel=1e-5
        )


async def test_requests_larger_than_a_batch_come_back_whole_and_in_order(
    quick: Deployment,
) -> None:
    xs = [images(n, seed=10 + n) for n in (20, 3, 5, 11)]
    answers = await post_all(quick.api.url, [body(IMAGE_MODEL, x) for x in xs])
    for x, answer in zip(xs, answers, strict=True):
        assert len(scores(answer)) == len(x)
        np.testing.assert_allclose(
            scores(answer), direct(quick.models, IMAGE_MODEL, x), rtol=1e-5, atol=1e-7
        )


async def test_poison_input_fails_only_its_own_request(quick: Deployment) -> None:
    """The poisonable model makes ONNX Runtime raise for any batch holding a value >= 1:
    the batch is re-run request by request, so the requests sharing it still succeed."""
    rows = np.random.default_rng(2).random((8, POISON_FEATURES), dtype=np.float32)
    rows[5, 1] = 7.0
    answers = await post_all(quick.api.url, [body(POISON_MODEL, rows[i : i + 1]) for i in range(8)])
    assert answers[5].status_code == 500, answers[5].text
    assert "ONNX Runtime failed" in answers[5].json()["detail"]
    ok = [i for i in range(8) if i != 5]
    want = direct(quick.models, POISON_MODEL, rows[ok])
    np.testing.assert_allclose([scores(answers[i])[0] for i in ok], want, rtol=1e-5)
    assert scores((await post_all(quick.api.url, [body(POISON_MODEL, rows[:2])]))[0])


async def test_queue_full_is_503_with_retry_after(holding: Deployment) -> None:
    rejected0 = holding.api_metric(
        "gansentry_rejected_total", model=IMAGE_MODEL, reason="queue_full"
    )
    async with httpx.AsyncClient(base_url=holding.api.url, timeout=30) as client:
        queued = [
            asyncio.ensure_future(client.post("/score", json=body(IMAGE_MODEL, images(3, i))))
            for i in range(2)
        ]
        await asyncio.sleep(0.3)  # both are queued, waiting for company
        assert not any(q.done() for q in queued)
        full = await client.post("/score", json=body(IMAGE_MODEL, images(3, 3)))
        served = await asyncio.gather(*queued)
    assert full.status_code == 503, full.text
    assert int(full.headers["Retry-After"]) >= 1
    assert "already queued" in full.json()["detail"]
    for i, answer in enumerate(served):
        np.testing.assert_allclose(
            scores(answer), direct(holding.models, IMAGE_MODEL, images(3, i)), rtol=1e-5
        )
    rejected = holding.api_metric(
        "gansentry_rejected_total", model=IMAGE_MODEL, reason="queue_full"
    )
    assert rejected == rejected0 + 1


async def test_deadline_is_504_and_the_request_is_not_computed(holding: Deployment) -> None:
    computed0 = holding.computed(IMAGE_MODEL)
    async with httpx.AsyncClient(base_url=holding.api.url, timeout=30) as client:
        started = time.monotonic()
        late = await client.post("/score", json=body(IMAGE_MODEL, images(2, 4), timeout_ms=200))
        took = time.monotonic() - started
        header = await client.post(
            "/score", json=body(IMAGE_MODEL, images(2, 5)), headers={"X-Request-Timeout-Ms": "200"}
        )
    for answer in (late, header):
        assert answer.status_code == 504, answer.text
        assert "deadline" in answer.json()["detail"]
    assert took < HOLD_MS / 1000, "answered at the batch, not at the deadline"
    await asyncio.sleep(2 * HOLD_MS / 1000)  # past the batch either would have joined
    assert holding.computed(IMAGE_MODEL) == computed0
    ok = await post_all(holding.api.url, [body(IMAGE_MODEL, images(1, 6))])
    assert len(scores(ok[0])) == 1


async def test_client_that_hangs_up_is_counted_and_others_go_on(holding: Deployment) -> None:
    gone0 = holding.api_metric("gansentry_requests_total", model=IMAGE_MODEL, status="499")
    async with httpx.AsyncClient(base_url=holding.api.url, timeout=30) as client:
        hung_up = asyncio.ensure_future(client.post("/score", json=body(IMAGE_MODEL, images(2, 7))))
        await asyncio.sleep(0.3)  # queued, waiting for company
        hung_up.cancel()  # closes the connection
        with pytest.raises(asyncio.CancelledError):
            await hung_up
    end = time.monotonic() + 5
    while holding.api_metric("gansentry_requests_total", model=IMAGE_MODEL, status="499") == gone0:
        assert time.monotonic() < end, "the hang-up was never noticed"
        await asyncio.sleep(0.05)
    # Its place in the queue is free again: two more requests fit the bound of two.
    answers = await post_all(
        holding.api.url, [body(IMAGE_MODEL, images(3, 8)), body(IMAGE_MODEL, images(3, 9))]
    )
    for seed, answer in zip((8, 9), answers, strict=True):
        np.testing.assert_allclose(
            scores(answer), direct(holding.models, IMAGE_MODEL, images(3, seed)), rtol=1e-5
        )


# --- a reload under steady load: unpinned requests without pause while a new version is
# added and `POST /admin/reload` is called. Every answer must be 200 with the score of the
# version it names. Through Redis this used to answer 503 "no live worker serves digits
# version 3" until the workers' periodic rescan, up to 30 s later.

CLIENTS = 3
INPUTS = 8
BEFORE_S = 1.5  # steady load before the reload
AFTER_S = 2.0  # steady load once the new version answers
NEW_VERSION_WITHIN_S = 10.0  # far inside the workers' 30 s periodic rescan


async def test_reload_under_load_answers_every_request_with_the_right_model(
    backend: str, mutable_repo: ModelRepo, tmp_path: Path
) -> None:
    root = mutable_repo.root
    x = images(INPUTS, seed=11)
    # Version 2 as shipped in the fixture, and version 3, a copy of version 1.
    want = {2: direct(root, IMAGE_MODEL, x, 2), 3: direct(root, IMAGE_MODEL, x, 1)}
    assert not np.allclose(want[2], want[3]), "the versions must be told apart by score"
    bodies = [body(IMAGE_MODEL, x[i : i + 1]) for i in range(INPUTS)]
    deployment = await asyncio.to_thread(Deployment, backend, root, tmp_path, max_batch_delay_ms=2)
    answers: list[tuple[float, int, int, str]] = []  # (sent at, input, status, body)
    try:
        t0 = time.monotonic()
        reloaded_at: list[float] = []
        new_seen_at: list[float] = []

        async def client_loop(c: int) -> None:
            async with httpx.AsyncClient(base_url=deployment.api.url, timeout=30) as client:
                i = c
                while True:
                    sent = time.monotonic() - t0
                    if new_seen_at and sent > new_seen_at[0] + AFTER_S:
                        return
                    if sent > BEFORE_S + 60:
                        return  # the assertions below say what went wrong
                    r = await client.post("/score", json=bodies[i % INPUTS])
                    answers.append((sent, i % INPUTS, r.status_code, r.text))
                    if r.status_code == 200 and r.json()["version"] == 3 and not new_seen_at:
                        new_seen_at.append(time.monotonic() - t0)
                    i += CLIENTS

        async def reload() -> None:
            await asyncio.sleep(BEFORE_S)
            await asyncio.to_thread(add_version, root, IMAGE_MODEL, 1, 3)
            async with httpx.AsyncClient(base_url=deployment.api.url, timeout=60) as client:
                r = await client.post("/admin/reload")
            assert r.status_code == 200, r.text
            assert f"{IMAGE_MODEL}:3" in r.json()["loaded"]
            reloaded_at.append(time.monotonic() - t0)

        await asyncio.gather(*(client_loop(c) for c in range(CLIENTS)), reload())
    finally:
        await asyncio.to_thread(deployment.stop)

    failed = [(t, status, text[:200]) for t, _, status, text in answers if status != 200]
    assert failed == [], f"{len(failed)} of {len(answers)} answers were not 200: {failed[:5]}"
    versions: dict[int, int] = {2: 0, 3: 0}
    for _, i, _, text in answers:
        answer = json.loads(text)
        version = answer["version"]
        assert version in want, answer
        versions[version] += 1
        np.testing.assert_allclose(
            answer["results"][0]["score"], want[version][i], rtol=1e-5, atol=1e-7
        )
    assert versions[2] > 0 and versions[3] > 0, versions
    assert new_seen_at, "the new version never answered"
    assert new_seen_at[0] - reloaded_at[0] < NEW_VERSION_WITHIN_S, (reloaded_at, new_seen_at)
    # Once the new version answered, requests sent later are all answered by it.
    late = [json.loads(text)["version"] for t, _, _, text in answers if t > new_seen_at[0]]
    assert late and set(late) == {3}, versions
    print(  # the figures behind the report (pytest -s)
        f"{backend}: {len(answers)} answers, all 200 and checked; v2 {versions[2]}, v3 "
        f"{versions[3]}; reload answered {reloaded_at[0] - BEFORE_S:.2f} s after it was "
        f"sent, v3 first answered {new_seen_at[0] - reloaded_at[0]:.2f} s after that"
    )
