"""The scoring path's shortcuts change no answer: the routes' direct dispatch
(service/api/fast.py) answers exactly as FastAPI's router does and skips nothing a handler
relies on; the v2 tensor's whole-batch checks accept and refuse what the row checks do;
and the metric children kept per label set are always the ones exported."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from gansentry.manifest import Manifest
from gansentry.preprocessing import InputError
from service.api import score, v2
from service.api.fast import ENDPOINTS
from service.inputs import RANGE_TOLERANCE, InputsInvalid, _checked_numbers, parse_tensor
from tests.fixtures_models import IMAGE_MODEL, IMAGE_SPEC, ModelRepo, b64, png_bytes, serving
from tests.fixtures_models import random_pixels as pixels

ROOT = "/mounted"
SHIPPED = Path(__file__).resolve().parents[1] / "models"


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
    """A binary-tensor request as tritonclient writes it: `score` back binary, `is_anomaly`
    as JSON."""
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    outputs = [
        triton.InferRequestedOutput("score", binary_data=True),
        triton.InferRequestedOutput("is_anomaly", binary_data=False),
    ]
    body, head = triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    return body, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(head),
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


def _row_by_row(batch: np.ndarray, manifest: Manifest) -> tuple[np.ndarray | None, list[str]]:
    """What the v2 `x` tensor's checks are defined as: `_checked_numbers` on each row."""
    rows, errors = [], []
    for i, row in enumerate(batch):
        try:
            rows.append(_checked_numbers(row, manifest.input))
        except InputError as e:
            errors.append(f"inputs[{i}]: {e}")
    return (None, errors) if errors else (np.stack(rows), [])


def test_whole_batch_tensor_checks_equal_the_row_checks() -> None:
    """`parse_tensor` checks a float32 batch at once and falls back to the row checks only
    when something is wrong: same accepted values, same refusals, same messages."""
    manifest = Manifest.load(SHIPPED / "mnist-ganomaly" / "1")
    rng = np.random.default_rng(6)
    good = rng.random((4, *manifest.input.shape), dtype=np.float32)
    edge = good.copy()
    edge[0, 0, 0, :2] = (-RANGE_TOLERANCE / 2, 1 + RANGE_TOLERANCE / 2)
    cases = {"good": good, "within tolerance": edge}
    for what, where, value in [
        ("nan", 1, np.nan),
        ("inf", 2, np.inf),
        ("-inf", 0, -np.inf),
        ("over range", 3, 1.5),
        ("under range", 1, -0.01),
    ]:
        bad = good.copy()
        bad[where, 0, 5, 7] = value
        cases[what] = bad
    two = good.copy()
    two[0, 0, 0, 0], two[2, 0, 1, 1] = np.nan, 7.0
    cases["two bad rows"] = two
    cases["float64"] = good.astype(np.float64)
    for what, batch in cases.items():
        want, want_errors = _row_by_row(batch, manifest)
        try:
            got = parse_tensor(batch, manifest).x
        except InputsInvalid as e:
            assert want is None and e.errors == want_errors, what
        else:
            assert want is not None, what
            assert got.dtype == np.float32 and np.array_equal(got, want), what


def test_kept_metric_children_are_the_exported_ones() -> None:
    """`labels()` answers from a dict; after `remove` or `clear` a label set gets a child
    that the registry exports again, never one it dropped."""
    from prometheus_client import CollectorRegistry

    from service import metrics

    registry = CollectorRegistry()
    counter = metrics.Counter("kept_total", "test", ["model", "status"], registry=registry)

    def value() -> float | None:
        return registry.get_sample_value("kept_total", {"model": "m", "status": "200"})

    child = counter.labels("m", "200")
    assert counter.labels("m", "200") is child
    assert counter.labels(model="m", status="200") is child
    child.inc(2)
    assert value() == 2
    for drop in (lambda: counter.remove("m", "200"), counter.clear):
        drop()
        assert value() is None
        counter.labels("m", "200").inc()
        assert value() == 1
