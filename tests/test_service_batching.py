"""What only the embedded batcher does, on real ONNX models: merging concurrent requests
into batches, splitting large requests into batches of at most `max_batch_size` items, and
fetching reconstructions only for the requests that ask. Ordering, deadlines, hang-ups,
poison inputs and backpressure are tested for every backend in
tests/test_batching_backends.py."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from service.batching.base import ModelRef
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
