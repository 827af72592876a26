"""Dynamic batching on real ONNX models: merging, splitting, backpressure, deadlines,
cancellation and poison inputs."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from service.batching.base import InferenceFailed, ModelRef
from tests.fixtures_models import IMAGE_MODEL, IMAGE_SPEC, ModelRepo, metric, serving

BATCH_BUCKET = "gansentry_batch_size_bucket"


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *IMAGE_SPEC.shape), dtype=np.float32)


def request(x: np.ndarray, **extra: object) -> dict:
    return {"model": IMAGE_MODEL, "inputs": [{"array": a.tolist()} for a in x], **extra}


def batches() -> tuple[float, float]:
    """(batches so far, batches of more than one item) for the image model."""
    total = metric("gansentry_batch_size_count", model=IMAGE_MODEL)
    single = metric(BATCH_BUCKET, model=IMAGE_MODEL, le="1.0")
    return total, total - single


async def test_concurrent_requests_are_merged_into_batches(model_repo: ModelRepo) -> None:
    async with serving(model_repo.root, max_batch_delay_ms=20, max_batch_size=32) as s:
        x = images(16, seed=1)
        total0, multi0 = batches()
        answers = await asyncio.gather(
            *(s.client.post("/score", json=request(x[i : i + 1])) for i in range(16))
        )
        total1, multi1 = batches()
        assert all(r.status_code == 200 for r in answers)
        assert multi1 - multi0 >= 1, "no batch held more than one request"
        assert total1 - total0 < 16
        expected, _ = s.registry.get(IMAGE_MODEL).run(x)
        got = [r.json()["results"][0]["score"] for r in answers]
        np.testing.assert_allclose(got, expected, rtol=1e-4)


async def test_large_requests_split_and_merge_in_input_order(model_repo: ModelRepo) -> None:
    async with serving(model_repo.root, max_batch_delay_ms=5, max_batch_size=8) as s:
        xs = [images(n, seed=10 + n) for n in (20, 3, 5, 11)]
        count0 = metric("gansentry_batch_size_count", model=IMAGE_MODEL)
        sum0 = metric("gansentry_batch_size_sum", model=IMAGE_MODEL)
        over8_0 = count0 - metric(BATCH_BUCKET, model=IMAGE_MODEL, le="8.0")
        answers = await asyncio.gather(*(s.client.post("/score", json=request(x)) for x in xs))
        model = s.registry.get(IMAGE_MODEL)
        for x, r in zip(xs, answers, strict=True):
            assert r.status_code == 200, r.text
            expected = np.array([model.run(x[i : i + 1])[0][0] for i in range(len(x))])
            np.testing.assert_allclose(
                [res["score"] for res in r.json()["results"]], expected, rtol=1e-4
            )
        n_batches = metric("gansentry_batch_size_count", model=IMAGE_MODEL) - count0
        assert metric("gansentry_batch_size_sum", model=IMAGE_MODEL) - sum0 == 39
        assert n_batches >= 5  # 39 items, at most 8 per ONNX Runtime call
        over8 = metric("gansentry_batch_size_count", model=IMAGE_MODEL) - metric(
            BATCH_BUCKET, model=IMAGE_MODEL, le="8.0"
        )
        assert over8 == over8_0, "a batch held more than max_batch_size items"


async def test_reconstructions_reach_only_the_requests_that_ask(model_repo: ModelRepo) -> None:
    """Merged and split batches fetch reconstructions from ONNX Runtime only when some
    request in them wants them, and each request gets back only what it asked for."""
    async with serving(model_repo.root, max_batch_delay_ms=20, max_batch_size=8) as s:
        model = s.registry.get(IMAGE_MODEL)
        ref = ModelRef(IMAGE_MODEL, model.ref.version)
        xs = [images(n, seed=30 + n) for n in (11, 2, 5)]
        wants = [True, False, False]
        deadline = time.time() + 30
        scored = await asyncio.gather(
            *(s.batcher.submit(ref, x, deadline, w) for x, w in zip(xs, wants, strict=True))
        )
        for x, want, got in zip(xs, wants, scored, strict=True):
            expected_scores, expected_recons = model.run(x)
            np.testing.assert_allclose(got.scores, expected_scores, rtol=1e-4)
            if want:
                np.testing.assert_allclose(got.reconstructions, expected_recons, atol=1e-5)
            else:
                assert got.reconstructions is None
        alone = await s.batcher.submit(ref, xs[1], deadline, False)
        assert alone.reconstructions is None
        assert model.run(xs[1], reconstruction=False)[1] is None


async def wait_for_queue(depth: float, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while metric("gansentry_queue_depth", model=IMAGE_MODEL) < depth:
        assert time.monotonic() < end, "the queue never filled"
        await asyncio.sleep(0.002)


async def test_queue_full_is_503_with_retry_after(model_repo: ModelRepo) -> None:
    async with serving(
        model_repo.root, max_batch_size=4, max_queue_items=256, max_batch_delay_ms=0
    ) as s:
        first = asyncio.ensure_future(
            s.batcher.submit(ModelRef(IMAGE_MODEL, 2), images(256, 1), time.time() + 60)
        )
        await wait_for_queue(220)
        rejected0 = metric("gansentry_rejected_total", model=IMAGE_MODEL, reason="queue_full")
        r = await s.client.post("/score", json=request(images(48, 2)))
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert "already queued" in r.json()["detail"]
        assert metric("gansentry_rejected_total", model=IMAGE_MODEL, reason="queue_full") == (
            rejected0 + 1
        )
        assert (await first).scores.shape == (256,)
        r = await s.client.post("/score", json=request(images(48, 2)))
        assert r.status_code == 200
        assert metric("gansentry_queue_depth", model=IMAGE_MODEL) == 0


async def test_deadline_is_504_and_expired_items_are_not_computed(model_repo: ModelRepo) -> None:
    async with serving(model_repo.root, max_batch_size=8, max_batch_delay_ms=0) as s:
        items0 = metric("gansentry_batch_size_sum", model=IMAGE_MODEL)
        busy = asyncio.ensure_future(
            s.batcher.submit(ModelRef(IMAGE_MODEL, 2), images(512, 3), time.time() + 60)
        )
        await wait_for_queue(400)
        expired0 = metric("gansentry_expired_total", model=IMAGE_MODEL)
        late = await s.client.post("/score", json=request(images(4, 4), timeout_ms=10))
        assert late.status_code == 504, late.text
        assert "deadline" in late.json()["detail"]
        header = await s.client.post(
            "/score", json=request(images(4, 5)), headers={"X-Request-Timeout-Ms": "10"}
        )
        assert header.status_code == 504, header.text
        assert (await busy).scores.shape == (512,)
        assert metric("gansentry_expired_total", model=IMAGE_MODEL) >= expired0 + 2
        assert metric("gansentry_batch_size_sum", model=IMAGE_MODEL) - items0 == 512
        ok = await s.client.post("/score", json=request(images(4, 6), timeout_ms=5000))
        assert ok.status_code == 200


async def test_cancelled_request_leaves_the_queue(model_repo: ModelRepo) -> None:
    async with serving(model_repo.root, max_batch_size=8, max_batch_delay_ms=0) as s:
        ref = ModelRef(IMAGE_MODEL, 2)
        deadline = time.time() + 30
        busy = asyncio.ensure_future(s.batcher.submit(ref, images(64, 7), deadline))
        await wait_for_queue(40)
        depth = metric("gansentry_queue_depth", model=IMAGE_MODEL)
        gone = asyncio.ensure_future(s.batcher.submit(ref, images(30, 8), deadline))
        await asyncio.sleep(0)
        assert metric("gansentry_queue_depth", model=IMAGE_MODEL) >= depth + 30 - 8
        items0 = metric("gansentry_batch_size_sum", model=IMAGE_MODEL)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        scored = await busy
        assert scored.scores.shape == (64,)
        assert metric("gansentry_batch_size_sum", model=IMAGE_MODEL) - items0 <= 64
        assert metric("gansentry_queue_depth", model=IMAGE_MODEL) == 0


async def test_poison_input_fails_only_its_own_request(model_repo: ModelRepo) -> None:
    """ONNX Runtime raises on the odd input: its batch is retried item by item, so the
    requests sharing the batch still get their scores."""
    async with serving(model_repo.root, max_batch_size=32, max_batch_delay_ms=30) as s:
        ref = ModelRef(IMAGE_MODEL, 2)
        deadline = time.time() + 30
        good = [images(2, 20 + i) for i in range(3)]
        poison = np.zeros((1, 1, 16, 16), np.float32)  # bypasses the API's validation
        results = await asyncio.gather(
            s.batcher.submit(ref, good[0], deadline),
            s.batcher.submit(ref, poison, deadline),
            s.batcher.submit(ref, good[1], deadline),
            s.batcher.submit(ref, good[2], deadline),
            return_exceptions=True,
        )
        assert isinstance(results[1], InferenceFailed)
        assert str(results[1]).startswith("inputs[0]: ONNX Runtime failed")
        model = s.registry.get(IMAGE_MODEL)
        for x, scored in zip(good, [results[0], results[2], results[3]], strict=True):
            assert not isinstance(scored, BaseException), scored
            np.testing.assert_allclose(scored.scores, model.run(x)[0], rtol=1e-4)
        r = await s.client.post("/score", json=request(images(1, 30)))
        assert r.status_code == 200
        assert (await s.batcher.ready())[0]


async def test_client_that_hangs_up_leaves_the_queue(model_repo: ModelRepo) -> None:
    """Driven at the ASGI level, where a hang-up is an `http.disconnect` message."""
    async with serving(model_repo.root, max_batch_size=8, max_batch_delay_ms=0) as s:
        items0 = metric("gansentry_batch_size_sum", model=IMAGE_MODEL)
        gone0 = metric("gansentry_requests_total", model=IMAGE_MODEL, status="499")
        busy = asyncio.ensure_future(
            s.batcher.submit(ModelRef(IMAGE_MODEL, 2), images(512, 3), time.time() + 60)
        )
        await wait_for_queue(400)
        body = json.dumps(request(images(4, 9))).encode()
        hung_up = asyncio.Event()
        delivered = False
        sent: list[dict] = []

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await hung_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/score",
            "raw_path": b"/score",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000),
            "server": ("gansentry", 80),
        }
        call = asyncio.ensure_future(s.app(scope, receive, send))
        depth = metric("gansentry_queue_depth", model=IMAGE_MODEL)
        await asyncio.sleep(0.02)
        assert not call.done()
        hung_up.set()
        await asyncio.wait_for(call, 10)
        assert metric("gansentry_queue_depth", model=IMAGE_MODEL) <= depth
        assert (await busy).scores.shape == (512,)
        assert metric("gansentry_batch_size_sum", model=IMAGE_MODEL) - items0 == 512
        assert metric("gansentry_requests_total", model=IMAGE_MODEL, status="499") == gone0 + 1
