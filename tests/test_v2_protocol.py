"""The Open Inference Protocol (KServe v2) with NVIDIA's own client, `tritonclient.http`
(sync and asyncio), against a real `gansentry serve` on the shipped models over real
HTTP: the same scores as `POST /score` for the same inputs, in JSON and in binary tensors,
embedded and through Redis; health, metadata and error shapes as the protocol says."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from gansentry.preprocessing import decode_image
from tests.fixtures_redis import ApiProcess, RedisServer, WorkerProcess

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = REPO / "models"
EXAMPLES = REPO / "docs" / "examples"
MNIST, KDD = "mnist-ganomaly", "kdd-egbad"
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """Embedded batching, one API key, so that key checks are tested on the same server."""
    root = tmp_path_factory.mktemp("v2")
    server = ApiProcess(SHIPPED_MODELS, root, api_keys="k1", max_batch_delay_ms=2)
    try:
        server.wait_up()
        yield server
    finally:
        server.stop()


def key() -> dict[str, str]:
    """A fresh dict each time: tritonclient adds its own headers to the one it is given."""
    return {"X-API-Key": "k1"}


def client(api: ApiProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(api.url.removeprefix("http://"))


def mnist_batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 32, 32), dtype=np.float32)


def kdd_batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 121), dtype=np.float32)


def score_route(api: ApiProcess, model: str, x: np.ndarray, recon: bool = False) -> list[dict]:
    body = {
        "model": model,
        "inputs": [{"array": row.tolist()} for row in x],
        "return_reconstruction": recon,
    }
    r = httpx.post(f"{api.url}/score", json=body, headers=key(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def infer_x(
    c: triton.InferenceServerClient, model: str, x: np.ndarray, binary: bool, outputs: list[str]
) -> triton.InferResult:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [triton.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return c.infer(model, [tensor], outputs=wanted, headers=key())


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_tensor_scores_equal_the_score_route(api: ApiProcess, binary: bool) -> None:
    c = client(api)
    x = mnist_batch(5, seed=1)
    got = infer_x(c, MNIST, x, binary, ["score", "is_anomaly", "reconstruction"])
    want = score_route(api, MNIST, x, recon=True)
    np.testing.assert_allclose(got.as_numpy("score"), [r["score"] for r in want], rtol=1e-6)
    assert got.as_numpy("score").dtype == np.float32
    assert got.as_numpy("is_anomaly").tolist() == [r["is_anomaly"] for r in want]
    recon = got.as_numpy("reconstruction")
    assert recon.shape == (5, 1, 32, 32)
    np.testing.assert_allclose(recon, [r["reconstruction"] for r in want], rtol=1e-6, atol=1e-7)

    rows = kdd_batch(4, seed=2)
    got = infer_x(c, KDD, rows, binary, ["score", "is_anomaly"])
    want = score_route(api, KDD, rows)
    np.testing.assert_allclose(got.as_numpy("score"), [r["score"] for r in want], rtol=1e-6)
    assert got.as_numpy("reconstruction") is None, "only what was asked for comes back"
    response = got.get_response()
    assert response["model_name"] == KDD and response["model_version"] == "2"


def test_default_outputs_are_score_and_is_anomaly_in_binary(api: ApiProcess) -> None:
    """Without `outputs` tritonclient asks for every default output as binary data."""
    x = mnist_batch(2, seed=3)
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    got = client(api).infer(MNIST, [tensor], model_version="1", headers=key(), request_id="r-7")
    names = [o["name"] for o in got.get_response()["outputs"]]
    assert names == ["score", "is_anomaly"]
    assert all("binary_data_size" in o["parameters"] for o in got.get_response()["outputs"])
    assert got.get_response()["id"] == "r-7"
    want = score_route(api, MNIST, x)
    np.testing.assert_allclose(got.as_numpy("score"), [r["score"] for r in want], rtol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json-base64"])
def test_encoded_images_as_bytes_score_like_multipart(api: ApiProcess, binary: bool) -> None:
    """The README's 7 and 0: the 7 is flagged, the 0 is not, with /score's scores."""
    files = [(EXAMPLES / f"mnist-test-{d}.png").read_bytes() for d in (7, 0)]
    if binary:
        data = np.array(files, dtype=np.object_)
    else:
        import base64

        data = np.array([base64.b64encode(f) for f in files], dtype=np.object_)
    tensor = triton.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(data, binary_data=binary)
    got = client(api).infer(MNIST, [tensor], headers=key())
    r = httpx.post(
        f"{api.url}/score?model={MNIST}",
        files=[("image", ("a.png", f, "image/png")) for f in files],
        headers=key(),
        timeout=30,
    )
    want = r.json()["results"]
    np.testing.assert_allclose(got.as_numpy("score"), [w["score"] for w in want], rtol=1e-6)
    assert got.as_numpy("is_anomaly").tolist() == [True, False]
    # decoded exactly as /score decodes them: the same as sending the decoded arrays
    spec_x = np.stack([decode_image(f, _mnist_spec()) for f in files])
    via_x = infer_x(client(api), MNIST, spec_x, True, ["score"]).as_numpy("score")
    np.testing.assert_allclose(got.as_numpy("score"), via_x, rtol=1e-6)


def _mnist_spec():
    from gansentry.manifest import Manifest

    return Manifest.load(SHIPPED_MODELS / MNIST / "1").input


async def test_asyncio_client_health_metadata_and_infer(api: ApiProcess) -> None:
    async with triton_aio.InferenceServerClient(api.url.removeprefix("http://")) as c:
        assert await c.is_server_live()
        assert await c.is_server_ready()
        assert await c.is_model_ready(MNIST, headers=key())
        assert await c.is_model_ready(KDD, "1", headers=key())
        assert not await c.is_model_ready("no-such-model", headers=key())
        assert not await c.is_model_ready(KDD, "9", headers=key())
        server = await c.get_server_metadata()
        assert server["name"] == "gansentry" and "binary_tensor_data" in server["extensions"]
        meta = await c.get_model_metadata(MNIST, headers=key())
        assert meta["name"] == MNIST and meta["versions"] == ["1", "2"]
        assert meta["platform"] == "onnxruntime_onnx"
        assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
            "x": ("FP32", [-1, 1, 32, 32]),
            "image": ("BYTES", [-1]),
        }
        assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
            "score": ("FP32", [-1]),
            "is_anomaly": ("BOOL", [-1]),
            "reconstruction": ("FP32", [-1, 1, 32, 32]),
            "anomaly_map": ("FP32", [-1, 32, 32]),
        }
        old = await c.get_model_metadata(MNIST, "1", headers=key())
        assert "anomaly_map" not in [o["name"] for o in old["outputs"]], "v1 has no maps"
        kdd = await c.get_model_metadata(KDD, headers=key())
        assert kdd["versions"] == ["1", "2"]
        assert [i["name"] for i in kdd["inputs"]] == ["x"], "tables take no images"
        assert (await c.get_model_metadata(KDD, "1", headers=key()))["versions"] == ["1"]

        x = mnist_batch(3, seed=4)
        tensor = triton_aio.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        outputs = [triton_aio.InferRequestedOutput("score")]
        got = await c.infer(MNIST, [tensor], outputs=outputs, headers=key())
    want = score_route(api, MNIST, x)
    np.testing.assert_allclose(got.as_numpy("score"), [r["score"] for r in want], rtol=1e-6)


def test_errors_have_v2_bodies_and_the_score_routes_statuses(api: ApiProcess) -> None:
    c = client(api)

    def refused(model: str, x: np.ndarray, **kw: object) -> InferenceServerException:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as e:
            c.infer(model, [tensor], headers=kw.pop("headers", key()), **kw)
        return e.value

    e = refused("no-such-model", mnist_batch(1, 0))
    assert e.status() == "404" and "unknown model 'no-such-model'" in e.message()
    bad = mnist_batch(3, 0)
    bad[1, 0, 4, 4] = np.nan
    e = refused(MNIST, bad)
    assert e.status() == "422" and "inputs[1]: array contains NaN or Inf" in e.message()
    e = refused(MNIST, mnist_batch(1, 0) * 3)
    assert e.status() == "422" and "expected values in [0, 1]" in e.message()
    e = refused(MNIST, np.zeros((1, 1, 28, 28), np.float32))
    assert e.status() == "400" and "takes [n, 1, 32, 32]" in e.message()
    e = refused(MNIST, mnist_batch(1, 0), headers={})
    assert e.status() == "401" and "X-API-Key" in e.message()
    e = refused(MNIST, mnist_batch(1, 0), timeout=1)  # one microsecond
    assert e.status() == "504" and "deadline" in e.message()

    # The raw wire: {"error": ...} bodies, never FastAPI's {"detail": ...}
    url = f"{api.url}/v2/models/{MNIST}/infer"
    cases = [
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1]}]}, 400),
        ({"inputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [1]}]}, 400),
        ({"inputs": []}, 400),
        (
            {"inputs": [{"name": "x", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [1]}]},
            400,
        ),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%"]}]}, 422),
        ({"inputs": [_x_json(mnist_batch(1, 0))], "outputs": [{"name": "heatmap"}]}, 400),
    ]
    for body, status in cases:
        r = httpx.post(url, json=body, headers=key(), timeout=30)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()) == {"error"} and r.json()["error"], r.text
    # anomaly maps: a version without them, and a tabular model, are 422s that say why
    maps = {"outputs": [{"name": "anomaly_map"}]}
    r = httpx.post(
        f"{api.url}/v2/models/{MNIST}/versions/1/infer",
        json={"inputs": [_x_json(mnist_batch(1, 0))], **maps},
        headers=key(),
        timeout=30,
    )
    assert r.status_code == 422 and "has no anomaly maps" in r.json()["error"], r.text
    r = httpx.post(
        f"{api.url}/v2/models/{KDD}/infer",
        json={"inputs": [_x_json(kdd_batch(1, 0))], **maps},
        headers=key(),
        timeout=30,
    )
    assert r.status_code == 422 and "for image models only" in r.json()["error"], r.text
    too_many = kdd_batch(257, seed=0)  # max_inputs_per_request is 256
    e = refused(KDD, too_many)
    assert e.status() == "413" and "257 inputs is over the limit of 256" in e.message()
    r = httpx.post(url, content=b"0" * (17 << 20), headers=key(), timeout=30)  # > 16 MiB
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    r = httpx.post(url, content=b"{not json", headers=key(), timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    for version in ("x1", "0", "9" * 5000):
        r = httpx.post(f"{api.url}/v2/models/{MNIST}/versions/{version}/infer", headers=key())
        assert r.status_code == 400 and "positive integer" in r.json()["error"]
    r = httpx.get(f"{api.url}/v2/models/nope", headers=key())
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    # binary data whose size disagrees with the header
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 1, 32, 32],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 4096},
                }
            ]
        }
    ).encode()
    r = httpx.post(
        url, content=head + b"\0" * 100, headers={**key(), HEADER: str(len(head))}, timeout=30
    )
    assert r.status_code == 400 and "binary_data_size 4096" in r.json()["error"]


def _x_json(x: np.ndarray) -> dict:
    return {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}


def test_json_with_nested_data_and_metrics_count_v2_requests(api: ApiProcess) -> None:
    def counted() -> float:
        text = httpx.get(f"{api.url}/metrics").text
        for line in text.splitlines():
            if line.startswith(f'gansentry_requests_total{{model="{KDD}",status="200"}}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = counted()
    rows = kdd_batch(2, seed=5)
    body = {"inputs": [{"name": "x", "shape": [2, 121], "datatype": "FP32", "data": rows.tolist()}]}
    r = httpx.post(f"{api.url}/v2/models/{KDD}/infer", json=body, headers=key(), timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json" and HEADER not in r.headers
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["score"]["shape"] == [2] and out["is_anomaly"]["datatype"] == "BOOL"
    assert counted() == before + 1
    want = score_route(api, KDD, rows)
    np.testing.assert_allclose(out["score"]["data"], [w["score"] for w in want], rtol=1e-6)


def score_maps(url: str, model: str, x: np.ndarray, headers: dict[str, str]) -> np.ndarray:
    body = {
        "model": model,
        "inputs": [{"array": row.tolist()} for row in x],
        "return_anomaly_map": True,
        "anomaly_map_format": "array",
    }
    r = httpx.post(f"{url}/score", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return np.array([res["anomaly_map"] for res in r.json()["results"]], np.float32)


def test_redis_backend_answers_v2_like_score(api: ApiProcess, tmp_path: Path) -> None:
    """Through Redis and a `gansentry worker`, the same binary-tensor answers; and the
    same anomaly maps from `/score` and `/v2`, in-process and through Redis."""
    redis_server = RedisServer(tmp_path / "redis").start()
    worker = WorkerProcess(redis_server.url, SHIPPED_MODELS, "w0", tmp_path, worker_heartbeat_s=0.5)
    api_redis = ApiProcess(SHIPPED_MODELS, tmp_path, redis_url=redis_server.url)
    try:
        api_redis.wait_up()
        worker.wait_alive()
        c = triton.InferenceServerClient(api_redis.url.removeprefix("http://"))
        for _ in range(100):
            if c.is_model_ready(MNIST):
                break
            import time

            time.sleep(0.1)
        x = mnist_batch(4, seed=6)
        got = infer_x(c, MNIST, x, True, ["score", "is_anomaly", "reconstruction"])
        body = {"model": MNIST, "inputs": [{"array": row.tolist()} for row in x]}
        want = httpx.post(f"{api_redis.url}/score", json=body, timeout=30).json()["results"]
        np.testing.assert_allclose(got.as_numpy("score"), [w["score"] for w in want], rtol=1e-6)
        assert got.as_numpy("is_anomaly").tolist() == [w["is_anomaly"] for w in want]
        assert got.as_numpy("reconstruction").shape == (4, 1, 32, 32)

        digits = [
            decode_image((EXAMPLES / f"mnist-test-{d}.png").read_bytes(), _mnist_spec())
            for d in (0, 7)
        ]
        x = np.concatenate([np.stack(digits), mnist_batch(2, seed=7)])
        maps = {
            "embedded /score": score_maps(api.url, MNIST, x, key()),
            "embedded /v2": infer_x(client(api), MNIST, x, True, ["anomaly_map"]),
            "redis /score": score_maps(api_redis.url, MNIST, x, {}),
            "redis /v2 json": infer_x(c, MNIST, x, False, ["anomaly_map"]),
        }
        maps = {
            k: v if isinstance(v, np.ndarray) else v.as_numpy("anomaly_map")
            for k, v in maps.items()
        }
        first = maps["embedded /score"]
        assert first.shape == (4, 32, 32) and first[1].max() > first[0].max(), "the 7 lights up"
        for where, got_maps in maps.items():
            np.testing.assert_array_equal(got_maps, first, err_msg=where)
    finally:
        api_redis.stop()
        worker.stop()
        redis_server.stop()
