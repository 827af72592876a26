"""POST /score and the other endpoints, in process, on real exported ONNX models."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from gansentry.preprocessing import decode_image, encode_record
from tests.fixtures_models import (
    IMAGE_MODEL,
    IMAGE_SPEC,
    TABULAR_MODEL,
    ModelRepo,
    b64,
    metric,
    png_bytes,
    random_pixels,
    serving,
)

RECORD = {"duration": 2.5, "protocol": "udp", "bytes": 1200.0}


@pytest.fixture
async def served(model_repo: ModelRepo):
    async with serving(model_repo.root, max_batch_delay_ms=2) as s:
        yield s


async def test_png_jpeg_and_array_scores_equal_direct_onnx_runtime(served) -> None:
    png = png_bytes(random_pixels(28, 28, seed=1))
    jpeg = png_bytes(random_pixels(40, 30, seed=2), fmt="JPEG")
    array = np.random.default_rng(3).random(IMAGE_SPEC.shape, dtype=np.float32)
    r = await served.client.post(
        "/score",
        json={
            "model": IMAGE_MODEL,
            "inputs": [{"image": b64(png)}, {"image": b64(jpeg)}, {"array": array.tolist()}],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    model = served.registry.get(IMAGE_MODEL)
    assert (body["model"], body["version"]) == (IMAGE_MODEL, 2)
    assert body["threshold"] == pytest.approx(model.threshold)
    x = np.stack([decode_image(png, IMAGE_SPEC), decode_image(jpeg, IMAGE_SPEC), array])
    expected, _ = model.run(x)
    got = [res["score"] for res in body["results"]]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    for res, s in zip(body["results"], expected, strict=True):
        assert res["is_anomaly"] == bool(s > model.threshold)
        assert "reconstruction" not in res


async def test_reconstructions_png_for_images_list_for_arrays(served) -> None:
    png = png_bytes(random_pixels(28, 28, seed=4))
    array = np.random.default_rng(5).random(IMAGE_SPEC.shape, dtype=np.float32)
    r = await served.client.post(
        "/score",
        json={
            "model": IMAGE_MODEL,
            "inputs": [{"image": b64(png)}, {"array": array.tolist()}],
            "return_reconstruction": True,
        },
    )
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    img = Image.open(io.BytesIO(base64.b64decode(first["reconstruction"])))
    assert (img.format, img.mode, img.size) == ("PNG", "L", (32, 32))
    _, recon = served.registry.get(IMAGE_MODEL).run(decode_image(png, IMAGE_SPEC)[None])
    expected = np.clip(np.rint(recon[0, 0] * 255), 0, 255)
    assert np.abs(np.asarray(img, dtype=np.float32) - expected).max() <= 1
    listed = np.asarray(second["reconstruction"], dtype=np.float32)
    assert listed.shape == IMAGE_SPEC.shape
    _, recon2 = served.registry.get(IMAGE_MODEL).run(array[None])
    np.testing.assert_allclose(listed, recon2[0], atol=1e-5)


async def test_records_go_through_manifest_preprocessing(served) -> None:
    other = {**RECORD, "protocol": "tcp", "bytes": 10}
    r = await served.client.post(
        "/score",
        json={
            "model": TABULAR_MODEL,
            "inputs": [{"record": RECORD}, {"record": other}],
            "return_reconstruction": True,
        },
    )
    assert r.status_code == 200, r.text
    model = served.registry.get(TABULAR_MODEL)
    prep = model.manifest.input.preprocessing
    x = np.stack([encode_record(RECORD, prep), encode_record(other, prep)])
    scores, recons = model.run(x)
    results = r.json()["results"]
    np.testing.assert_allclose([res["score"] for res in results], scores, rtol=1e-4)
    assert len(results[0]["reconstruction"]) == prep.num_features
    np.testing.assert_allclose(results[0]["reconstruction"], recons[0], atol=1e-5)


async def test_multipart_uploads(served) -> None:
    images = [png_bytes(random_pixels(28, 28, seed=s)) for s in (6, 7, 8)]
    files = [("image", (f"part{i}.png", data, "image/png")) for i, data in enumerate(images)]
    r = await served.client.post(
        "/score",
        params={"model": IMAGE_MODEL, "version": 1, "return_reconstruction": "true"},
        files=files,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1
    expected, _ = served.registry.get(IMAGE_MODEL, 1).run(
        np.stack([decode_image(d, IMAGE_SPEC) for d in images])
    )
    np.testing.assert_allclose([res["score"] for res in body["results"]], expected, rtol=1e-4)
    assert all(res["reconstruction"] for res in body["results"])

    bad = files[:1] + [("image", ("junk.png", b"not an image", "image/png"))]
    r = await served.client.post("/score", params={"model": IMAGE_MODEL}, files=bad)
    assert r.status_code == 422
    assert r.json()["detail"].startswith("inputs[1]: cannot decode image")
    r = await served.client.post("/score", files=files[:1])
    assert r.status_code == 422 and "?model=NAME" in r.json()["detail"]
    r = await served.client.post("/score", params={"model": "nope"}, files=files[:1])
    assert r.status_code == 404
    r = await served.client.post(
        "/score", params={"model": IMAGE_MODEL}, files=[("photo", ("a.png", images[0]))]
    )
    assert r.status_code == 422 and "'photo'" in r.json()["detail"]


async def test_versions_are_selectable_and_differ(served) -> None:
    arr = np.random.default_rng(9).random(IMAGE_SPEC.shape, dtype=np.float32).tolist()
    answers = {}
    for version in (1, 2):
        r = await served.client.post(
            "/score", json={"model": IMAGE_MODEL, "version": version, "inputs": [{"array": arr}]}
        )
        assert r.status_code == 200 and r.json()["version"] == version
        answers[version] = r.json()["results"][0]["score"]
    assert answers[1] != answers[2]


def _array(fill: float = 0.5) -> list:
    return np.full(IMAGE_SPEC.shape, fill, dtype=np.float32).tolist()


BAD_INPUTS = [
    (IMAGE_MODEL, {"image": b64(b"\x89PNG not really")}, "inputs[1]: cannot decode image"),
    (IMAGE_MODEL, {"image": "%%%"}, "inputs[1]: image is not valid base64"),
    (
        IMAGE_MODEL,
        {"array": np.zeros((28, 28)).tolist()},
        "inputs[1]: expected array of shape [1, 32, 32], got [28, 28]",
    ),
    (IMAGE_MODEL, {"array": [[[0.1, 0.2], [0.3]]]}, "inputs[1]: expected array of shape"),
    (IMAGE_MODEL, {"array": [[["a"] * 32] * 32]}, "inputs[1]: expected an array of numbers"),
    (IMAGE_MODEL, {"array": _array(300.0)}, "inputs[1]: expected values in [0, 1]"),
    (IMAGE_MODEL, {"record": RECORD}, "inputs[1]: model 'digits' takes images"),
    (TABULAR_MODEL, {"image": b64(png_bytes(random_pixels()))}, "inputs[1]: model 'traffic'"),
    (TABULAR_MODEL, {"record": {**RECORD, "port": 80}}, "inputs[1]: unknown field(s): port"),
    (TABULAR_MODEL, {"record": {"duration": 1.0, "bytes": 2.0}}, "missing field 'protocol'"),
    (TABULAR_MODEL, {"record": {**RECORD, "bytes": "many"}}, "field 'bytes' must be a number"),
    (TABULAR_MODEL, {"array": [0.1, 0.2]}, "inputs[1]: expected array of shape [5], got [2]"),
    (IMAGE_MODEL, {"image": b64(png_bytes(random_pixels())), "array": _array()}, "exactly one"),
    (IMAGE_MODEL, {"pixels": [1]}, "inputs[1].pixels: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("model", "bad", "message"), BAD_INPUTS)
async def test_bad_input_is_422_naming_it_and_server_keeps_serving(
    served, model: str, bad: dict, message: str
) -> None:
    good = {"array": _array()} if model == IMAGE_MODEL else {"record": RECORD}
    r = await served.client.post("/score", json={"model": model, "inputs": [good, bad]})
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    r = await served.client.post("/score", json={"model": model, "inputs": [good]})
    assert r.status_code == 200


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_nan_and_inf_are_refused(served, token: str) -> None:
    values = json.dumps(_array())
    rows = ", ".join(["[" + ", ".join(["0.5"] * 32) + "]"] * 31)
    body = (
        f'{{"model": "{IMAGE_MODEL}", "inputs": [{{"array": {values}}}, {{"array": '
        f"[[[{token}{', 0.5' * 31}], {rows}]]}}]}}"
    )
    r = await served.client.post(
        "/score", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "inputs[1]: array contains NaN or Inf"


async def test_request_level_errors(served) -> None:
    c = served.client
    r = await c.post("/score", json={"model": "nope", "inputs": [{"array": _array()}]})
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["detail"]
    r = await c.post(
        "/score", json={"model": IMAGE_MODEL, "version": 7, "inputs": [{"array": [0]}]}
    )
    assert r.status_code == 404 and "versions are [1, 2]" in r.json()["detail"]
    r = await c.post("/score", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "Invalid JSON" in r.json()["detail"]
    r = await c.post("/score", json={"model": IMAGE_MODEL})
    assert r.status_code == 422 and r.json()["detail"].startswith("inputs: Field required")
    r = await c.post("/score", json={"model": IMAGE_MODEL, "inputs": []})
    assert r.status_code == 422
    r = await c.post("/score", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = await c.post(
        "/score",
        json={"model": IMAGE_MODEL, "inputs": [{"array": _array()}]},
        headers={"X-Request-Timeout-Ms": "soon"},
    )
    assert r.status_code == 422 and "X-Request-Timeout-Ms" in r.json()["detail"]


async def test_limits_body_inputs_and_pixels(model_repo: ModelRepo) -> None:
    async with serving(
        model_repo.root, max_body_bytes=64 * 1024, max_inputs_per_request=4, max_image_pixels=4096
    ) as s:
        big = {"model": IMAGE_MODEL, "inputs": [{"array": _array()}] * 20}
        r = await s.client.post("/score", json=big)
        assert r.status_code == 413 and "over the limit of 65536 bytes" in r.json()["detail"]

        async def chunks():  # no Content-Length: the limit must hold while reading
            payload = json.dumps(big).encode()
            for i in range(0, len(payload), 8192):
                yield payload[i : i + 8192]

        r = await s.client.post(
            "/score", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413, r.text

        r = await s.client.post(
            "/score", json={"model": IMAGE_MODEL, "inputs": [{"array": [0]}] * 5}
        )
        assert r.status_code == 413 and "5 inputs is over the limit of 4" in r.json()["detail"]

        small = png_bytes(random_pixels(8, 8))
        files = [("image", (f"{i}.png", small, "image/png")) for i in range(5)]
        r = await s.client.post("/score", params={"model": IMAGE_MODEL}, files=files)
        assert r.status_code == 413 and "the limit is 4 inputs" in r.json()["detail"]
        r = await s.client.post("/score", params={"model": IMAGE_MODEL}, files=files[:4])
        assert r.status_code == 200

        huge = png_bytes(np.zeros((100, 100), np.uint8))
        r = await s.client.post(
            "/score", json={"model": IMAGE_MODEL, "inputs": [{"image": b64(huge)}]}
        )
        assert r.status_code == 422
        assert "inputs[0]: image is 100x100 = 10000 pixels, over the limit of 4096" in r.text
        r = await s.client.post(
            "/score", json={"model": IMAGE_MODEL, "inputs": [{"array": _array()}]}
        )
        assert r.status_code == 200


async def test_api_keys(model_repo: ModelRepo, tmp_path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("file-key\n\n")
    async with serving(model_repo.root, api_keys="k1, k2", api_keys_file=keys_file) as s:
        good = {"model": IMAGE_MODEL, "inputs": [{"array": _array()}]}
        r = await s.client.post("/score", json=good)
        assert r.status_code == 401 and "missing X-API-Key" in r.json()["detail"]
        r = await s.client.post("/score", json=good, headers={"X-API-Key": "k3"})
        assert r.status_code == 401 and r.json()["detail"] == "invalid X-API-Key"
        for key in ("k1", "k2", "file-key"):
            r = await s.client.post("/score", json=good, headers={"X-API-Key": key})
            assert r.status_code == 200
        assert (await s.client.get("/models")).status_code == 401
        # /admin/* ignores the scoring keys: loopback clients only, without admin keys
        # (tests/test_admin_access.py)
        assert (await s.client.post("/admin/reload")).status_code == 200
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await s.client.get(path)).status_code == 200


async def test_models_endpoints_report_versions_and_providers(served) -> None:
    r = await served.client.get("/models")
    assert r.status_code == 200
    listed = {m["name"]: m for m in r.json()["models"]}
    assert set(listed) == {IMAGE_MODEL, TABULAR_MODEL}
    digits = listed[IMAGE_MODEL]
    assert digits["latest"] == 2 and [v["version"] for v in digits["versions"]] == [1, 2]
    v2 = digits["versions"][1]
    assert v2["architecture"] == "ganomaly"
    assert v2["provider"] == served.registry.get(IMAGE_MODEL).provider
    assert v2["input"] == {
        "kind": "image",
        "channels": 1,
        "height": 32,
        "width": 32,
        "value_range": [0.0, 1.0],
    }
    assert v2["threshold"]["rule"].startswith("median of")
    r = await served.client.get(f"/models/{TABULAR_MODEL}")
    assert r.status_code == 200
    spec = r.json()["versions"][0]["input"]
    assert spec["preprocessing"]["columns"][1] == {
        "name": "protocol",
        "kind": "symbolic",
        "vocabulary": ["icmp", "tcp", "udp"],
        "transform": "none",
    }
    assert (await served.client.get("/models/nope")).status_code == 404


async def test_health_metrics_and_docs(served) -> None:
    assert (await served.client.get("/healthz")).json() == {"status": "ok"}
    ready = (await served.client.get("/readyz")).json()
    assert ready["ready"] is True and "digits:2 (cpu)" in ready["models"]
    before = metric("gansentry_requests_total", model=IMAGE_MODEL, status="200")
    r = await served.client.post(
        "/score", json={"model": IMAGE_MODEL, "inputs": [{"array": _array()}]}
    )
    assert r.status_code == 200
    text = (await served.client.get("/metrics")).text
    assert metric("gansentry_requests_total", model=IMAGE_MODEL, status="200") == before + 1
    for name in (
        "gansentry_request_duration_seconds_bucket",
        "gansentry_batch_size_bucket",
        "gansentry_queue_wait_seconds_bucket",
        "gansentry_inference_duration_seconds_bucket",
        "gansentry_score_ratio_bucket",
        "gansentry_requests_in_flight",
        "gansentry_queue_depth",
        'gansentry_model_info{architecture="ganomaly",model="digits"',
    ):
        assert name in text, name
    schema = (await served.client.get("/openapi.json")).json()
    body = schema["paths"]["/score"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert schema["components"]["schemas"]["ScoreRequest"]["examples"]
    assert "ScoreInput" in schema["components"]["schemas"]
    assert (await served.client.get("/docs")).status_code == 200


async def test_empty_repository_is_not_ready(tmp_path) -> None:
    async with serving(tmp_path) as s:
        r = await s.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["reasons"] == [
            "no model loaded: the models directory holds no model version"
        ]
        assert (await s.client.get("/healthz")).status_code == 200
