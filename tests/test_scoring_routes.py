"""The scoring routes' direct dispatch (service/api/fast.py) answers exactly as FastAPI's
router does, and skips nothing a handler relies on."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from service.api import score, v2
from service.api.fast import ENDPOINTS
from tests.fixtures_models import IMAGE_MODEL, IMAGE_SPEC, ModelRepo, b64, png_bytes, serving
from tests.fixtures_models import random_pixels as pixels

ROOT = "/mounted"


def test_scoring_handlers_take_only_the_request_and_path_strings() -> None:
    """The direct dispatch resolves no dependencies, query, header or body parameters: a
    handler that grew one would silently go without it."""
    routes = [r for router in (score.router, v2.router) for r in router.routes]
    handled = [r for r in routes if r.endpoint in ENDPOINTS]
    assert len(handled) == len(ENDPOINTS)
    for route in handled:
        d = route.dependant
        assert not (d.dependencies or d.query_params or d.header_params or d.cookie_params), (
            route.path
        )
        assert not d.body_params, route.path
        assert {p.name for p in d.path_params} == set(route.param_convertors), route.path
        assert d.request_param_name == "request", route.path


def _v2_binary(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    data = x.astype("<f4").tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "outputs": [
                {"name": "score", "parameters": {"binary_data": True}},
                {"name": "is_anomaly"},
            ],
        }
    ).encode()
    return head + data, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }


def _requests() -> list[tuple[str, dict]]:
    image = b64(png_bytes(pixels(28, 28, seed=4)))
    x = np.random.default_rng(5).random((2, *IMAGE_SPEC.shape), dtype=np.float32)
    body, headers = _v2_binary(x)
    return [
        ("/score", {"json": {"model": IMAGE_MODEL, "inputs": [{"image": image}]}}),
        ("/score", {"json": {"model": IMAGE_MODEL, "inputs": [{"image": "%%%"}]}}),
        ("/score", {"json": {"model": "nope", "inputs": [{"image": image}]}}),
        ("/score", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("/score", {"content": b"x", "headers": {"Content-Type": "text/plain"}}),
        (f"/v2/models/{IMAGE_MODEL}/infer", {"content": body, "headers": headers}),
        (f"/v2/models/{IMAGE_MODEL}/versions/1/infer", {"content": body, "headers": headers}),
        (f"/v2/models/{IMAGE_MODEL}/versions/x/infer", {"content": body, "headers": headers}),
        ("/v2/models/nope/infer", {"content": body, "headers": headers}),
    ]


async def test_direct_dispatch_answers_as_the_router_does(model_repo: ModelRepo) -> None:
    """Under a root path the app routes the scoring requests through FastAPI's router;
    without one they take the direct dispatch. Every answer, good or bad, is the same."""
    async with serving(model_repo.root, max_batch_delay_ms=1) as s:
        routed = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=s.app, root_path=ROOT),
            base_url="http://gansentry",
            timeout=60,
        )
        async with routed:
            for path, kwargs in _requests():
                direct = await s.client.post(path, **kwargs)
                via_router = await routed.post(ROOT + path, **kwargs)
                assert direct.status_code == via_router.status_code, path
                assert direct.headers == via_router.headers, path
                assert direct.content == via_router.content, (path, direct.content)
        # The requests above exercised both answers and errors.
        statuses = [(await s.client.post(p, **k)).status_code for p, k in _requests()]
        assert statuses == [200, 422, 404, 422, 415, 200, 200, 400, 404]


@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_other_methods_on_scoring_paths_still_reach_the_router(
    model_repo: ModelRepo, method: str
) -> None:
    async with serving(model_repo.root) as s:
        r = await s.client.request(method, "/score")
        assert r.status_code == 405
        r = await s.client.request(method, f"/v2/models/{IMAGE_MODEL}/infer")
        assert r.status_code == 405
