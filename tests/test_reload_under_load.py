"""A reload under steady load, over real HTTP, in both batching modes: client loops send
unpinned requests without pause while a new version is added and `POST /admin/reload` is
called on the API. Every answer must be 200, and its score must be the output of the
version it names, computed here with ONNX Runtime directly. Through Redis (real
redis-server, real worker subprocesses) this used to answer 503 "no live worker serves
digits version 3" until the workers' periodic rescan, up to 30 s later."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.registry import Registry
from service.settings import Settings
from tests.fixtures_models import IMAGE_MODEL, ModelRepo, add_version
from tests.fixtures_redis import ApiProcess, RedisServer, WorkerProcess

FAST = {"redis_claim_idle_ms": 500, "worker_heartbeat_s": 0.5, "max_batch_delay_ms": 2}
CLIENTS = 3
INPUTS = 8
BEFORE_S = 1.5  # steady load before the reload
AFTER_S = 2.0  # steady load once the new version answers
NEW_VERSION_WITHIN_S = 10.0  # far inside the workers' 30 s periodic rescan


def expected_scores(models: Path, x: np.ndarray) -> dict[int, np.ndarray]:
    """Version 2 as shipped in the fixture, and version 3, a copy of version 1."""
    settings = Settings(models_dir=models, providers="cpu", intra_op_threads=1)
    registry = Registry(models, settings).load()
    return {
        2: registry.get(IMAGE_MODEL, 2).run(x, False)[0],
        3: registry.get(IMAGE_MODEL, 1).run(x, False)[0],
    }


@pytest.mark.parametrize("mode", ["embedded", "redis"])
async def test_reload_under_load_answers_every_request_with_the_right_model(
    mode: str, mutable_repo: ModelRepo, tmp_path: Path
) -> None:
    root = mutable_repo.root
    x = np.random.default_rng(11).random((INPUTS, 1, 32, 32), dtype=np.float32)
    want = expected_scores(root, x)
    assert not np.allclose(want[2], want[3]), "the versions must be told apart by score"
    bodies = [{"model": IMAGE_MODEL, "inputs": [{"array": x[i].tolist()}]} for i in range(INPUTS)]

    server: RedisServer | None = None
    workers: list[WorkerProcess] = []
    settings: dict[str, object] = {}
    if mode == "redis":
        server = RedisServer(tmp_path / "redis").start()
        workers = [WorkerProcess(server.url, root, f"w{i}", tmp_path, **FAST) for i in range(2)]
        settings = {"redis_url": server.url, **FAST}
    api = ApiProcess(root, tmp_path, **settings)
    answers: list[tuple[float, int, int, str]] = []  # (sent at, input, status, body)
    try:
        for w in workers:
            await asyncio.to_thread(w.wait_alive)
        await asyncio.to_thread(api.wait_up)
        await asyncio.to_thread(api.wait_ready)
        t0 = time.monotonic()
        reloaded_at: list[float] = []
        new_seen_at: list[float] = []

        async def client_loop(c: int) -> None:
            async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
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
            async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
                r = await client.post("/admin/reload")
            assert r.status_code == 200, r.text
            assert f"{IMAGE_MODEL}:3" in r.json()["loaded"]
            reloaded_at.append(time.monotonic() - t0)

        await asyncio.gather(*(client_loop(c) for c in range(CLIENTS)), reload())
    finally:
        api.stop()
        for w in workers:
            w.stop()
        if server is not None:
            server.stop()

    failed = [(t, status, text[:200]) for t, _, status, text in answers if status != 200]
    assert failed == [], f"{len(failed)} of {len(answers)} answers were not 200: {failed[:5]}"
    versions: dict[int, int] = {2: 0, 3: 0}
    for _, i, _, text in answers:
        body = json.loads(text)
        version = body["version"]
        assert version in want, body
        versions[version] += 1
        np.testing.assert_allclose(
            body["results"][0]["score"], want[version][i], rtol=1e-5, atol=1e-7
        )
    assert versions[2] > 0 and versions[3] > 0, versions
    assert new_seen_at, "the new version never answered"
    assert new_seen_at[0] - reloaded_at[0] < NEW_VERSION_WITHIN_S, (reloaded_at, new_seen_at)
    # Once the new version answered, requests sent later are all answered by it.
    late = [json.loads(text)["version"] for t, _, _, text in answers if t > new_seen_at[0]]
    assert late and set(late) == {3}, versions
    print(  # the figures behind the report (pytest -s)
        f"{mode}: {len(answers)} answers, all 200 and checked; v2 {versions[2]}, v3 "
        f"{versions[3]}; reload answered {reloaded_at[0] - BEFORE_S:.2f} s after it was "
        f"sent, v3 first answered {new_seen_at[0] - reloaded_at[0]:.2f} s after that"
    )
